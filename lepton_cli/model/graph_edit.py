"""Use-def bookkeeping, fresh names and clean-up shared by the graph rewrites (fuse, layout_transform, prune)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_cli.model.external_data import tensor_array
from lepton_cli.model.stats import shape_map


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The If/Loop/Scan bodies held by ``node``'s attributes."""
    return [
        sub
        for attr in node.attribute
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    ]


class GraphIndex:
    """Use-def chains over one GraphProto's main-graph nodes: constants, producers, readers, uses, outputs.

    Edits made through its methods (``reorder`` included) keep it current; an edit made on the protobuf
    directly needs a new index, and so does refilling ``graph.node`` (that puts new node objects in the graph).
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self._build()

    def _build(self) -> None:
        graph = self.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.uses: Counter = Counter()  # reads per name, reads inside subgraphs included
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}  # one entry per read, main graph only
        for node in graph.node:
            self._register(node)
            for sub in node_subgraphs(node):  # names read inside subgraphs count as uses too
                self.uses.update(i for n in sub.node for i in n.input if i)

    def _register(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self.uses[name] += 1
                self.consumers.setdefault(name, []).append(node)
        for name in node.output:
            if name:
                self.producer[name] = node

    def _unregister(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self._forget_read(node, name)
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]

    def _forget_read(self, node: onnx.NodeProto, name: str) -> None:
        self.uses[name] -= 1
        readers = self.consumers[name]
        del readers[next(k for k, reader in enumerate(readers) if reader is node)]

    # -- constants --
    def const(self, name: str) -> np.ndarray | None:
        return tensor_array(self.inits[name]) if name in self.inits else None

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        """Append ``value`` as initializer ``name`` (the caller picks a fresh name); returns the name."""
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def set_const(self, name: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``, named after constant ``name`` with a ``__fused`` suffix."""
        stem = name.split("__fused")[0]  # a constant folded again keeps one suffix, not one per fold
        new, k = f"{stem}__fused", 1
        while new in self.inits:
            k += 1
            new = f"{stem}__fused{k}"
        return self.add_initializer(new, value)

    # -- reads --
    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The main-graph nodes reading ``tensor``, once per read."""
        return self.consumers.get(tensor, [])

    def sole_use(self, tensor: str) -> bool:
        return self.uses[tensor] == 1 and tensor not in self.outputs

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The one node reading ``tensor``, when nothing else (a subgraph, the graph's outputs) reads it."""
        users = self.readers(tensor)
        return users[0] if len(users) == 1 and self.sole_use(tensor) else None

    # -- edits that keep the index current --
    def set_input(self, node: onnx.NodeProto, k: int, name: str) -> None:
        old = node.input[k]
        if old:
            self._forget_read(node, old)
        node.input[k] = name
        if name:
            self.uses[name] += 1
            self.consumers.setdefault(name, []).append(node)

    def replace_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """``node`` reads ``new`` wherever it read ``old``."""
        for k, name in enumerate(node.input):
            if name == old:
                self.set_input(node, k, new)

    def replace_uses(self, old: str, new: str) -> None:
        """Every main-graph node reading ``old`` reads ``new`` instead (graph outputs and subgraphs unchanged)."""
        for node in list({id(n): n for n in self.readers(old)}.values()):  # a node reading it twice: once
            self.replace_input(node, old, new)

    def set_output(self, node: onnx.NodeProto, k: int, name: str) -> None:
        if self.producer.get(node.output[k]) is node:
            del self.producer[node.output[k]]
        node.output[k] = name
        if name:
            self.producer[name] = node

    def position(self, node: onnx.NodeProto) -> int:
        """Where ``node`` sits in ``graph.node`` (an insertion point before or after it)."""
        return next(i for i, n in enumerate(self.graph.node) if n is node or n == node)

    def insert(self, position: int, node: onnx.NodeProto) -> onnx.NodeProto:
        """Insert ``node`` (copied) at ``position`` of ``graph.node``; returns the copy the graph holds."""
        self.graph.node.insert(position, node)
        held = self.graph.node[position]
        self._register(held)
        return held

    def remove(self, node: onnx.NodeProto) -> None:
        self._unregister(node)
        self.graph.node.remove(node)

    def reorder(self, nodes: list[onnx.NodeProto]) -> None:
        """Make ``nodes`` (this graph's nodes, in a new order) the graph's node list, and index them again:
        refilling the list puts new node objects in the graph."""
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._build()


class FreshNames:
    """Names not yet used in a model (tensors, initializers, graph I/O and nodes alike)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.used = {t.name for t in g.initializer} | {v.name for v in g.input} | {v.name for v in g.output}
        self.used |= {o for n in g.node for o in n.output} | {i for n in g.node for i in n.input}
        self.used |= {n.name for n in g.node}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Names read inside subgraphs (If/Loop/Scan bodies), at any depth."""
    names: set[str] = set()
    for node in graph.node:
        for sub in node_subgraphs(node):
            names.update(i for n in sub.node for i in n.input)
            names |= subgraph_names(sub)
    return names


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Forget the recorded type and shape of ``names`` (a rewrite changed them; ONNX Runtime infers them again)."""
    kept = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def remove_unread_nodes(g: GraphIndex) -> int:
    """Remove, through ``g``, every node none of whose outputs anything reads (a graph output, a subgraph, another
    node), until none is left; how many. For a rewrite that left the nodes it replaced unread."""
    removed = 0
    while dead := [n for n in g.graph.node if all(not g.uses[o] and o not in g.outputs for o in n.output if o)]:
        for node in dead:
            g.remove(node)
        removed += len(dead)
    return removed


def refill_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """Make copies of ``nodes`` the graph's node list (copies: clearing the repeated field releases the
    originals), then drop the initializers nothing reads any more."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    drop_unused_initializers(model)


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


Match = TypeVar("Match")


@dataclass
class RewriteScope:
    """What a node-by-node rewrite reads and edits: the graph's use-def index, fresh names, the inferred shapes."""

    graph: GraphIndex
    names: FreshNames
    shapes: dict


def rewrite_each(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    match: Callable[[RewriteScope, onnx.NodeProto], Match | None],
    apply: Callable[[RewriteScope, onnx.NodeProto, Match], None],
) -> int:
    """For each of ``nodes`` that ``match`` finds a pattern at, ``apply`` the rewrite there (in place); how many.
    Initializers nothing reads any more are dropped after."""
    if not nodes:
        return 0
    scope, done = RewriteScope(GraphIndex(model.graph), FreshNames(model), shape_map(model)), 0
    for node in nodes:
        found = match(scope, node)
        if found is not None:
            apply(scope, node, found)
            done += 1
    if done:
        drop_unused_initializers(model)
    return done
