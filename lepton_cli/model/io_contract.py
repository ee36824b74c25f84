"""What a compiled model's inputs and outputs mean relative to the source's: its I/O contract.

A pass that changes how data enters or leaves the model records it in the model metadata:
``lepton.io_layout.<tensor>`` = ``NHWC`` (layout_transform's channels-last I/O) and
``lepton.io_quant.<tensor>`` = JSON scale/zero point/type (quantize's integer I/O). Everything that feeds
source-form data (NCHW, float) to a compiled model, or compares its outputs with the source's, goes
through ``IoContract``: the pipeline's checks, the scorer, calibration, latency, the device-side session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

LAYOUT_KEY = "lepton.io_layout."
IO_QUANT_KEY = "lepton.io_quant."


def quantize_array(value: np.ndarray, quant: dict[str, Any]) -> np.ndarray:
    """``q = clip(round(x / scale) + zero_point)`` in the integer type ``quant`` names."""
    info = np.iinfo(quant["dtype"])
    q = np.round(value.astype(np.float64) / quant["scale"]) + quant["zero_point"]
    return np.clip(q, info.min, info.max).astype(quant["dtype"])


def dequantize_array(value: np.ndarray, quant: dict[str, Any]) -> np.ndarray:
    zero_point, scale = np.float32(quant["zero_point"]), np.float32(quant["scale"])
    return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)


def _nchw_to_nhwc(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(0, 2, 3, 1))


def _nhwc_to_nchw(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class IoContract:
    """Per tensor name: its layout when not the source's, and its integer quantization when not float."""

    layouts: dict[str, str] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> IoContract:
        layouts = {key[len(LAYOUT_KEY) :]: value for key, value in metadata.items() if key.startswith(LAYOUT_KEY)}
        quant = {
            key[len(IO_QUANT_KEY) :]: json.loads(value)
            for key, value in metadata.items()
            if key.startswith(IO_QUANT_KEY)
        }
        return cls(layouts, quant)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> IoContract:
        return cls.from_metadata({prop.key: prop.value for prop in model.metadata_props})

    def is_nhwc(self, name: str) -> bool:
        return self.layouts.get(name) == "NHWC"

    def adapt(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A source-form feed (NCHW, float) as the compiled model takes it: its layout, then its integer type."""
        out = {}
        for name, value in feed.items():
            if self.is_nhwc(name) and value.ndim == 4:
                value = _nchw_to_nhwc(value)
            if name in self.quant and np.issubdtype(value.dtype, np.floating):
                value = quantize_array(value, self.quant[name])
            out[name] = value
        return out

    def restore(self, name: str, value: np.ndarray) -> np.ndarray:
        """An output of the compiled model in the source's form (float, NCHW)."""
        if name in self.quant and np.issubdtype(value.dtype, np.integer):
            value = dequantize_array(value, self.quant[name])
        return _nhwc_to_nchw(value) if self.is_nhwc(name) and value.ndim == 4 else value


def adapt_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return IoContract.of(model).adapt(feed)


def restore_output(model: onnx.ModelProto, name: str, value: np.ndarray) -> np.ndarray:
    return IoContract.of(model).restore(name, value)


def io_layout(model: onnx.ModelProto, name: str) -> str | None:
    return IoContract.of(model).layouts.get(name)


def io_quant(model: onnx.ModelProto, name: str) -> dict[str, Any] | None:
    """The quantization of an integer graph input/output, or None for a float one."""
    return IoContract.of(model).quant.get(name)


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    prop = next((p for p in model.metadata_props if p.key == key), None)
    if prop is None:
        prop = model.metadata_props.add()
        prop.key = key
    prop.value = value


def mark_nhwc(model: onnx.ModelProto, name: str) -> None:
    _set_metadata(model, LAYOUT_KEY + name, "NHWC")


def mark_integer(model: onnx.ModelProto, name: str, quant: dict[str, Any]) -> None:
    _set_metadata(model, IO_QUANT_KEY + name, json.dumps(quant))
