"""Accuracy recovery before any layer is kept in float: the steps run on the float model ORT quantizes.

Order, each optional (``QuantizeParams``): cross-layer equalisation, activation equalisation, residual scaling,
query/key balancing, SmoothQuant and conv-input smoothing (exact: the float reference itself changes; smoothing's
per-channel Mul/Add stay float), then per weight layer the rounding optimisation and the bias correction, both
against the equalised float layer's output on calibration data. The search keeps float-kept
layers on the *reference* weights and biases (equalised only), never the adjusted ones, which
are tuned for their int8 rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize import (
    activation_equalize,
    adaround,
    attention_balance,
    bias_correction,
    conv_smoothing,
    equalization,
    gelu_equalize,
    layer_stats,
    residual_blocks,
    residual_scaling,
    smoothquant,
)
from lepton_cli.passes._quantize.schemes import Int8Scheme
from lepton_cli.passes._quantize.weight_layers import (
    WeightLayer,
    from_rows,
    load,
    store,
    to_rows,
    weight_grid,
    weight_layers,
)

INT8_STEPS = ("quantized_adaround", "quantized_bias_correction")  # fitted on each int8 model, in this order
# Steps that rewrite the float graph (exactly, or with inserted float scales), before the per-layer weight fits
GRAPH_STEPS = (
    "equalize",
    "activation_equalize",
    "residual_scaling",
    "residual_blocks",
    "gelu_equalize",
    "attention_balance",
    "smoothquant",
    "conv_smoothing",
)
# What each step records in the summary about what it changed: (key, unit), for the report's gains table.
CHANGE_COUNTS = {
    "equalize": ("equalized_pairs", "conv pairs"),
    "activation_equalize": ("activation_regions_equalized", "hard-swish/SiLU regions"),
    "residual_scaling": ("residual_sums_scaled", "residual sums"),
    "residual_blocks": ("residual_branches_split", "residual projections"),
    "gelu_equalize": ("gelu_blocks_equalized", "feed-forward blocks"),
    "attention_balance": ("attention_sites_balanced", "attention sites"),
    "smoothquant": ("smoothquant_layers", "layers"),
    "conv_smoothing": ("conv_inputs_smoothed", "conv inputs"),
    "adaround": ("adaround_layers", "layers"),
    "bias_correction": ("bias_corrected_layers", "layers"),
    "quantized_bias_correction": ("quantized_biases_corrected", "layers"),
    "quantized_adaround": ("quantized_adaround_layers", "layers"),
}


def changed_by(step: str, summary: dict[str, Any]) -> str:
    """ "31 conv inputs": what ``step`` changed, from ``recover``'s summary ("" when it records nothing)."""
    key, unit = CHANGE_COUNTS[step]
    return f"{summary[key]} {unit}" if key in summary else ""


