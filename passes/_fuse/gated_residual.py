"""``x + x * g`` with a gate smaller than x (a squeeze-excite's [1, C, 1, 1]) as ``x * (1 + g)``.

PP-OCR det's RSE-FPN neck adds each feature map to its squeeze-excited self: two passes over the map (Mul, Add)
where one does, the ``+ 1`` going to the gate's C values. Exact in real arithmetic; float rounding differs by an ulp.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex
from lepton_cli.model.stats import inferred_values


def _typed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    """(element type, dims) of every tensor whose shape inference knows every dimension."""
    known = {}
    for value in inferred_values(model):
        tensor = value.type.tensor_type
        if tensor.elem_type and all(d.HasField("dim_value") for d in tensor.shape.dim):
            known[value.name] = (tensor.elem_type, [d.dim_value for d in tensor.shape.dim])
    return known


def _gated(g: GraphIndex, add: onnx.NodeProto) -> tuple[onnx.NodeProto, str, str] | None:
    """(Mul, x, gate) where ``add`` is Add(x, Mul(x, gate)) in either order and nothing else reads the Mul."""
    if add.op_type != "Add" or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    for x, product in (add.input, reversed(add.input)):
        mul = g.producer.get(product)
        if mul is None or mul.op_type != "Mul" or g.only_reader(product) is not add:
            continue
        if len(mul.input) == 2 and x in mul.input and mul.input[0] != mul.input[1]:
            return mul, x, mul.input[1] if mul.input[0] == x else mul.input[0]
    return None


def fold_gated_residuals(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each ``x + x * g`` whose float gate has fewer elements than x; how many."""
    g, names = GraphIndex(model.graph), FreshNames(model)
    shapes = _typed_shapes(model)
    folded = 0
    for add in [n for n in model.graph.node if n.op_type == "Add"]:
        found = _gated(g, add)
        if found is None:
            continue
        mul, x, gate = found
        if gate not in shapes or x not in shapes or shapes[gate][0] != shapes[x][0]:
            continue
        elem_type, gate_dims = shapes[gate]
        if elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        if int(np.prod(gate_dims)) >= int(np.prod(shapes[x][1])):
            continue  # a full-size gate: x * (1 + g) is two passes too
        one = g.add_initializer(
            names.fresh(gate + "_one"), np.array(1, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
        )
        plus_one = helper.make_node("Add", [gate, one], [names.fresh(gate + "_plus_one")], name=names.fresh(add.name))
        g.set_input(mul, list(mul.input).index(gate), plus_one.output[0])
        output = add.output[0]
        g.remove(add)
        g.set_output(mul, 0, output)
        g.insert(g.position(mul), plus_one)
        folded += 1
    return folded
