"""PP-OCRv4 det fused for cpu-avx and its Conv-only int8 QDQ model, built once per test module that asks."""

from __future__ import annotations

import sys

import numpy as np
import onnx
from conftest import OCR_DET, REPO
from lepton_cli.passes._quantize import schemes
from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

from lepton_cli.model.load import upgrade_opset
from lepton_cli.model.sessions import make_session
from lepton_cli.model.shapes import bind_input_shapes
from lepton_cli.pipeline.context import PassContext
from lepton_cli.pipeline.registry import get_pass
from lepton_cli.pipeline.targets import load_target
from lepton_cli.samples.sample_set import load_samples

SIZE = 160  # pages rendered at 320 and shrunk: small enough for `make test`, every block still at work


def fused_model(path, shapes: dict[str, list[int]], target_name: str = "cpu-avx") -> onnx.ModelProto:
    """The model at ``path`` at the target's opset, its inputs bound to ``shapes``, as the target's fuse leaves it."""
    target = load_target(target_name)
    model, _ = upgrade_opset(onnx.load(path), target.runtime.opset_min, target.runtime.opset_max)
    model = bind_input_shapes(model, shapes)
    fuse = next(step for step in target.passes if step.name == "fuse")
    return get_pass("fuse").fn(model, PassContext(target=target), fuse.params).model


def fused_det_and_pages(tmp_path_factory) -> tuple:
    """(PP-OCRv4 det fused for cpu-avx at SIZE, its calibration pages' .npz, held-out pages as feeds)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ocr_textset

    fused = fused_model(OCR_DET, {"x": [1, 3, SIZE, SIZE]})
    work = tmp_path_factory.mktemp("int8")
    np.savez(work / "calib.npz", x=ocr_textset.make_pages(6, 5, "calib", size=SIZE))
    held = ocr_textset.make_pages(4, 9, "eval", size=SIZE)
    return fused, work / "calib.npz", [{"x": page[None]} for page in held]


def quantized_det(tmp_path_factory) -> tuple:
    """(fused float model, its Conv-only int8 QDQ model, held-out pages)."""
    return quantized_det_and_calib(tmp_path_factory)[:3]


def quantized_det_and_calib(tmp_path_factory) -> tuple:
    """(fused float model, its Conv-only int8 QDQ model, held-out pages, the calibration pages as feeds)."""
    fused, calib_path, held = fused_det_and_pages(tmp_path_factory)
    work = calib_path.parent
    calib = load_samples(calib_path, fused)
    ranges = calibrate(fused, calib, CalibrationSettings(method="minmax", chunk=6, max_samples=6), None, ["Conv"])
    scheme = schemes.Int8Scheme(per_channel=True, op_types=("Conv",))
    int8 = schemes.quantize_int8(fused, schemes.save_ranges(ranges, work / "r.json"), "minmax", scheme, [], work)
    return fused, int8, held, list(calib.feeds(len(calib)))


def det_maps(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    """The detector's probability maps on ``feeds``, stacked."""
    session = make_session(model)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def snr_db(reference: np.ndarray, got: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))
