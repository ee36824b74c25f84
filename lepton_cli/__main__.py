from lepton_cli.cli import main

main()
