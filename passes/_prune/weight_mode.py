"""The magnitude and 2:4 modes: choose each layer's sparsity within the budget, apply it, and report it."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
from lepton_cli.passes._prune.options import PruneOptions
from lepton_cli.passes._prune.search import Unit, choose, explain
from lepton_cli.passes._prune.sparsity import WeightLayer, apply_weights, sparse_bytes, weight_layers

from lepton_cli.evaluate.accuracy import Evaluator
from lepton_cli.model.external_data import tensor_array


def prune_weights(
    model: onnx.ModelProto,
    options: PruneOptions,
    nm: bool,
    evaluator: Evaluator | None,
    allowed: float,
    warn: Callable[[str], None],
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``model`` with 2:4 (``nm``) or magnitude sparsity on the layers the search chose, and the summary."""
    layers, skipped = weight_layers(model, options, nm)
    by_key = {layer.name: layer for layer in layers}
    units = _units(layers, options, nm)
    chosen, info = choose(units, lambda c: apply_weights(model, by_key, c, nm), evaluator, allowed, options, warn)
    result = apply_weights(model, by_key, chosen, nm)
    rows = _rows(model, result, units, by_key, nm, chosen, info, allowed)
    pruned = [r for r in rows if r["sparsity"][1] > 0]
    return result, {
        "layers": rows,
        "skipped": skipped,
        "search": info,
        "pruned_layers": sum(1 for r in rows if r["sparsity"][1] > r["sparsity"][0]),
        "pruned_dense_bytes": sum(r["bytes"][1] for r in pruned),
        "pruned_sparse_bytes": sum(r["sparse_bytes"] for r in pruned),
    }


def _units(layers: list[WeightLayer], options: PruneOptions, nm: bool) -> list[Unit]:
    """2:4 has the one ratio 0.5; magnitude tries each ratio up to the op type's cap."""
    units = []
    for layer in layers:
        cap = options.max_ratio.get(layer.op, max(options.ratios))
        levels = [0.5] if nm else sorted({r for r in options.ratios if r <= cap})
        if levels:
            units.append(Unit(layer.name, layer.op, levels))
    return units


def _rows(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    units: list[Unit],
    by_key: dict[str, WeightLayer],
    nm: bool,
    chosen: dict[str, float],
    info: dict[str, Any],
    allowed: float,
) -> list[dict[str, Any]]:
    """Per searched layer: sparsity and bytes before and after, the sparse encoding's size, and why."""
    inits_b = {t.name: t for t in before.graph.initializer}
    inits_a = {t.name: t for t in after.graph.initializer}
    rows = []
    for u in units:
        layer = by_key[u.key]
        wb, wa = tensor_array(inits_b[layer.weight]), tensor_array(inits_a[layer.weight])
        sens = {float(k): v for k, v in info.get("sensitivity", {}).get(u.key, {}).items()}
        why = (
            explain(sens, chosen.get(u.key), info.get("final_threshold", allowed), allowed)
            if sens
            else info.get("note", "")
        )
        rows.append(
            {
                "layer": layer.name,
                "op": layer.op,
                "weight": layer.weight,
                "shape": layer.shape,
                "pattern": "2:4 along input channels" if nm else "unstructured",
                "sparsity": [
                    round(1 - np.count_nonzero(wb) / wb.size, 4),
                    round(1 - np.count_nonzero(wa) / wa.size, 4),
                ],
                "bytes": [int(wb.nbytes), int(wa.nbytes)],
                "sparse_bytes": sparse_bytes(wa),
                "why": why,
            }
        )
    return rows
