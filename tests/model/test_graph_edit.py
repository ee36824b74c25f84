"""GraphIndex: the use-def index fuse and layout_transform edit through stays what a fresh index would say."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex


def _graph() -> onnx.GraphProto:
    then = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, [1])]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="A"),
        helper.make_node("Add", ["a", "c"], ["b"], name="B"),
        helper.make_node("Mul", ["b", "b"], ["y"], name="C"),  # reads b twice
        helper.make_node("If", ["cond"], ["z"], name="D", then_branch=then, else_branch=then),  # reads a inside
    ]
    return helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("cond", 9, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("y", "z")],
        [numpy_helper.from_array(np.ones(1, np.float32), "c")],
    )


def _state(ix: GraphIndex) -> tuple:
    """What an index says, with nodes named (a fresh index holds the same node objects, in graph order)."""
    return (
        +ix.uses,
        {k: sorted(n.name for n in v) for k, v in ix.consumers.items() if v},
        {k: n.name for k, n in ix.producer.items()},
        sorted(ix.inits),
        ix.outputs,
    )


def _assert_current(ix: GraphIndex) -> None:
    assert _state(ix) == _state(GraphIndex(ix.graph))


def test_fresh_index_counts_every_read_and_subgraph_reads():
    ix = GraphIndex(_graph())
    assert ix.uses == Counter({"b": 2, "a": 3, "x": 1, "c": 1, "cond": 1})  # a: B, then and else bodies
    assert [n.name for n in ix.readers("b")] == ["C", "C"]
    assert ix.only_reader("a") is None  # the If body reads it too
    assert ix.only_reader("x").name == "A" and ix.only_reader("y") is None  # y is a graph output
    assert ix.producer["b"].name == "B" and float(ix.const("c")[0]) == 1.0 and ix.const("x") is None


def test_edits_keep_the_index_current():
    graph = _graph()
    ix = GraphIndex(graph)
    b_node, c_node = ix.producer["b"], ix.producer["y"]
    ix.set_input(b_node, 1, ix.set_const("c", np.full(1, 2.0, np.float32)))
    _assert_current(ix)
    assert b_node.input[1] == "c__fused" and ix.set_const("c__fused", np.zeros(1, np.float32)) == "c__fused2"
    ix.replace_uses("b", "a")  # both of C's reads
    _assert_current(ix)
    assert list(c_node.input) == ["a", "a"] and ix.readers("b") == []
    ix.remove(b_node)
    _assert_current(ix)
    ix.set_output(c_node, 0, "y2")
    _assert_current(ix)
    added = ix.insert(0, helper.make_node("Neg", ["x"], ["n"], name="E"))
    _assert_current(ix)
    assert graph.node[0] is added and ix.producer["n"] is added
    ix.replace_input(added, "x", "a")
    _assert_current(ix)
    ix.reorder(list(reversed(graph.node)))
    _assert_current(ix)
    assert [n.name for n in graph.node] == ["D", "C", "A", "E"]
    assert ix.producer["n"] is graph.node[3]  # the index holds the graph's new node objects


def test_fresh_names_skip_every_name_in_use():
    model = helper.make_model(_graph())
    names = FreshNames(model)
    assert names.fresh("a") == "a_1" and names.fresh("a") == "a_2"
    assert names.fresh("B") == "B_1"  # node names count too
    assert names.fresh("new") == "new"
