"""Float-kept hard-swish blocks given back alpha 1/6, the form ONNX Runtime runs inside its convolution.

fuse folds PP-LCNetV3's learnable scale s into the Conv before each hard-swish, which leaves HardSigmoid's alpha at
1/(6 s). Where such a block stays float, ORT then runs HardSigmoid and Mul as two passes over the map, with layout
reorders around them; with alpha 1/6 its NCHWc convolution applies them itself (PP-OCRv4 det on cpu-avx: 0.458x ->
0.406x fp32, benchmarks/results/det_stem_speed.md). With x = c u, c = 1/(6 alpha): x * HardSigmoid_alpha(x) =
c * HardSwish(u), so the Conv's weights and bias take 1/c and the readers take c back: a scalar shift b becomes b / c,
a Conv's weights * c (exact with zero padding), a QuantizeLinear's scale / c. Exact in real arithmetic, not in float
rounding, which a worst-page map metric can turn into a point: the tuner keeps the result only when it scores within
the budget itself (tuning.verified_rewrite).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers
from lepton_cli.model.op_traits import attrs

SWISH_ALPHA = 1.0 / 6.0


def _float_const(g: GraphIndex, name: str) -> np.ndarray | None:
    value = g.const(name) if name else None
    return value if value is not None and np.issubdtype(value.dtype, np.floating) else None


def _block(g: GraphIndex, hsig: onnx.NodeProto) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto | None] | None:
    """(Conv, Mul, optional scalar Add) of a float hard-swish whose rescaling every reader can absorb."""
    a = attrs(hsig)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    conv = g.producer.get(hsig.input[0])
    if np.isclose(alpha, SWISH_ALPHA, rtol=1e-6) or beta != 0.5 or alpha <= 0 or conv is None:
        return None
    if conv.op_type != "Conv" or any(_float_const(g, name) is None for name in conv.input[1:] if name):
        return None
    if hsig.input[0] in g.outputs:
        return None
    readers = g.readers(hsig.input[0])
    mul = next((r for r in readers if r.op_type == "Mul" and hsig.output[0] in r.input), None)
    if mul is None or len(readers) != 2 or not g.sole_use(hsig.output[0]):
        return None
    tail = mul.output[0]
    add = g.only_reader(tail)
    if add is not None and add.op_type == "Add" and any(_scalar_shift(g, add, tail)):
        tail = add.output[0]
    else:
        add = None
    ends = g.readers(tail)
    if tail in g.outputs or not ends or not all(_absorbs(g, node, tail) for node in ends):
        return None
    return conv, mul, add


def _scalar_shift(g: GraphIndex, add: onnx.NodeProto, tensor: str) -> list[str]:
    other = [i for i in add.input if i != tensor]
    value = _float_const(g, other[0]) if len(other) == 1 and len(add.input) == 2 else None
    return other if value is not None and value.size == 1 else []


def _absorbs(g: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """``node`` reads ``tensor`` as its data input and can take the factor c in a constant."""
    if node.input[0] != tensor or list(node.input).count(tensor) != 1:
        return False
    if node.op_type == "Conv":
        return _float_const(g, node.input[1]) is not None
    return node.op_type == "QuantizeLinear" and _float_const(g, node.input[1]) is not None


def _scaled(g: GraphIndex, names: FreshNames, name: str, factor: float) -> str:
    value = g.const(name)
    assert value is not None
    return g.add_initializer(names.fresh(f"{name}_swish_rescaled"), (value * factor).astype(value.dtype))


def restore_hard_swish(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every float hard-swish block that allows it back at alpha 1/6; how many."""
    result = onnx.ModelProto.FromString(model.SerializeToString())
    g, names, restored = GraphIndex(result.graph), FreshNames(result), 0
    for hsig in [n for n in result.graph.node if n.op_type == "HardSigmoid"]:
        found = _block(g, hsig)
        if found is None:
            continue
        conv, mul, add = found
        c = 1.0 / (6.0 * float(attrs(hsig).get("alpha", 0.2)))
        for k in (1, 2) if len(conv.input) > 2 and conv.input[2] else (1,):
            g.set_input(conv, k, _scaled(g, names, conv.input[k], 1.0 / c))
        for attribute in [a for a in hsig.attribute if a.name == "alpha"]:
            hsig.attribute.remove(attribute)
        hsig.attribute.append(helper.make_attribute("alpha", SWISH_ALPHA))
        tail = mul.output[0]
        if add is not None:
            shift = _scalar_shift(g, add, tail)[0]
            g.replace_input(add, shift, _scaled(g, names, shift, 1.0 / c))
            tail = add.output[0]
        for node in list(g.readers(tail)):
            g.set_input(node, 1, _scaled(g, names, node.input[1], c if node.op_type == "Conv" else 1.0 / c))
        restored += 1
    if restored:
        drop_unused_initializers(result)
    return result, restored
