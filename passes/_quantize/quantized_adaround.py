"""Weight rounding chosen on the quantized model: each layer's int8 weights fitted to its float output from the
inputs the int8 model really gives it (AdaRound's asymmetric reconstruction, Nagel et al. 2020, section 5).

``adaround.py`` fits a layer's rounding to its float output on *float* inputs: it removes the error of the layer's
own weights and sees nothing of the activation rounding before it, which is most of a full-integer model's error
(tpu: PP-OCRv5 rec, ddddocr's detector, MiniLM; docs/decisions.md, session 22). Here the objective is
``E|w_q x_q - w x_f|^2`` with ``x_q`` the layer's input in the int8 model and ``x_f`` the float reference's, so the
rounding also leans against the error arriving at the layer. The weights stay on their stored grid (scale and zero
point untouched, one up-or-down choice per weight), unlike session 22's free least-squares fit. Layers are fitted
in graph order, a few at a time, each reading inputs from the int8 model with the layers before it already
refitted; the weights are graph inputs of one session meanwhile, so the model loads once. Matched to the reference
by node name, as ``quantized_bias.py`` (ORT renames outputs). PP-OCRv5 rec every op int8 on tpu: 1.40 -> 0.64
points held out; on detectors' maps and MiniLM the fit follows the calibration samples and reads no better held
out, which ``float_share`` (part of the objective on float inputs, as QDrop) tempers: opt-in, a tier step on tpu
(benchmarks/results/quantized_adaround.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.adaround import AdaRoundSettings, optimise_rounding, reconstruction_error
from lepton_cli.passes._quantize.layer_stats import LayerStats, patches
from lepton_cli.passes._quantize.quantized_bias import feed_initializers, write_initializers
from lepton_cli.passes._quantize.sensitivity import with_outputs
from lepton_cli.passes._quantize.weight_layers import Grid, WeightLayer, to_rows, weight_layers

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.model.sessions import make_session

MAX_POSITIONS = 2048  # patches per sample and layer in the Gram matrices (a 160x160 stem has 25,600)
MAX_INPUTS = 8192  # wider layers keep their rounding: one float64 Gram matrix of 8192 inputs is 512 MB
GRAM_BYTES = 512 << 20  # a measurement holds at most this many bytes of Gram matrices (a wider layer goes alone)


@dataclass
class WeightSite:
    layer: WeightLayer  # the reference's layer (its node, kind and groups)
    weight: str  # the int8 initializer in the quantized model
    scale: np.ndarray  # per row of ``to_rows``
    input: str  # what the layer reads in the quantized model (a DequantizeLinear's output)
    width: int = 0  # inputs per output row (in_per_group x kernel)

    @property
    def groups_and_width(self) -> tuple[int, int]:
        return self.layer.groups, self.width


def weight_sites(model: onnx.ModelProto, reference: onnx.ModelProto) -> list[WeightSite]:
    """The quantized model's weight layers whose int8 weights (symmetric, read once) sit behind a DequantizeLinear
    and whose reference layer of the same node name has float weights of the same shape, in graph order."""
    g = GraphIndex(model.graph)
    layers = {layer.name: layer for layer in weight_layers(reference)}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    sites = []
    for node in model.graph.node:
        layer = layers.get(node.name)
        if layer is None or layer.node.op_type != node.op_type or len(node.input) < 2:
            continue
        dequantize = g.producer.get(node.input[1])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[0] not in g.inits:
            continue
        stored = g.inits[dequantize.input[0]]
        zero = g.const(dequantize.input[2]) if len(dequantize.input) > 2 and dequantize.input[2] else None
        scale = g.const(dequantize.input[1])
        if (
            stored.data_type != onnx.TensorProto.INT8
            or list(stored.dims) != list(ref_inits[layer.weight].dims)
            or len(g.readers(stored.name)) != 1
            or scale is None
            or (zero is not None and np.any(zero))
        ):
            continue
        rows, width = to_rows(layer, np.zeros(tuple(stored.dims), np.int8)).shape
        scale = scale.astype(np.float64).reshape(-1)
        if scale.size not in (1, rows) or width > MAX_INPUTS:
            continue
        sites.append(WeightSite(layer, stored.name, np.broadcast_to(scale, (rows,)).copy(), node.input[0], width))
    return sites


def _chunks(sites: list[WeightSite], most: int, grams: int) -> list[list[WeightSite]]:
    """``sites`` in graph order, cut into runs of at most ``most`` whose ``grams`` Gram matrices each fit GRAM_BYTES
    together: PP-OCRv5 rec's 3x3 convs over 480 channels have 4,320 inputs, 150 MB a matrix."""
    runs: list[list[WeightSite]] = [[]]
    held = 0
    for site in sites:
        groups, width = site.groups_and_width
        size = grams * groups * width * width * 8
        if runs[-1] and (len(runs[-1]) == most or held + size > GRAM_BYTES):
            runs.append([])
            held = 0
        runs[-1].append(site)
        held += size
    return [run for run in runs if run]


