"""One module per pass; each registers itself with ``lepton_cli.pipeline.registry.register_pass``.

Installed as ``lepton_cli.passes`` (see pyproject.toml); the registry imports every module here.
"""
