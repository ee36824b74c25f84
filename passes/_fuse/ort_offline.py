"""ONNX Runtime's offline-optimised graph, for targets whose deployment runtime is ONNX Runtime itself."""

from __future__ import annotations

from pathlib import Path

import onnx


def ort_offline_graph(model: onnx.ModelProto, work_dir: Path) -> onnx.ModelProto:
    """ONNX Runtime's own offline optimisation (extended level, CPU EP), read back as a model."""
    import onnxruntime as ort

    path = Path(work_dir) / "fuse.ort_offline.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))