@dataclass(frozen=True)
class RecoverySettings:
    equalize: bool = False
    activation_equalize: bool = False  # activation_equalize.py
    residual_scaling_alpha: float | None = None  # None: off (residual_scaling.py)
    residual_blocks: bool = False  # residual_blocks.py
    gelu_equalize: bool = False  # gelu_equalize.py
    attention_balance: bool = False  # attention_balance.py
    smoothquant_alpha: float | None = None  # None: off
    smoothquant_insert: bool = False  # a float per-channel Mul where no producer absorbs 1/s (smoothquant.py)
    conv_smoothing_alpha: float | None = None  # None: off (conv_smoothing.py)
    bias_correction: bool = False
    quantized_bias_correction: bool = False  # applied to each int8 model by its build, not here (int8_fits.py)
    quantized_adaround: bool = False  # the same: rounding refitted on the int8 model's inputs (quantized_adaround.py)
    adaround: bool = False
    adaround_iterations: int = 300
    adaround_seconds: float = 120.0  # whole-model budget; layers past it keep round-to-nearest
    samples: int = 32  # calibration samples whose layer inputs are measured
    max_positions: int = 2048  # patches per sample in each layer's Gram matrix

    @property
    def per_layer(self) -> bool:
        return self.bias_correction or self.adaround

    @property
    def steps(self) -> list[str]:
        """The enabled steps, in the order ``recover`` applies them."""
        enabled = {
            "equalize": self.equalize,
            "activation_equalize": self.activation_equalize,
            "residual_scaling": self.residual_scaling_alpha is not None,
            "residual_blocks": self.residual_blocks,
            "gelu_equalize": self.gelu_equalize,
            "attention_balance": self.attention_balance,
            "smoothquant": self.smoothquant_alpha is not None,
            "conv_smoothing": self.conv_smoothing_alpha is not None,
            "adaround": self.adaround,
            "bias_correction": self.bias_correction,
            "quantized_adaround": self.quantized_adaround,
            "quantized_bias_correction": self.quantized_bias_correction,
        }
        return [name for name, on in enabled.items() if on]

    @property
    def int8_steps(self) -> tuple[str, ...]:
        """The enabled steps each int8 model's build fits (int8_fits.py), which ``recover`` leaves alone."""
        return tuple(step for step in INT8_STEPS if step in self.steps)

    def only(self, steps: list[str]) -> RecoverySettings:
        """These settings with every step not in ``steps`` switched off."""
        return replace(
            self,
            equalize=self.equalize and "equalize" in steps,
            activation_equalize=self.activation_equalize and "activation_equalize" in steps,
            residual_scaling_alpha=self.residual_scaling_alpha if "residual_scaling" in steps else None,
            residual_blocks=self.residual_blocks and "residual_blocks" in steps,
            gelu_equalize=self.gelu_equalize and "gelu_equalize" in steps,
            attention_balance=self.attention_balance and "attention_balance" in steps,
            smoothquant_alpha=self.smoothquant_alpha if "smoothquant" in steps else None,
            conv_smoothing_alpha=self.conv_smoothing_alpha if "conv_smoothing" in steps else None,
            adaround=self.adaround and "adaround" in steps,
            bias_correction=self.bias_correction and "bias_correction" in steps,
            quantized_bias_correction=self.quantized_bias_correction and "quantized_bias_correction" in steps,
            quantized_adaround=self.quantized_adaround and "quantized_adaround" in steps,
        )

    @property
    def any_step(self) -> bool:
        return (
            self.equalize
            or self.activation_equalize
            or self.per_layer
            or bool(self.int8_steps)
            or self.residual_scaling_alpha is not None
            or self.residual_blocks
            or self.gelu_equalize
            or self.attention_balance
            or self.smoothquant_alpha is not None
            or self.conv_smoothing_alpha is not None
        )


@dataclass
class Recovered:
    reference: onnx.ModelProto  # the float model, equalised (outputs unchanged): float-kept layers read it
    quantize_source: onnx.ModelProto  # what ORT quantizes: reference plus rounding and bias changes
    summary: dict[str, Any] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)  # nodes a step left unfit for int8 (kept float)


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
) -> tuple[onnx.ModelProto, list[str]]:
    """A SmoothQuant'ed copy of ``model`` and the Mul nodes it inserted (float: per-channel constants)."""
    smoothed = _copy(model)
    layers = [
        layer
        for layer in weight_layers(smoothed)
        if layer.kind != "conv" and (not scheme.op_types or layer.node.op_type in scheme.op_types)
    ]
    stats = layer_stats.collect(smoothed, feeds, layers, max_positions=1, gram=False)
    assert settings.smoothquant_alpha is not None
    groups: dict[str, list[WeightLayer]] = {}  # layers reading one tensor get one scale
    for layer in layers:
        if layer.name in stats:
            groups.setdefault(layer.node.input[0], []).append(layer)
    found = [
        smoothquant.smooth(
            smoothed, group, stats[group[0].name], settings.smoothquant_alpha, settings.smoothquant_insert
        )
        for group in groups.values()
    ]
    done = [s for s in found if s is not None]
    summary["smoothquant_layers"] = sum(len(s.layers) for s in done)
    inserted = [s.inserted for s in done if s.inserted is not None]
    if inserted:
        summary["smoothquant_inserted"] = len(inserted)
    return smoothed, inserted


def _equalize(model: onnx.ModelProto, summary: dict[str, Any]) -> onnx.ModelProto:
    equalized = _copy(model)
    started = time.perf_counter()
    changed = equalization.equalize(equalized)
    summary["equalized_pairs"] = len(changed)
    summary["equalize_seconds"] = round(time.perf_counter() - started, 2)
    return equalized


@dataclass
class _LayerCounts:
    rounded: int = 0
    corrected: int = 0
    skipped: int = 0
    gains: list[float] = field(default_factory=list)  # AdaRound's reconstruction error over round-to-nearest's


