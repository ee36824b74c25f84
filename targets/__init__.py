"""The builtin target profiles, one TOML per target; installed as ``lepton_cli.builtin_targets``."""
