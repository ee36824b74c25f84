"""The float element-wise work between int8 layers moved into integer kernels ORT fuses (``integer_elementwise``).

Scalar Adds before a quantize fold into its zero point (``scalar_add_fold.py``), then HardSigmoid gates become
quantized Adds and Sigmoid gates get their own quantize (``integer_gates.py``): in that order, a hard-swish ending
in PP-LCNetV3's ``+ b`` runs as QLinearAdd + QLinearMul. A Relu between two quantizes goes into the second
(``relu_fold.py``), a quantize after a Concat or nearest Resize moves above it (``quantize_hoist.py``), and an FPN's
quantized sum of a gated map and an upsampled one runs as QLinearMul + QLinearAdd (``gated_sum.py``); last, an
integer nearest upsample becomes channel-last copies (``upsample_copy.py``). Each rewrite names what it adds, so the
chosen model says what was rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
from lepton_cli.passes._quantize.gated_sum import GATED_SUM_SUFFIX, integer_gated_sums
from lepton_cli.passes._quantize.integer_gates import ADDED_SUFFIX, GATE_SUFFIX, integer_gates
from lepton_cli.passes._quantize.quantize_hoist import HOISTED_SUFFIX, hoist_quantizes
from lepton_cli.passes._quantize.relu_fold import RELU_FOLDED_SUFFIX, fold_rectifiers
from lepton_cli.passes._quantize.scalar_add_fold import FOLDED_SUFFIX, fold_scalar_adds
from lepton_cli.passes._quantize.upsample_copy import EXPANDED_SUFFIX, integer_upsamples

from lepton_cli.model.graph_edit import drop_unused_initializers


def integer_elementwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the rewrites applied and the constants they left unread removed (ORT warns about those)."""
    folded, _ = fold_scalar_adds(model)
    result = integer_gates(folded)
    fold_rectifiers(result)
    hoist_quantizes(result)
    integer_gated_sums(result)
    integer_upsamples(result)
    drop_unused_initializers(result)
    return result


@dataclass(frozen=True)
class LoweredBuild:
    """``before_lowering``'s candidates through ``integer_elementwise``; the unlowered build stays reachable for the
    sensitivity ranking, which bypasses nodes one at a time (``tuning.ranking_build``)."""

    before_lowering: Callable[[str, list[str]], onnx.ModelProto]

    def __call__(self, method: str, keep: list[str]) -> onnx.ModelProto:
        return integer_elementwise(self.before_lowering(method, keep))


def lowered(build: Callable[[str, list[str]], onnx.ModelProto]) -> LoweredBuild:
    return LoweredBuild(build)


def rewritten(model: onnx.ModelProto) -> dict[str, int]:
    """How many scalar Adds were folded, HardSigmoids made quantized Adds, gates given a quantize, Relus folded into
    a quantize, quantizes moved above a Concat or Resize input, gated sums lowered and integer upsamples made copies
    in ``model`` (before names are shortened)."""
    return {
        "scalar_adds_folded": sum(i.name.endswith(FOLDED_SUFFIX) for i in model.graph.initializer),
        "hardsigmoids_as_add": sum(n.name.endswith(ADDED_SUFFIX) for n in model.graph.node),
        "gates_quantized": sum(n.name.endswith(GATE_SUFFIX) for n in model.graph.node),
        "relus_folded": sum(n.name.endswith(RELU_FOLDED_SUFFIX) for n in model.graph.node),
        "quantizes_hoisted": sum(HOISTED_SUFFIX in n.name for n in model.graph.node),
        "gated_sums": sum(n.name.endswith(GATED_SUM_SUFFIX) for n in model.graph.node) // 2,  # gate + product
        "upsamples_expanded": sum(EXPANDED_SUFFIX in n.name for n in model.graph.node),
    }
