"""The peer tools of the yardstick, run by their own venv's Python (no Lepton imports).

    python peer_quantize.py ort     MODEL CALIB.npz OUT.onnx
    python peer_quantize.py nncf    MODEL CALIB.npz OUT.onnx
    python peer_quantize.py nncf-ac MODEL CALIB.npz OUT.onnx VALID.npz MAX_DROP_PCT
    python peer_quantize.py ort-dynamic MODEL - OUT.onnx       (builds the corpus's pre-quantized model)

As a user would after the tools' errors, models below opset 13 (ORT per-channel QDQ) or 10 (NNCF refuses) are
converted to opset 13 (onnx.version_converter) first.
ort: ONNX Runtime ``quantize_static``, QDQ, U8 activations × S8 weights per channel, percentile
calibration. nncf: ``nncf.quantize`` with its defaults. nncf-ac: ``nncf.quantize_with_accuracy_control``
with MAX_DROP_PCT absolute; its validation metric is top-1 against VALID's ``labels`` when present,
else the mean cosine (×100) of the first output against the fp32 model's on VALID's inputs.
Calibration arrays follow Lepton's .npz format: rank-equal arrays are rows, rank+1 arrays whole batches.
"""

import sys

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort


def _feeds(model: onnx.ModelProto, path: str) -> list:
    initialisers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    with np.load(path, allow_pickle=False) as npz:
        arrays = {i.name: npz[i.name] for i in inputs}
    count = len(next(iter(arrays.values())))
    feeds = []
    for index in range(count):
        feed = {}
        for spec in inputs:
            arr = arrays[spec.name]
            rank = len(spec.type.tensor_type.shape.dim)
            value = arr[index] if arr.ndim == rank + 1 else arr[index : index + 1]
            feed[spec.name] = value.astype(np.float32) if value.dtype.kind == "f" else value
        feeds.append(feed)
    return feeds


def quantize_ort(model_path: str, calib: str, out: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(model_path)
    if _opset(model) < 13:  # per-channel QDQ needs opset 13; below it quantize_static writes an invalid model
        model_path = out + ".opset13.onnx"
        onnx.save(onnx.shape_inference.infer_shapes(onnx.version_converter.convert_version(model, 13)), model_path)
    feeds = iter(_feeds(model, calib))

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(
        model_path,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.Percentile,
    )


NNCF_PER_CHANNEL_OPSET = 13


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantize_nncf(
    model_path: str, calib: str, out: str, valid: str | None = None, max_drop: float | None = None
) -> None:
    import nncf

    model = onnx.load(model_path)
    # NNCF refuses opsets below 10 and warns that below 13 it quantizes weights per tensor (PP-OCRv4 rec, opset 11:
    # 3.56 % of characters); its warning tells the user to convert, so we do.
    if _opset(model) < NNCF_PER_CHANNEL_OPSET:
        model = onnx.shape_inference.infer_shapes(onnx.version_converter.convert_version(model, 13))
    calibration = nncf.Dataset(_feeds(model, calib))
    if valid is None:
        quantized = nncf.quantize(model, calibration)
    else:
        valid_feeds = _feeds(model, valid)
        with np.load(valid, allow_pickle=False) as npz:
            labels = npz["labels"] if "labels" in npz.files and npz["labels"].dtype.kind in "iu" else None
        reference = [_session(model).run(None, f)[0] for f in valid_feeds]

        def validate(candidate: onnx.ModelProto, data) -> float:
            sess = _session(candidate)
            outputs = [sess.run(None, feed)[0] for feed in data]
            if labels is not None:
                return 100.0 * float(np.mean([np.argmax(o) == y for o, y in zip(outputs, labels)]))
            cos = [
                float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
                for a, b in zip(reference, outputs)
            ]
            return 100.0 * float(np.mean(cos))

        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(valid_feeds), validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE
        )
    onnx.save(quantized, out)


if __name__ == "__main__":
    tool, model_path, calib, out = sys.argv[1:5]
    if tool == "ort":
        quantize_ort(model_path, calib, out)
    elif tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model_path, out, weight_type=QuantType.QInt8)
    elif tool == "nncf":
        quantize_nncf(model_path, calib, out)
    else:
        quantize_nncf(model_path, calib, out, sys.argv[5], float(sys.argv[6]))
