"""The search's "leading" float-kept sets along the trunk (passes/_quantize/trunk.py) on PP-OCRv4 det.

The exporter writes the neck's lateral convs and squeeze-excites right after the backbone stages they read, so the
plain graph-order prefix keeps them float; the trunk prefix keeps only what leads to the furthest backbone node.
"""

from __future__ import annotations

import pytest
from conftest import needs_ocr
from det_int8 import quantized_det
from lepton_cli.passes._quantize.sensitivity import quantized_nodes
from lepton_cli.passes._quantize.trunk import TrunkPrefixes


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    return quantized_det(tmp_path_factory)


@needs_ocr
def test_trunk_prefixes_leave_the_necks_side_branches_int8_and_grow_monotonically(det):
    _, int8, _ = det
    order = quantized_nodes(int8)
    prefixes = TrunkPrefixes(int8, order)
    sets = [prefixes.prefix(k) for k in range(1, len(order) + 1)]
    for k, chosen in enumerate(sets, start=1):
        assert set(chosen) <= set(order[:k])
    for smaller, larger in zip(sets, sets[1:]):  # the bisection needs a larger k to keep at least as much float
        assert set(smaller) <= set(larger)
    kinds = {n.name: n.op_type for n in int8.graph.node}
    left = [n for n in order[:43] if n not in prefixes.prefix(43)]
    assert sum(kinds[n] == "Conv" for n in left) >= 4  # lateral 1×1 convs and the squeeze-excite convs
    assert "p2o.Conv.0" in prefixes.prefix(43) and "p2o.Conv.33" in left  # the stem stays, stage 1's lateral goes


def test_a_plain_chain_keeps_the_graph_order_prefix():
    """Without side branches the trunk prefix is the graph-order prefix."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        x = f"c{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 2, 3, 3])],
        inits,
    )
    order = [n.name for n in nodes]
    prefixes = TrunkPrefixes(helper.make_model(graph), order)
    assert [prefixes.prefix(k) for k in range(1, 5)] == [order[:k] for k in range(1, 5)]
