"""What every scheme plan offers the quantize pass; the pass picks one plan per run and asks it, not the scheme name.

* ``RewritePlan`` (``rewrites.py``): weights rewritten in one step, no calibration and no search
  (int8 weight-only, dynamic int8, int4 MatMulNBits, and static int8's fallback without --calib);
* ``SearchPlan``: candidates calibrated, scored against the source and searched within the accuracy
  budget by the tuner (``int8_plan.Int8Plan``: static QDQ int8, with power-of-two scales for a DPU or
  integer I/O for a full-integer accelerator; ``fp16_plan.Fp16Plan``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import onnx
from lepton_cli.passes._quantize.tuning import SearchSpace

from lepton_cli.model.contrib_shapes import DYNAMIC_LSTM
from lepton_cli.pipeline.registry import BudgetUse, PassResult
from lepton_cli.samples.sample_set import SampleSet

Rewrite = Callable[[onnx.ModelProto, Any], PassResult]  # (model, context) -> the pass's result


@dataclass(frozen=True)
class RewritePlan:
    scheme: str
    rewrite: Rewrite
    whole_model: bool  # ORT's quantizers take one whole protobuf: external data is read in first


class SearchPlan(ABC):
    """A scheme whose candidates the tuner scores: it builds them, then finishes the chosen one."""

    whole_model = True

    @abstractmethod
    def space(self, model: onnx.ModelProto, ctx: Any, calib: SampleSet, summary: dict[str, Any]) -> SearchSpace:
        """The candidates to search, facts about them recorded in ``summary``."""

    @abstractmethod
    def finish(
        self,
        source: onnx.ModelProto,
        result: onnx.ModelProto,
        ctx: Any,
        summary: dict[str, Any],
        budget_use: BudgetUse | None,
    ) -> PassResult:
        """The pass's result from the chosen candidate."""

    def report_recovery(self, evaluator: Any, best: Any, ctx: Any, summary: dict[str, Any]) -> None:
        """Record in ``summary`` what each enabled accuracy-recovery step gained (plans without steps: nothing)."""


def int8_weights(model: onnx.ModelProto) -> int:
    """int8/uint8 initializers of rank >= 2: weights (zero points are scalars or vectors, but DynamicQuantizeLSTM's
    are [directions, rows])."""
    lstm_zero_points = {n.input[i] for n in model.graph.node if n.op_type == DYNAMIC_LSTM for i in (9, 11)}
    return sum(
        1
        for i in model.graph.initializer
        if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        and len(i.dims) >= 2
        and i.name not in lstm_zero_points
    )
