"""Shorter names for the tensors and nodes ONNX Runtime's quantizer adds.

quantize_static names what it adds by appending ``_QuantizeLinear_Output``, ``_DequantizeLinear_Output``,
``_quantized_scale``, ``_zero_point``... to the original tensor name. In a small int8 model those
strings weigh as much as a layer (5 % of a detector's int8 file). The original names (the source model's tensors, graph
inputs and outputs) are kept as they are, so a compiled tensor can still be traced to the source; only
the added suffixes are abbreviated (``x~dq``, ``w~q.s``, ...). No library does this (checked: onnx's
compose/utils, onnxsim, ORT's quantization tools keep every name).
"""

from __future__ import annotations

import onnx

from lepton_cli.model.graph_edit import subgraph_names

# Longest first: "_quantized_scale" must be shortened as a whole before "_scale" is.
SUFFIXES = (
    ("_DequantizeLinear_Output", "~dq"),
    ("_QuantizeLinear_Output", "~q"),
    ("_DequantizeLinear", "~DQ"),
    ("_QuantizeLinear", "~Q"),
    ("_quantized_scale", "~q.s"),
    ("_quantized_zero_point", "~q.z"),
    ("_quantized", "~q"),
    ("_zero_point", "~z"),
    ("_scale", "~s"),
)


def _short(name: str, kept: set[str]) -> str:
    for long, short in SUFFIXES:
        if name.endswith(long):
            stem = name[: -len(long)]  # a source name ending in "_scale" stays whole
            return (stem if stem in kept else _short(stem, kept)) + short
    return name


def shorten_added_names(model: onnx.ModelProto, original: set[str]) -> int:
    """Rename, in place, tensors and nodes whose names are not in ``original``; returns the characters saved."""
    graph = model.graph
    kept = original | {v.name for v in list(graph.input) + list(graph.output)} | subgraph_names(graph)
    tensors = {t.name for t in graph.initializer} | {x for n in graph.node for x in list(n.input) + list(n.output) if x}
    taken = set(tensors) | {n.name for n in graph.node}
    rename: dict[str, str] = {}
    for name in sorted(tensors - kept):
        new = _short(name, kept)
        if new == name:
            continue
        candidate, k = new, 1
        while candidate in taken:  # never merge two tensors
            k += 1
            candidate = f"{new}{k}"
        taken.add(candidate)
        rename[name] = candidate
    saved = sum(len(a) - len(b) for a, b in rename.items())
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for vi in graph.value_info:
        vi.name = rename.get(vi.name, vi.name)
    node_names = {n.name for n in graph.node}
    for node in graph.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
        if node.name and node.name not in original:
            short = _short(node.name, original)
            if short != node.name and short not in node_names:
                saved += len(node.name) - len(short)
                node_names.add(short)
                node.name = short
    return saved
