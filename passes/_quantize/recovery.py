"""Accuracy recovery before any layer is kept in float: the steps run on the float model ORT quantizes.

Order, each optional (``QuantizeParams``): cross-layer equalisation (exact: the float reference
itself changes), then per weight layer the rounding optimisation and the bias correction, both
against the equalised float layer's output on calibration data. The search keeps float-kept
layers on the *reference* weights and biases (equalised only), never the adjusted ones, which
are tuned for their int8 rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize import adaround, bias_correction, equalization, layer_stats, smoothquant
from lepton_cli.passes._quantize.schemes import Int8Scheme
from lepton_cli.passes._quantize.weight_layers import from_rows, load, store, to_rows, weight_grid, weight_layers


@dataclass(frozen=True)
class RecoverySettings:
    equalize: bool = False
    smoothquant_alpha: float | None = None  # None: off
    bias_correction: bool = False
    adaround: bool = False
    adaround_iterations: int = 300
    adaround_seconds: float = 120.0  # whole-model budget; layers past it keep round-to-nearest
    samples: int = 32  # calibration samples whose layer inputs are measured
    max_positions: int = 2048  # patches per sample in each layer's Gram matrix

    @property
    def per_layer(self) -> bool:
        return self.bias_correction or self.adaround


@dataclass
class Recovered:
    reference: onnx.ModelProto  # the float model, equalised (outputs unchanged): float-kept layers read it
    quantize_source: onnx.ModelProto  # what ORT quantizes: reference plus rounding and bias changes
    summary: dict[str, Any] = field(default_factory=dict)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _smooth(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    scheme: Int8Scheme,
    settings: RecoverySettings,
    summary: dict[str, Any],
) -> onnx.ModelProto:
    smoothed = _copy(model)
    layers = [
        layer
        for layer in weight_layers(smoothed)
        if layer.kind != "conv" and (not scheme.op_types or layer.node.op_type in scheme.op_types)
    ]
    stats = layer_stats.collect(smoothed, feeds, layers, max_positions=1)
    assert settings.smoothquant_alpha is not None
    done = [
        layer.name
        for layer in layers
        if layer.name in stats and smoothquant.smooth(smoothed, layer, stats[layer.name], settings.smoothquant_alpha)
    ]
    summary["smoothquant_layers"] = len(done)
    return smoothed


def recover(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    scheme: Int8Scheme,
    settings: RecoverySettings,
    note: Callable[[str], None] | None = None,
) -> Recovered:
    """Apply the enabled steps; ``model`` itself is left unchanged."""
    summary: dict[str, Any] = {}
    reference = model
    if settings.equalize:
        reference = _copy(model)
        started = time.perf_counter()
        changed = equalization.equalize(reference)
        summary["equalized_pairs"] = len(changed)
        summary["equalize_seconds"] = round(time.perf_counter() - started, 2)
    if settings.smoothquant_alpha is not None:
        reference = _smooth(reference, feeds[: settings.samples], scheme, settings, summary)
    if not settings.per_layer:
        return Recovered(reference, reference, summary)
    adjusted = _copy(reference)
    layers = [
        layer for layer in weight_layers(adjusted) if not scheme.op_types or layer.node.op_type in scheme.op_types
    ]
    started = time.perf_counter()
    stats = layer_stats.collect(reference, feeds[: settings.samples], layers, max_positions=settings.max_positions)
    summary["layer_stats_seconds"] = round(time.perf_counter() - started, 2)
    deadline = time.perf_counter() + settings.adaround_seconds
    rounded, corrected, skipped, gains = 0, 0, 0, []
    for layer in layers:
        if layer.name not in stats:
            skipped += 1
            continue
        weight = load(adjusted, layer.weight)
        rows = to_rows(layer, weight).astype(np.float64)
        grid = weight_grid(rows, scheme)
        if grid is None:
            skipped += 1
            continue
        if settings.adaround and time.perf_counter() < deadline:
            chosen = adaround.optimise_rounding(
                rows,
                grid,
                stats[layer.name],
                adaround.AdaRoundSettings(iterations=settings.adaround_iterations),
                deadline,
            )
            nearest_error = adaround.reconstruction_error(rows, grid.quantize(rows), stats[layer.name]).sum()
            chosen_error = adaround.reconstruction_error(rows, chosen, stats[layer.name]).sum()
            gains.append(float(chosen_error / nearest_error) if nearest_error > 0 else 1.0)
            store(adjusted, layer.weight, from_rows(layer, chosen, weight.shape))
            rounded += 1
        if (
            settings.bias_correction
            and bias_correction.correct(adjusted, layer, rows, grid, stats[layer.name]) is not None
        ):
            corrected += 1
    if settings.adaround:
        summary |= {
            "adaround_layers": rounded,
            "adaround_seconds": round(time.perf_counter() - started, 2),
            "adaround_error_ratio_median": round(float(np.median(gains)), 4) if gains else None,
        }
        if rounded < len(layers) - skipped and note:
            note(
                f"  adaround: time budget spent after {rounded} of {len(layers) - skipped} layers (the rest round to nearest)"
            )
    if settings.bias_correction:
        summary["bias_corrected_layers"] = corrected
    return Recovered(reference, adjusted, summary)
