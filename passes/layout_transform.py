"""layout_transform: channels-last model I/O and channel padding to the hardware's alignment.

Both transforms only move or copy data or add products with exact zero weights, so they compute the
same real numbers. Channels-last I/O and output-channel padding are bit-exact under ONNX Runtime;
padding a consumer's *input* channels changes the GEMM's K dimension, from which ORT's CPU kernels
(MLAS) pick their blocking and reduction order, so some outputs differ in the last bit. The pass
therefore declares ``tolerance(rtol=1e-5, atol=1e-6)``, ten times tighter than fuse.

* ``_layout_transform/channels_last.py`` (``io_layout = "NHWC"``): each 4-D float graph input is taken
  as NHWC and each 4-D float graph output returned as NHWC, with Transposes inside the model; the
  metadata ``lepton.io_layout.<name> = "NHWC"`` is the I/O contract (``lepton_cli.model.io_contract``).
  ``transposer.py`` then pushes those Transposes through elementwise ops and cancels adjacent pairs.
* ``_layout_transform/padding.py`` (``pad_channels``): Conv output channels padded with zero filters to
  a multiple of the alignment, the padding carried through per-channel ops and sliced off before
  anything else.

Why these are written here rather than taken from a library: docs/decisions.md, "Fuse and layout".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import onnx
from lepton_cli.passes._layout_transform.channels_last import channels_last_io
from lepton_cli.passes._layout_transform.padding import pad_channels

from lepton_cli.model.initializers import constants_to_initializers, list_initializers_as_inputs
from lepton_cli.pipeline.params import ParamValueError
from lepton_cli.pipeline.registry import PassResult, register_pass, tolerance

if TYPE_CHECKING:
    from lepton_cli.pipeline.context import PassContext


@dataclass(frozen=True)
class LayoutParams:
    io_layout: Literal["keep", "NHWC"] = "keep"  # NHWC: the compiled model takes and returns channel-last images
    pad_channels: bool = False  # pad conv channel counts to a multiple of ``alignment``
    alignment: int | None = None  # None: the target's hardware.channel_alignment

    def __post_init__(self) -> None:
        if self.alignment is not None and self.alignment < 1:
            raise ParamValueError("alignment", f"must be >= 1, got {self.alignment}")


@register_pass(
    "layout_transform",
    params=LayoutParams,
    description="Channels-last (NHWC) model I/O with Transposes pushed and cancelled; channel padding to the "
    "hardware alignment with zero weights (exact math; K-padding reorders ORT's float sums).",
    exactness=tolerance(rtol=1e-5, atol=1e-6),
    order=30,
)
def layout_transform(model: onnx.ModelProto, ctx: PassContext, params: LayoutParams) -> PassResult:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    summary: dict = {}
    constants_to_initializers(result)  # weights as initializers: padding rewrites them
    align = params.alignment or ctx.target.hardware.channel_alignment
    if params.pad_channels and align > 1:
        summary["padding"] = pad_channels(result, align)
    if params.io_layout == "NHWC":
        summary["io"] = channels_last_io(result)
    list_initializers_as_inputs(result)
    return PassResult(result, summary)
