"""The report's per-layer table: channels, parameters and MACs of each weight layer before and after pruning."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from lepton_cli.passes._prune.sparsity import input_axis, node_name

from lepton_cli.model.op_traits import WEIGHT_OPS, attr
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs
from lepton_cli.model.stats import node_macs, shape_map
from lepton_cli.samples.sample_set import SampleSet


def channel_table(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    samples: SampleSet | None,
    input_shapes: dict[str, list[int]],
) -> list[dict[str, Any]]:
    """Per Conv/Gemm/MatMul: channels, params and MACs before and after (dynamic dims bound from ``samples``,
    else ``input_shapes``, else batch 1)."""
    macs_b, macs_a = _macs_by_output(before, samples, input_shapes), _macs_by_output(after, samples, input_shapes)
    inits_a = {t.name: t for t in after.graph.initializer}
    inits_b = {t.name: t for t in before.graph.initializer}
    rows = []
    for nb, na in zip(before.graph.node, after.graph.node):
        if nb.op_type not in WEIGHT_OPS or len(nb.input) < 2 or nb.input[1] not in inits_b:
            continue
        wb, wa = list(inits_b[nb.input[1]].dims), list(inits_a[na.input[1]].dims)
        out_axis = {"Conv": 0, "ConvTranspose": 1}.get(nb.op_type, 0 if attr(nb, "transB", 0) else len(wb) - 1)
        in_axis = input_axis(nb, len(wb))
        rows.append(
            {
                "layer": node_name(nb),
                "op": nb.op_type,
                "out_channels": [wb[out_axis], wa[out_axis]],
                "in_channels": [wb[in_axis], wa[in_axis]],
                "params": [_params_of(inits_b, nb), _params_of(inits_a, na)],
                "macs": [macs_b.get(nb.output[0]), macs_a.get(na.output[0])],
            }
        )
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Params and MACs summed over the rows, before and after (None where a layer's MACs are unknown)."""

    def total(key: str, i: int) -> int | None:
        vals = [r[key][i] for r in rows]
        return None if any(v is None for v in vals) else int(sum(vals))

    return {"params": [total("params", 0), total("params", 1)], "macs": [total("macs", 0), total("macs", 1)]}


def _macs_by_output(
    model: onnx.ModelProto, samples: SampleSet | None, input_shapes: dict[str, list[int]]
) -> dict[str, int | None]:
    """MACs per Conv/Gemm/MatMul node, keyed by its first output; dynamic batch bound to 1."""
    shapes = {}
    for sig in graph_inputs(model):
        if not sig.is_static:
            known = (samples.shapes().get(sig.name) if samples is not None else None) or input_shapes.get(sig.name)
            if known:
                shapes[sig.name] = list(known)
            elif all(isinstance(d, int) for d in sig.dims[1:]):
                shapes[sig.name] = [1, *sig.dims[1:]]
    try:
        bound = bind_input_shapes(model, shapes) if shapes else model
    except Exception:  # shapes the model rejects: MACs from its own (possibly unknown) dims
        bound = model
    smap = shape_map(bound)
    return {n.output[0]: node_macs(n, smap) for n in bound.graph.node if n.op_type in WEIGHT_OPS}


def _params_of(inits: dict[str, onnx.TensorProto], node: onnx.NodeProto) -> int:
    return sum(int(np.prod(inits[i].dims)) for i in node.input[1:] if i in inits)
