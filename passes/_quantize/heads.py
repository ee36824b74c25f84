"""Output heads whose values one int8 scale cannot hold, found from the graph and calibration data.

Walking back from each graph output through data-movement ops (which copy values, so they share
their input's quantization), two kinds of last block lose what the application reads:
* a Concat whose inputs have ranges far apart (a detector's box offsets next to its 0..1 scores):
  quantizing the Concat's output gives every part the widest part's scale, and the scores keep a
  few levels (or none). Each input already has its own scale at its producer; the Concat and the
  movement after it run in float on the dequantized parts, or in 16 bits;
* a decoding Softmax (class probabilities over thousands of classes, a DFL bin distribution):
  its output in 8 bits has 1/255 resolution, below which most probabilities vanish.
And one block at the other end: a Log fed from the graph's input through no activation (an audio model's log
spectrogram: framing Convs, magnitudes, a floor, then Log; a CQT's octave filters too). A power spectrum spans
60 dB and more; on an 8-bit grid set by its loudest bin every quieter bin reads 0, so the Log returns its floor
there (DNSMOS: a MOS off by 2.4 of 5). That front end stays out of int8 as a whole; a Log deeper in the network
keeps the element-wise ops that feed it.
Users of other tools name these nodes by hand (ignored scopes); here they come from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from lepton_cli.passes._quantize.sensitivity import tensor_runs

from lepton_cli.model.graph_edit import GraphIndex
from lepton_cli.model.op_traits import opset

MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity")
DECODING = ("Softmax", "LogSoftmax")
FRONT_END_NODES = 1024  # the walk back from a Log stops here (a cone this large is no feature front end)
# A learned network between the input and a Log: its cone holds activations; a spectrogram's (STFT, mel, CQT) does not
ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus"}
ACTIVATIONS |= {"Gelu", "Erf", "Softmax", "Mish"}
ELEMENTWISE = ("Abs", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Max", "Min", "Clip", "ReduceSum", "ReduceMean")


@dataclass
class Head:
    output: str  # the graph output it feeds (a front end: the Log's output)
    nodes: list[str]  # nodes to keep out of int8 (Concat/Softmax and the movement after it)
    why: str
    ranges: dict[str, float] = field(default_factory=dict)  # Concat input -> largest magnitude on calibration data
    front_end: bool = False  # a Log's input computation (a log spectrogram), not an output head


def _movement_chain(model: onnx.ModelProto, output: str) -> tuple[list[onnx.NodeProto], onnx.NodeProto | None]:
    """(movement nodes from ``output`` back, the first other node), each tensor on the way read once."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    chain: list[onnx.NodeProto] = []
    tensor = output
    while tensor in producer:
        node = producer[tensor]
        if node.op_type not in MOVEMENT:
            return chain, node
        chain.append(node)
        tensor = node.input[0]
        if readers.get(tensor, 0) != 1:
            break
    return chain, None


