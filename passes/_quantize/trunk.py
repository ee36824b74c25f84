"""The leading quantized nodes along the network's trunk: the float-kept sets of the search's "leading" rule.

The leading k quantized nodes in graph order also take the side branches an exporter writes next to the trunk: in
PP-OCRv4 det the neck's lateral convs and squeeze-excites read the early stages, so "43 leading" kept 12 of them
float for nothing (bypassing any one moves the held-out map by under 0.05 points). Here the k leading nodes keep
float only those that lead to the trunk node furthest along among them: the trunk is the longest chain of quantized
nodes from an input to an output, so a later prefix's set holds an earlier one's (the search's bisection needs it).
PP-OCRv4 det then keeps 34 float where it kept 47, at the same latency and worst page (results/det_neck_head.md).
"""

from __future__ import annotations

import onnx

from lepton_cli.model.graph_edit import GraphIndex


class TrunkPrefixes:
    """``prefix(k)``: the nodes of ``order[:k]`` that are the furthest trunk node among them or lead to it."""

    def __init__(self, model: onnx.ModelProto, order: list[str]):
        self.order = order
        self.index = GraphIndex(model.graph)
        self.nodes = {n.name: n for n in model.graph.node if n.name}
        self.trunk = self._longest_chain(model, set(order))

    def _longest_chain(self, model: onnx.ModelProto, counted: set[str]) -> set[str]:
        """The nodes on the path from an input to an output through the most ``counted`` nodes."""
        depth: dict[int, int] = {}
        via: dict[int, onnx.NodeProto | None] = {}
        for node in model.graph.node:  # topological in a valid ONNX graph
            parents = [self.index.producer[i] for i in node.input if i in self.index.producer]
            best = max(parents, key=lambda p: depth[id(p)], default=None)
            depth[id(node)] = (depth[id(best)] if best is not None else 0) + (node.name in counted)
            via[id(node)] = best
        ends = [self.index.producer[o.name] for o in model.graph.output if o.name in self.index.producer]
        node = max(ends, key=lambda n: depth[id(n)], default=None)
        chain = set()
        while node is not None:
            chain.add(node.name)
            node = via[id(node)]
        return chain

    def _ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        stack = [self.nodes[name]]
        while stack:
            for tensor in stack.pop().input:
                parent = self.index.producer.get(tensor)
                if parent is not None and parent.name not in seen:
                    seen.add(parent.name)
                    stack.append(parent)
        return seen

    def prefix(self, k: int) -> list[str]:
        leading = self.order[:k]
        furthest = next((n for n in reversed(leading) if n in self.trunk and n in self.nodes), None)
        if furthest is None:  # no trunk node yet (or unnamed nodes): the plain prefix
            return leading
        upstream = self._ancestors(furthest)
        return [n for n in leading if n == furthest or n in upstream]
