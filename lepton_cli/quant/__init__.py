"""Quantization helpers behind ``passes/quantize.py``: calibration, per-target schemes, accuracy-aware tuning."""
