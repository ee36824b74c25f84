"""Topological order of a graph's nodes, keeping the existing order wherever it is already valid.

Needed after tools that append nodes out of order (ONNX Runtime's ``float16`` converter puts the
graph-input Casts after their consumers with ``keep_io_types``); why not a library's sorter:
docs/decisions.md, "Fuse and layout". Subgraphs (If/Loop bodies) see outer names, so they count as
inputs of their node.
"""

from __future__ import annotations

import heapq

import onnx

from lepton_cli.model.graph_edit import node_subgraphs


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    names = {name for name in node.input if name}
    for graph in node_subgraphs(node):
        local = (
            {o for n in graph.node for o in n.output}
            | {i.name for i in graph.input}
            | {t.name for t in graph.initializer}
        )
        for inner in graph.node:
            names |= _node_inputs(inner) - local
    return names


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Reorder ``graph.node`` in place (stable Kahn's algorithm), If/Loop/Scan bodies too (the fp16
    converter appends their Casts out of order as well); return whether anything moved."""
    moved = False
    for sub in _subgraphs(graph):
        moved = sort_topologically(sub) or moved
    nodes = list(graph.node)
    producer = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    deps = [
        {producer[name] for name in _node_inputs(node) if name in producer and producer[name] != index}
        for index, node in enumerate(nodes)
    ]
    users: list[list[int]] = [[] for _ in nodes]
    for index, needed in enumerate(deps):
        for dep in needed:
            users[dep].append(index)
    waiting = [len(d) for d in deps]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    if order == list(range(len(nodes))):
        return moved
    graph.ClearField("node")
    graph.node.extend(nodes[i] for i in order)
    return True


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [sub for node in graph.node for sub in node_subgraphs(node)]


def _reading_chain(start: int, nodes: list[onnx.NodeProto], readers: dict[str, list[int]]) -> list[int]:
    """``nodes[start]`` and every node of its graph that reads what it makes, transitively, in that order."""
    chain, queue = [start], [start]
    while queue:
        for out in nodes[queue.pop(0)].output:
            for reader in readers.get(out, []):
                if reader not in chain:
                    chain.append(reader)
                    queue.append(reader)
    return chain


def _produced(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines, its subgraphs included."""
    names = (
        {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    )
    for sub in _subgraphs(graph):
        names |= _produced(sub)
    return names


def move_into_subgraphs(graph: onnx.GraphProto) -> int:
    """Move each node that reads a tensor defined only inside one of its graph's If/Loop bodies into that
    body, with the nodes of this graph that read what it makes (a Cast pair around a node kept fp32); return how
    many moved. ONNX Runtime's fp16 converter puts the Casts of a node it keeps float inside an If branch in the
    main graph, where the branch's tensors do not exist (openWakeWord's verifier: Pow's two Casts)."""
    nodes = list(graph.node)
    local = {o for n in nodes for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    outputs, moved_away = {o.name for o in graph.output}, set()
    for index, node in enumerate(nodes):
        missing = [name for name in node.input if name and name not in local]
        home = next((sub for sub in _subgraphs(graph) if missing and all(m in _produced(sub) for m in missing)), None)
        if home is None or index in moved_away:
            continue
        chain = _reading_chain(index, nodes, readers)
        if any(o in outputs for k in chain for o in nodes[k].output):
            continue  # a graph output: a real dependency on the body's value, not a misplaced cast
        for k in chain:
            home.node.append(nodes[k])
        moved_away.update(chain)
    if moved_away:
        del graph.node[:]
        graph.node.extend(n for k, n in enumerate(nodes) if k not in moved_away)
    moved = len(moved_away)
    for sub in _subgraphs(graph):
        moved += move_into_subgraphs(sub)
    return moved
