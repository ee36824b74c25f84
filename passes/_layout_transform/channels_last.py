"""Channels-last model I/O: each 4-D float graph input is taken as NHWC and transposed to NCHW inside the
model, each 4-D float graph output transposed back; the I/O contract's metadata records which."""

from __future__ import annotations

import onnx
from lepton_cli.passes._layout_transform.transposer import Transposer
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, subgraph_names
from lepton_cli.model.io_contract import mark_nhwc

TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _is_float(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.tensor_type.elem_type in FLOAT_TYPES


def _rank(vi: onnx.ValueInfoProto) -> int | None:
    tt = vi.type.tensor_type
    return len(tt.shape.dim) if vi.type.HasField("tensor_type") and tt.HasField("shape") else None


def _permute_dims(vi: onnx.ValueInfoProto, perm: tuple[int, ...]) -> None:
    dims = [onnx.TensorShapeProto.Dimension() for _ in perm]
    old = list(vi.type.tensor_type.shape.dim)
    for i, p in enumerate(perm):
        dims[i].CopyFrom(old[p])
    del vi.type.tensor_type.shape.dim[:]
    vi.type.tensor_type.shape.dim.extend(dims)


def _transpose(names: FreshNames, source: str, out: str, perm: tuple[int, ...], label: str) -> onnx.NodeProto:
    return helper.make_node("Transpose", [source], [out], perm=list(perm), name=names.fresh(label))


def _nhwc_inputs(model: onnx.ModelProto, ix: GraphIndex, names: FreshNames, skip: set[str]) -> list[onnx.NodeProto]:
    """Take each 4-D float graph input as NHWC; returns the Transposes to NCHW that go first in the graph."""
    head = []
    for vi in model.graph.input:
        if vi.name in ix.inits or vi.name in skip or vi.name in ix.outputs or _rank(vi) != 4 or not _is_float(vi):
            continue
        inner = names.fresh(f"{vi.name}__nchw")
        ix.replace_uses(vi.name, inner)
        head.append(_transpose(names, vi.name, inner, TO_NCHW, f"{vi.name}__to_nchw"))
        _permute_dims(vi, TO_NHWC)
    return head


def _nhwc_outputs(model: onnx.ModelProto, ix: GraphIndex, names: FreshNames, skip: set[str]) -> list[onnx.NodeProto]:
    """Return each 4-D float graph output as NHWC; returns the Transposes that go last in the graph."""
    tail = []
    for vi in model.graph.output:
        if vi.name not in ix.producer or vi.name in skip or _rank(vi) != 4 or not _is_float(vi):
            continue
        inner = names.fresh(f"{vi.name}__nchw")
        producer = ix.producer[vi.name]
        ix.set_output(producer, list(producer.output).index(vi.name), inner)
        ix.replace_uses(vi.name, inner)
        tail.append(_transpose(names, inner, vi.name, TO_NHWC, f"{vi.name}__to_nhwc"))
        _permute_dims(vi, TO_NHWC)
    return tail


def channels_last_io(model: onnx.ModelProto) -> dict:
    """Make every 4-D float graph input/output NHWC; returns counts for the summary."""
    g = model.graph
    names = FreshNames(model)
    ix = GraphIndex(g)
    in_subgraphs = subgraph_names(g)
    transposes_before = sum(n.op_type == "Transpose" for n in g.node)
    head = _nhwc_inputs(model, ix, names, in_subgraphs)
    tail = _nhwc_outputs(model, ix, names, in_subgraphs)
    ix.reorder(head + list(g.node) + tail)
    changed_in, changed_out = [n.input[0] for n in head], [n.output[0] for n in tail]
    for value in list(g.value_info):  # a renamed output's stale entry would now describe the NHWC tensor
        if value.name in changed_out:
            g.value_info.remove(value)
    Transposer(model, names, {n.name for n in head}, {n.name for n in tail}).run()
    for name in changed_in + changed_out:
        mark_nhwc(model, name)
    added = len(head) + len(tail)
    after = sum(n.op_type == "Transpose" for n in g.node)
    return {
        "nhwc_inputs": changed_in,
        "nhwc_outputs": changed_out,
        "transposes_added": added,
        "transposes_remaining": after - transposes_before,
        "transposes_cancelled": added - (after - transposes_before),
    }