class _Inputs:
    """Each site's input in the quantized model (its int8 weights fed as graph inputs, so one session serves every
    refit) and in the float reference, one sample at a time; ``sites`` keeps those both models can return."""

    def __init__(self, model: onnx.ModelProto, reference: onnx.ModelProto, sites: list[WeightSite]) -> None:
        copy, returned = with_outputs(model, [s.input for s in sites])
        ref_copy, ref_returned = with_outputs(reference, [s.layer.node.input[0] for s in sites])
        self.sites = [s for s in sites if s.input in returned and s.layer.node.input[0] in ref_returned]
        feed_initializers(copy, [s.weight for s in self.sites])
        self.model, self.reference = model, reference
        self.session, self.ref_session = make_session(copy, arena=False), make_session(ref_copy, arena=False)

    def run(self, part: list[WeightSite], feed: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> list:
        """[(x_q, x_f)] for the sites in ``part``, on ``feed`` (the source's form)."""
        quantized = self.session.run([s.input for s in part], adapt_feed(self.model, feed) | weights)
        floats = self.ref_session.run([s.layer.node.input[0] for s in part], adapt_feed(self.reference, feed))
        return list(zip(quantized, floats))


class _PairedGram:
    """``E[x_q x_qᵀ]``, ``E[x_q x_fᵀ]`` and ``E[x_f x_fᵀ]`` of one layer's input patches, the same positions in both
    models."""

    def __init__(self, rng: np.random.Generator, with_float: bool) -> None:
        self.rng, self.qq, self.qf, self.ff, self.count = rng, 0.0, 0.0, 0.0, 0
        self.with_float = with_float  # E[x_f x_fᵀ] only where the objective blends in the float-input one

    def add(self, cols_q: np.ndarray, cols_f: np.ndarray) -> None:
        if cols_q.shape[2] > MAX_POSITIONS:
            pick = self.rng.choice(cols_q.shape[2], MAX_POSITIONS, replace=False)
            cols_q, cols_f = cols_q[:, :, pick], cols_f[:, :, pick]
        self.qq = self.qq + np.matmul(cols_q, cols_q.transpose(0, 2, 1))
        self.qf = self.qf + np.matmul(cols_q, cols_f.transpose(0, 2, 1))
        if self.with_float:
            self.ff = self.ff + np.matmul(cols_f, cols_f.transpose(0, 2, 1))
        self.count += cols_q.shape[2]

    def stats(self, float_share: float) -> tuple[LayerStats, np.ndarray]:
        """(statistics whose ``gram`` the fit reads, its cross term): the quantized-input objective, blended with
        ``float_share`` of the float-input one (QDrop's point, Wei et al. 2022: a fit to the int8 inputs alone
        follows what the calibration samples' rounding happens to be)."""
        n, keep = max(self.count, 1), 1.0 - float_share
        ff = np.asarray(self.ff) / n
        gram = keep * np.asarray(self.qq) / n + float_share * ff
        empty = np.zeros(gram.shape[:2])
        return LayerStats(empty, gram, self.count, empty), keep * np.asarray(self.qf) / n + float_share * ff


def _refit(
    site: WeightSite,
    stored: np.ndarray,
    reference: np.ndarray,
    gram: _PairedGram,
    settings: AdaRoundSettings,
    float_share: float,
) -> np.ndarray:
    """The site's int8 weights after the rounding fit (rows where it does not lower the error keep ``stored``)."""
    stats, cross = gram.stats(float_share)
    layer, shape = site.layer, stored.shape
    rows = to_rows(layer, reference.astype(np.float64))
    current = to_rows(layer, stored).astype(np.float64) * site.scale[:, None]
    bound = max(int(np.abs(stored).max()), 1)  # the stored range: 127 (64 for reduced-range weights)
    grid = Grid(site.scale, -bound, bound)
    chosen = optimise_rounding(rows, grid, stats, settings, cross=cross, pin=False)
    better = reconstruction_error(rows, chosen, stats, cross) < reconstruction_error(rows, current, stats, cross)
    fitted = np.where(better[:, None], chosen, current) / site.scale[:, None]
    levels = np.clip(np.round(fitted), -bound, bound).astype(np.int8)
    if layer.kind == "conv":
        return levels.reshape(shape)
    return levels if layer.kind == "gemm_t" else np.ascontiguousarray(levels.T)


def refit_quantized_weights(
    model: onnx.ModelProto,
    reference: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    *,
    chunk: int = 4,
    settings: AdaRoundSettings | None = None,
    float_share: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Refit ``model``'s int8 weights in place (``chunk`` layers per measurement, in graph order) against
    ``reference`` (the float model it was quantized from, same node names) on ``feeds``; returns the refitted
    weights by initializer name (``write_initializers`` puts them into the same quantized model built again);
    ``float_share`` of the objective is the float-input one. No time limit: a wall-clock cut would make the model
    depend on the host's load (PP-OCRv5 rec on tpu read 0.82 on the gate, refused, with 120 s on a loaded host)."""
    sites = weight_sites(model, reference)
    if not sites or not feeds:
        return {}
    settings = settings or AdaRoundSettings()
    inputs = _Inputs(model, reference, sites)
    inits = {t.name: t for t in model.graph.initializer}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    weights = {s.weight: tensor_array(inits[s.weight]).copy() for s in inputs.sites}
    rng = np.random.default_rng(seed)
    refitted: dict[str, np.ndarray] = {}
    for part in _chunks(inputs.sites, chunk, 3 if float_share > 0 else 2):
        grams = [_PairedGram(rng, float_share > 0) for _ in part]
        for feed in feeds:
            for site, gram, (x_q, x_f) in zip(part, grams, inputs.run(part, feed, weights)):
                shape = tuple(weights[site.weight].shape)
                gram.add(patches(site.layer, np.asarray(x_q), shape), patches(site.layer, np.asarray(x_f), shape))
        for site, gram in zip(part, grams):
            value = tensor_array(ref_inits[site.layer.weight])
            weights[site.weight] = refitted[site.weight] = _refit(
                site, weights[site.weight], value, gram, settings, float_share
            )
    write_initializers(model, refitted)
    return refitted