def _concat_tree(model: onnx.ModelProto, concat: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nested Concats (per-scale heads concatenated again) with the movement between them, and their leaf tensors."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    nodes, leaves = [concat], []
    for tensor in concat.input:
        chain, node = [], producer.get(tensor)
        while node is not None and node.op_type in MOVEMENT:
            chain.append(node)
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Concat":
            sub_nodes, sub_leaves = _concat_tree(model, node)
            nodes += chain + sub_nodes
            leaves += sub_leaves
        elif tensor not in inits:
            leaves.append(tensor)
    return nodes, leaves


def _absmax(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    peak: dict[str, float] = {}
    for values in tensor_runs(model, tensors, feeds, graph_outputs=True):
        for name, value in values.items():
            peak[name] = max(peak.get(name, 0.0), float(np.max(np.abs(value))) if value.size else 0.0)
    return peak


def _input_cone(g: GraphIndex, inputs: set[str], tensor: str) -> tuple[list[onnx.NodeProto], bool]:
    """(the nodes ``tensor`` is computed by, whether they are a feature front end: fed by a graph input through linear
    ops, magnitudes and data movement only, no activation), the walk cut past FRONT_END_NODES."""
    seen: dict[str, onnx.NodeProto] = {}  # by first output: names may repeat before quantize names them
    stack, from_input = [tensor], False
    while stack and len(seen) <= FRONT_END_NODES:
        name = stack.pop()
        from_input |= name in inputs
        node = g.producer.get(name)
        if node is not None and node.output[0] not in seen:
            seen[node.output[0]] = node
            stack += [i for i in node.input if i]
    nodes = list(seen.values())
    return nodes, from_input and len(seen) <= FRONT_END_NODES and not any(n.op_type in ACTIVATIONS for n in nodes)


def _elementwise_feed(g: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """The element-wise and movement ops that compute ``tensor`` back to the first other op (a weight layer)."""
    chain, stack = {}, [tensor]
    while stack:
        node = g.producer.get(stack.pop())
        if node is None or node.output[0] in chain or node.op_type not in ELEMENTWISE + MOVEMENT:
            continue
        chain[node.output[0]] = node
        stack += [i for i in node.input if i and i not in g.inits]
    return list(chain.values())


def find_log_front_ends(model: onnx.ModelProto) -> list[Head]:
    """Each Log's input computation that an 8-bit grid would floor (module docstring)."""
    logs = [n for n in model.graph.node if n.op_type == "Log"]
    if not logs:
        return []
    g, inputs = GraphIndex(model.graph), {i.name for i in model.graph.input}
    heads: list[Head] = []
    for log in logs:
        cone, front_end = _input_cone(g, inputs, log.input[0])
        nodes = cone if front_end else _elementwise_feed(g, log.input[0])
        if not nodes:
            continue
        where = f"a {len(cone)}-node front end from the graph input" if front_end else "element-wise ops"
        heads.append(
            Head(
                log.output[0],
                [n.name for n in nodes] + [log.name],
                f"Log of {where} (a log spectrogram: one 8-bit grid reads every bin under 1/255 of the loudest as 0)",
                front_end=True,
            )
        )
    return heads


def find_heads(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], ratio: float = 8.0) -> list[Head]:
    """Heads of ``model`` that int8 at one scale would break; ``ratio``: Concat inputs' range spread that counts."""
    heads: list[Head] = find_log_front_ends(model)
    concats: list[tuple[str, list[onnx.NodeProto], list[str]]] = []
    for output in model.graph.output:
        chain, last = _movement_chain(model, output.name)
        if last is None:
            continue
        if last.op_type in DECODING:
            heads.append(
                Head(
                    output.name,
                    [n.name for n in chain] + [last.name],
                    f"{last.op_type} feeds the output: 8-bit probabilities keep 1/255 steps",
                )
            )
        elif last.op_type == "Concat":
            tree, leaves = _concat_tree(model, last)
            concats.append((output.name, [n.name for n in chain] + [n.name for n in tree], leaves))
    if concats:
        ranges = _absmax(model, [t for _, _, leaves in concats for t in leaves], feeds)
        for output, nodes, leaves in concats:
            seen = {t: ranges[t] for t in leaves if t in ranges}
            live = [v for v in seen.values() if v > 0]
            if len(live) >= 2 and max(live) / min(live) >= ratio:
                heads.append(
                    Head(
                        output,
                        nodes,
                        f"Concat of ranges {min(live):.3g}..{max(live):.3g} "
                        f"({max(live) / min(live):.0f}x apart) feeds the output",
                        seen,
                    )
                )
    return heads


def head_overrides(model: onnx.ModelProto, nodes: list[str], activation_type: str) -> dict:
    """ORT extra options giving the head nodes' outputs 16-bit activations (A16W8 QDQ for those tensors).

    ORT's CPU EP runs 16-bit Q/DQ from opset 21, or as com.microsoft ops before it."""
    from onnxruntime.quantization import QuantType

    qtype = QuantType.QUInt16 if activation_type == "u8" else QuantType.QInt16
    wanted = set(nodes)
    tensors = [o for n in model.graph.node if n.name in wanted for o in n.output]
    return {
        "TensorQuantOverrides": {t: [{"quant_type": qtype}] for t in tensors},
        "UseQDQContribOps": opset(model) < 21,
    }