def _adjust_layer(
    adjusted: onnx.ModelProto,
    layer: WeightLayer,
    stats: Any,
    scheme: Int8Scheme,
    settings: RecoverySettings,
    deadline: float,
    counts: _LayerCounts,
) -> None:
    """Round one layer's weights (AdaRound, while time is left) and correct its bias, in ``adjusted``."""
    weight = load(adjusted, layer.weight)
    rows = to_rows(layer, weight).astype(np.float64)
    grid = weight_grid(rows, scheme)
    if grid is None:
        counts.skipped += 1
        return
    if settings.adaround and time.perf_counter() < deadline:
        chosen = adaround.optimise_rounding(
            rows, grid, stats, adaround.AdaRoundSettings(iterations=settings.adaround_iterations), deadline
        )
        nearest_error = adaround.reconstruction_error(rows, grid.quantize(rows), stats).sum()
        chosen_error = adaround.reconstruction_error(rows, chosen, stats).sum()
        counts.gains.append(float(chosen_error / nearest_error) if nearest_error > 0 else 1.0)
        store(adjusted, layer.weight, from_rows(layer, chosen, weight.shape))
        counts.rounded += 1
    if settings.bias_correction and bias_correction.correct(adjusted, layer, rows, grid, stats) is not None:
        counts.corrected += 1


def _per_layer(
    reference: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    scheme: Int8Scheme,
    settings: RecoverySettings,
    summary: dict[str, Any],
    progress: Callable[[str], None] | None,
) -> onnx.ModelProto:
    """A copy of ``reference`` with each weight layer's rounding and bias tuned against its float output."""
    adjusted = _copy(reference)
    layers = [
        layer for layer in weight_layers(adjusted) if not scheme.op_types or layer.node.op_type in scheme.op_types
    ]
    started = time.perf_counter()
    stats = layer_stats.collect(reference, feeds[: settings.samples], layers, max_positions=settings.max_positions)
    summary["layer_stats_seconds"] = round(time.perf_counter() - started, 2)
    deadline = time.perf_counter() + settings.adaround_seconds
    counts = _LayerCounts()
    for layer in layers:
        if layer.name in stats:
            _adjust_layer(adjusted, layer, stats[layer.name], scheme, settings, deadline, counts)
        else:
            counts.skipped += 1
    if settings.adaround:
        median = round(float(np.median(counts.gains)), 4) if counts.gains else None
        summary |= {
            "adaround_layers": counts.rounded,
            "adaround_seconds": round(time.perf_counter() - started, 2),
            "adaround_error_ratio_median": median,
        }
        tuned = len(layers) - counts.skipped
        if counts.rounded < tuned and progress:
            progress(
                f"adaround: time budget spent after {counts.rounded} of {tuned} layers (the rest round to nearest)"
            )
    if settings.bias_correction:
        summary["bias_corrected_layers"] = counts.corrected
    return adjusted


def recover(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    scheme: Int8Scheme,
    settings: RecoverySettings,
    progress: Callable[[str], None] | None = None,
) -> Recovered:
    """Apply the enabled steps; ``model`` itself is left unchanged."""
    summary: dict[str, Any] = {}
    float_nodes: list[str] = []
    reference = _equalize(model, summary) if settings.equalize else model
    if settings.activation_equalize:
        reference, summary["activation_regions_equalized"] = activation_equalize.equalized(
            reference, feeds[: settings.samples]
        )
    if settings.residual_scaling_alpha is not None and residual_scaling.has_candidates(reference):
        reference = _copy(reference)
        scaled = residual_scaling.scale_residuals(reference, feeds[: settings.samples], settings.residual_scaling_alpha)
        summary["residual_sums_scaled"] = scaled.sites
        float_nodes += scaled.float_nodes
    if settings.residual_blocks:
        reference = _copy(reference)
        blocked = residual_blocks.split_residual_branches(reference, feeds[: settings.samples])
        summary["residual_branches_split"] = len(blocked.branches_split)
        float_nodes += blocked.float_nodes
    if settings.gelu_equalize:
        reference, summary["gelu_blocks_equalized"] = gelu_equalize.equalized(reference, feeds[: settings.samples])
    if settings.attention_balance:
        reference, summary["attention_sites_balanced"] = attention_balance.balanced(
            reference, feeds[: settings.samples]
        )
    if settings.smoothquant_alpha is not None:
        reference, inserted = _smooth(reference, feeds[: settings.samples], scheme, settings, summary)
        float_nodes += inserted
    if settings.conv_smoothing_alpha is not None:
        reference = _copy(reference)
        smoothed = conv_smoothing.smooth_conv_inputs(
            reference, feeds[: settings.samples], settings.conv_smoothing_alpha
        )
        summary["conv_inputs_smoothed"] = len(smoothed.tensors)
        float_nodes += smoothed.float_nodes
    if not settings.per_layer:
        return Recovered(reference, reference, summary, float_nodes)
    adjusted = _per_layer(reference, feeds, scheme, settings, summary, progress)
    return Recovered(reference, adjusted, summary, float_nodes)
