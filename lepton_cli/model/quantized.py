"""Which nodes of a model are quantization ops (QDQ, QOperator, ONNX Runtime's dynamic and contrib forms)."""

from __future__ import annotations

from collections import Counter

import onnx

QUANTIZED_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "DequantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "QAttention",
        "DynamicQuantizeLSTM",
    }
)


def quantized_ops(model: onnx.ModelProto) -> Counter:
    """Count of quantization ops in the main graph and every subgraph (empty: a float model)."""
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                counts[node.op_type] += 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(sub)

    walk(model.graph)
    return counts
