"""fuse: exact graph simplification — constant folding and onnxsim's fusions.

Library checked: onnxsim (``onnxsim.simplify``) already folds constants, removes dead nodes and
Identity/Dropout, and fuses Conv+BN/Add; this pass wraps it with typed parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from lepton_cli.pass_registry import PassResult, register_pass, tolerance


@dataclass(frozen=True)
class FuseParams:
    fold_constants: bool = True  # onnxsim constant folding (ConstantOfShape weights in the light zoo)


@register_pass(
    "fuse",
    params=FuseParams,
    description="Constant folding, BatchNorm/bias folding, dead-node and no-op elimination (exact up to rounding).",
    exactness=tolerance(rtol=1e-4, atol=1e-5),
)
def fuse(model: onnx.ModelProto, ctx, params: FuseParams) -> PassResult:
    import onnxsim

    skipped = [] if params.fold_constants else ["constant_folding"]
    simplified, ok = onnxsim.simplify(model, check_n=0, skip_constant_folding=not params.fold_constants,
                                      skipped_optimizers=None)
    if not ok:  # check_n=0 never fails this check; keep the original to stay safe if it ever does
        return PassResult(model, {"applied": False})
    return PassResult(simplified, {"applied": True, "skipped": skipped})
