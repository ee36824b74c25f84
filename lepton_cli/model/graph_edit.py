"""Use-def bookkeeping and clean-up shared by the graph rewrites (fuse, fuse_activation, layout_transform, channel_groups)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.model.external_data import tensor_array


class GraphIndex:
    """Just enough use-def bookkeeping over a GraphProto for local folds: constants, uses, outputs."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.uses: Counter = Counter(i for n in graph.node for i in n.input if i)
        for node in graph.node:  # names read inside subgraphs count as uses too
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    self.uses.update(i for n in sub.node for i in n.input if i)

    def const(self, name: str) -> np.ndarray | None:
        return tensor_array(self.inits[name]) if name in self.inits else None

    def set_const(self, name: str, value: np.ndarray) -> str:
        stem = name.split("__fused")[0]  # a constant folded again keeps one suffix, not one per fold
        new, k = f"{stem}__fused", 1
        while new in self.inits:
            k += 1
            new = f"{stem}__fused{k}"
        tensor = numpy_helper.from_array(value, new)
        self.graph.initializer.append(tensor)
        self.inits[new] = tensor
        return new

    def sole_use(self, tensor: str) -> bool:
        return self.uses[tensor] == 1 and tensor not in self.outputs


def subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Names read inside subgraphs (If/Loop/Scan bodies), at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names.update(i for n in sub.node for i in n.input)
                names |= subgraph_names(sub)
    return names


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers nothing reads (and, for old-IR models, their graph-input entries)."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | subgraph_names(graph)
    dropped = {t.name for t in graph.initializer if t.name not in used}
    if dropped:  # old-IR models list initializers as graph inputs too: drop both
        keep = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [i for i in graph.input if i.name not in dropped]
        del graph.input[:]
        graph.input.extend(inputs)
