"""The device side: open a verified bundle and run it (variant and execution-provider choice, ``.ort``/``.tflite``).

Imports only ``lepton_cli.model`` and ``lepton_cli.bundle``, so a deployment needs neither the compiler nor its passes.
"""
