"""Hard activations and constant divisions as the ops an integer-only chip runs: Add, Clip and Mul.

The Edge TPU's operation table has no DIV, HARD_SWISH or hard-sigmoid (lepton_cli/device_artifacts/edgetpu.py), and
its compiler hands the first op it cannot map *and every op after it* to the host. A hard-swish network written with
``Div(6)`` (MobileNetV3, PP-LCNet) or with ``HardSigmoid``/``HardSwish`` ops left all of them float on tpu, most of the
graph on the host. On a target whose ``supported_ops`` lists Add, Clip and Mul but not the op:

* ``Div(x, c)``, c a constant with no zero  ->  ``Mul(x, 1/c)``;
* ``HardSigmoid(x; a, b)``, a > 0  ->  ``Mul(Clip(Add(x, b/a), 0, 1/a), a)`` (= clip(a·x + b, 0, 1));
* ``HardSwish(x)``  ->  ``Mul(Mul(x, Clip(Add(x, 3), 0, 6)), 1/6)``, Paddle's own form: the 1/6 then folds into a
  Conv that reads it, one int8 rounding fewer than ``x`` times a quantized gate (PP-OCRv5 rec on tpu, session 47).

Each is the same function up to float rounding (fuse's tolerance); the quantizer then gives every step an int8 grid
(ONNX Runtime folds the Clip into the Add's output range, which clamps the same).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, refill_nodes
from lepton_cli.model.op_traits import attrs
from lepton_cli.model.shapes import elem_types

CHIP_OPS = ("Add", "Clip", "Mul")
OTHER_FLOATS = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _applies(supported: list[str] | tuple[str, ...]) -> bool:
    """Only a target that names its ops, runs Add/Clip/Mul and lacks HardSigmoid (where it has it, fuse writes
    hard-swish as ``x * HardSigmoid(x)`` instead)."""
    return bool(supported) and "HardSigmoid" not in supported and all(op in supported for op in CHIP_OPS)


def _reciprocal(g: GraphIndex, node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Div" or len(node.input) != 2:
        return None
    divisor = g.const(node.input[1])
    if divisor is None or not np.issubdtype(divisor.dtype, np.floating) or not np.all(divisor != 0):
        return None
    with np.errstate(over="ignore"):
        reciprocal = (np.ones((), divisor.dtype) / divisor).astype(divisor.dtype)
    return reciprocal if np.all(np.isfinite(reciprocal)) else None  # a subnormal divisor: x / d is not x * inf


def _constant(names: FreshNames, g: GraphIndex, name: str, value: float) -> str:
    return g.add_initializer(names.fresh(name), np.asarray(value, np.float32))


def _clipped_shift(
    names: FreshNames, g: GraphIndex, x: str, alpha: float, beta: float, base: str
) -> tuple[list[onnx.NodeProto], str]:
    """``clip(x + beta/alpha, 0, 1/alpha)`` (Add, Clip) and its output: alpha times it is clip(alpha·x + beta, 0, 1)."""
    shifted, clipped = names.fresh(base + "_shifted"), names.fresh(base + "_clipped")
    shift = _constant(names, g, base + "_shift", beta / alpha)
    bounds = [_constant(names, g, base + "_low", 0.0), _constant(names, g, base + "_high", 1.0 / alpha)]
    nodes = [
        helper.make_node("Add", [x, shift], [shifted], name=names.fresh(base + "_add")),
        helper.make_node("Clip", [shifted, *bounds], [clipped], name=names.fresh(base + "_clip")),
    ]
    return nodes, clipped


def _scaled(names: FreshNames, g: GraphIndex, x: str, alpha: float, out: str, base: str) -> onnx.NodeProto:
    slope = _constant(names, g, base + "_slope", alpha)
    return helper.make_node("Mul", [x, slope], [out], name=names.fresh(base + "_scale"))


def _replacement(names: FreshNames, g: GraphIndex, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    base, x, out = node.name or node.output[0], node.input[0], node.output[0]
    if node.op_type == "Div":
        reciprocal = _reciprocal(g, node)
        if reciprocal is None:
            return None
        factor = g.add_initializer(names.fresh(base + "_reciprocal"), reciprocal)
        return [helper.make_node("Mul", [x, factor], [out], name=names.fresh(base + "_mul"))]
    if node.op_type == "HardSigmoid":
        a = attrs(node)
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        if alpha <= 0:
            return None
        nodes, clipped = _clipped_shift(names, g, x, alpha, beta, base)
        return [*nodes, _scaled(names, g, clipped, alpha, out, base)]
    if node.op_type == "HardSwish":  # as Paddle writes it out, (x * relu6(x + 3)) / 6: the 1/6 can fold into a Conv
        nodes, clipped = _clipped_shift(names, g, x, 1.0 / 6.0, 0.5, base)
        product = names.fresh(base + "_product")
        mul = helper.make_node("Mul", [x, clipped], [product], name=names.fresh(base + "_mul"))
        return [*nodes, mul, _scaled(names, g, product, 1.0 / 6.0, out, base)]
    return None


def as_integer_chip_ops(model: onnx.ModelProto, supported: list[str] | tuple[str, ...]) -> int:
    """Rewrite, in place, each constant Div, HardSigmoid and HardSwish the target does not list; how many."""
    if not _applies(supported):
        return 0
    wanted = {op for op in ("Div", "HardSigmoid", "HardSwish") if op not in supported}
    if set(elem_types(model).values()) & OTHER_FLOATS:
        wanted -= {"HardSigmoid", "HardSwish"}  # their new constants are float32: not in an fp16 model
    if not any(n.op_type in wanted for n in model.graph.node):
        return 0
    g, names = GraphIndex(model.graph), FreshNames(model)
    nodes: list[onnx.NodeProto] = []
    done = 0
    for node in model.graph.node:
        found = _replacement(names, g, node) if node.op_type in wanted else None
        nodes.extend(found if found is not None else [node])
        done += found is not None
    if done:
        refill_nodes(model, nodes)
    return done
