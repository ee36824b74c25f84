"""A ``.tflite`` in LiteRT's interpreter, with the I/O surface of ``BundleSession``.

Inputs are fed under the ONNX model's names in the source layout and float; the session
transposes to the model's NHWC inputs where the manifest says the input is channel-last, and
quantizes float feeds for an int8/uint8 input with the scale and zero point stored in the
``.tflite`` itself (outputs are dequantized and transposed back the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lepton_cli.errors import BadInputError
from lepton_cli.host.native_stderr import captured_stderr
from lepton_cli.model.io_contract import IoContract

RUNTIME = "LiteRT (ai-edge-litert)"
INSTALL_HINT = "pip install 'lepton-cli[tflite]' (ai-edge-litert; tensorflow-cpu to compile)"


@dataclass(frozen=True)
class IOArg:
    """What ``session.get_inputs()`` gives in ONNX Runtime: name, shape, type."""

    name: str
    shape: list[int]
    type: str


_TYPES = {
    np.dtype(np.float32): "tensor(float)",
    np.dtype(np.int8): "tensor(int8)",
    np.dtype(np.uint8): "tensor(uint8)",
    np.dtype(np.int32): "tensor(int32)",
    np.dtype(np.int64): "tensor(int64)",
}


def interpreter_class() -> Any:
    """LiteRT's ``Interpreter``; exit 2 naming the extra when it is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BadInputError("LiteRT is not installed: the .tflite cannot run here", INSTALL_HINT) from None
    return Interpreter


class LiteRTSession:
    def __init__(
        self, data: bytes, names: dict[str, dict[str, str]], layouts: dict[str, str], threads: int | None = None
    ):
        with captured_stderr():  # LiteRT announces its XNNPACK delegate on fd 2
            self.interpreter = interpreter_class()(model_content=data, num_threads=threads)
        self.runner = self.interpreter.get_signature_runner()
        self.in_names, self.out_names = names["inputs"], names["outputs"]  # ONNX name -> signature name
        self.in_details = self.runner.get_input_details()
        self.out_details = self.runner.get_output_details()
        quant = {name: self._quant(self.in_details[sig]) for name, sig in self.in_names.items()}
        quant |= {name: self._quant(self.out_details[sig]) for name, sig in self.out_names.items()}
        self.contract = IoContract(dict(layouts), {name: q for name, q in quant.items() if q is not None})

    @staticmethod
    def _quant(detail: dict[str, Any]) -> dict[str, Any] | None:
        dtype = np.dtype(detail["dtype"])
        if not np.issubdtype(dtype, np.integer):
            return None
        scale, zero = detail["quantization"]
        return {"scale": float(scale), "zero_point": int(zero), "dtype": dtype.name}

    def get_inputs(self) -> list[IOArg]:
        return [
            IOArg(
                onnx,
                [int(d) for d in self.in_details[sig]["shape"]],
                _TYPES.get(np.dtype(self.in_details[sig]["dtype"]), "tensor(float)"),
            )
            for onnx, sig in self.in_names.items()
        ]

    def get_outputs(self) -> list[IOArg]:
        return [
            IOArg(
                onnx,
                [int(d) for d in self.out_details[sig]["shape"]],
                _TYPES.get(np.dtype(self.out_details[sig]["dtype"]), "tensor(float)"),
            )
            for onnx, sig in self.out_names.items()
        ]

    def get_providers(self) -> list[str]:
        return [RUNTIME]

    def _adapt(self, name: str, value: np.ndarray) -> np.ndarray:
        detail = self.in_details[self.in_names[name]]
        return np.ascontiguousarray(self.contract.adapt({name: value})[name].astype(detail["dtype"]))

    def _restore(self, name: str, value: np.ndarray) -> np.ndarray:
        return self.contract.restore(name, value)

    def run(
        self, output_names: list[str] | None, feed: dict[str, np.ndarray], run_options: Any = None
    ) -> list[np.ndarray]:
        result = self.runner(**{self.in_names[name]: self._adapt(name, value) for name, value in feed.items()})
        names = output_names or list(self.out_names)
        return [self._restore(name, np.asarray(result[self.out_names[name]])) for name in names]
