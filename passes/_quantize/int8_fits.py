"""Steps fitted on each int8 model after ORT quantized it, not on the float source: the weights' rounding on the
int8 model's own layer inputs (``quantized_adaround.py``), then the biases against the float output means
(``quantized_bias.py``). What a step fitted is kept per (tier, method) and written back when the same model is built
again (the plan holds one int8 model at a time), so each is fitted once per compile.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from lepton_cli.passes._quantize.adaround import AdaRoundSettings
from lepton_cli.passes._quantize.quantized_adaround import refit_quantized_weights
from lepton_cli.passes._quantize.quantized_bias import correct_quantized_biases, write_initializers
from lepton_cli.passes._quantize.recovery import CHANGE_COUNTS, INT8_STEPS, changed_by

from lepton_cli.samples.sample_set import SampleSet

Key = tuple[str, str]  # (tier tag, method)


class Int8Fits:
    def __init__(self, samples: dict[str, int], iterations: int, float_share: float) -> None:
        self.samples = samples  # step -> --calib samples it fits on
        self.iterations = iterations  # AdaRound iterations per layer
        self.float_share = float_share  # of the rounding objective on float inputs (quantized_adaround.py)
        self.values: dict[Key, dict[str, np.ndarray]] = {}  # initializer name -> fitted value
        self.counts: dict[Key, dict[str, int]] = {}  # the step's CHANGE_COUNTS key -> layers it changed

    def apply(
        self,
        key: Key,
        model: onnx.ModelProto,
        reference: onnx.ModelProto,
        calib: SampleSet,
        steps: tuple[str, ...],
        progress: Callable[[str], None],
    ) -> None:
        """Fit ``steps`` on ``model`` in place (``reference``: the float model it was quantized from, same node
        names), or write back what was fitted for ``key`` before."""
        if key in self.values:
            write_initializers(model, self.values[key])
            return
        fitted: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for step in (s for s in INT8_STEPS if s in steps):
            feeds = list(calib.feeds(self.samples[step]))
            if step == "quantized_adaround":
                progress(f"weight rounding on the int8 model ({key[1]})")
                settings = AdaRoundSettings(iterations=self.iterations)
                changed = refit_quantized_weights(
                    model, reference, feeds, settings=settings, float_share=self.float_share
                )
            else:
                progress(f"bias correction on the int8 model ({key[1]})")
                changed = correct_quantized_biases(model, reference, feeds)
            fitted |= changed
            counts[CHANGE_COUNTS[step][0]] = len(changed)
        self.values[key], self.counts[key] = fitted, counts

    def changed(self, key: Key) -> dict[str, str]:
        """Per step fitted on ``key``'s model, what it changed ("47 layers"), for the report's tier row."""
        counts = self.counts.get(key, {})
        return {step: changed_by(step, counts) for step in INT8_STEPS if CHANGE_COUNTS[step][0] in counts}

    def most(self) -> dict[str, int]:
        """Per count, the most layers any (tier, method) changed: the same layers in each, those both models have."""
        totals: dict[str, int] = {}
        for counts in self.counts.values():
            for name, count in counts.items():
                totals[name] = max(totals.get(name, 0), count)
        return totals
