"""Facts about ONNX nodes that every rewrite asks: attributes, the default-domain opset, which ops carry weights."""

from __future__ import annotations

from typing import Any

import onnx

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops whose second input is a learned weight
DEFAULT_DOMAINS = ("", "ai.onnx")


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default`` when it is not set."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def opset(model: onnx.ModelProto) -> int:
    """The default domain's opset version (0 when the model does not import it)."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
