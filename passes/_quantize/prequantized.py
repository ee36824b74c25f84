"""Models that arrive already quantized: which of their nodes are, and what the passes do about it.

A model with ``DynamicQuantizeLinear`` + ``ConvInteger`` (ONNX Runtime's ``quantize_dynamic``), a
QDQ model (``QuantizeLinear``/``DequantizeLinear`` around float ops) or QOperator nodes
(``QLinearConv``, ...) already made its precision choices. Lepton keeps them as they are:
- ``quantize`` does not quantize again (int8 on int8 compounds the error, and ORT's quantizer fails
  on the existing scale tensors: ``KeyError: '140_scale'``) nor convert to fp16 around integer ops;
  it returns the model unchanged with a warning and the counts in its report summary;
- ``fuse`` skips its activation rewrites (hard-swish, scalar affine folds): they change float rounding
  by an ulp, and a dynamic quantizer reading that tensor then picks another scale for the whole
  tensor.
The float model is what Lepton's own int8/fp16 (tuned to the accuracy budget) starts from.
"""

from __future__ import annotations

from collections import Counter

import onnx

from lepton_cli.model.quantized import QUANTIZED_OPS, quantized_ops  # noqa: F401  (re-exported)


def describe(counts: Counter) -> str:
    """'47 DynamicQuantizeLinear, 38 ConvInteger, 9 MatMulInteger'."""
    return ", ".join(f"{n} {op}" for op, n in counts.most_common())


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether a node of the main graph has an If/Loop/Scan body (ORT's static quantizer does not enter them)."""
    return any(a.type == onnx.AttributeProto.GRAPH or a.graphs for n in model.graph.node for a in n.attribute)
