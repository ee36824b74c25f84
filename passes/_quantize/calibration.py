"""Streamed, memory-bounded calibration over a ``SampleSet`` with ONNX Runtime's calibrators.

Library checked: ``onnxruntime.quantization.calibrate`` has the MinMax, Percentile and Entropy
calibrators we use as they are; what it lacks we add here:
- streaming: its histogram calibrators keep every intermediate output of everything the reader
  yields before building histograms, so we hand them the data in chunks of ``chunk`` samples
  (strided collection; histograms merge across chunks); min/max merges its running range at the
  end of every ``collect_data`` call, so it too holds one chunk at most. (Its own
  ``CalibMaxIntermediateOutputs`` is not used: in ORT 1.32 ``MinMaxCalibrater.collect_data`` clears
  the buffered outputs when that limit is reached *without* merging them, silently dropping data);
- working entropy bins: its defaults (``num_bins = num_quantized_bins = 128``) leave the KL search
  a single candidate threshold, the full range, which makes entropy identical to min/max; we use
  ``num_bins`` ≫ ``num_quantized_bins`` (TensorRT uses 2048/128; we default to 512/128: the KL
  search is a Python loop over candidate thresholds, 2048 bins cost ~1 s per tensor on this host);
- an ``mse`` method: ORT's histograms, and per tensor the range with the least expected int8 error
  (``mse_ranges.py``) instead of one percentile for every tensor;
- feeds adapted to the model's I/O layout metadata (NHWC after ``layout_transform``);
- its histogram code prints to stdout, which must stay clean for ``--json``: redirected to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from lepton_cli.passes._quantize.mse_ranges import mse_tensors_data
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import HistogramCalibrater, HistogramCollector, TensorsData, create_calibrator

from lepton_cli.model.io_contract import adapt_feed
from lepton_cli.samples.sample_set import SampleSet

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    "mse": CalibrationMethod.Percentile,
}  # ORT's signed-value histograms; the range is ours (mse_ranges.py)


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "minmax"
    chunk: int = 16  # samples whose activations are held at once (memory bound)
    chunk_memory_mb: int = 256  # histogram methods hold every calibrated tensor of a chunk: fewer samples when large
    max_samples: int = 256
    percentile: float = 99.999
    histogram_bins: int = 2048  # percentile histogram resolution (cheap: one cumulative sum per tensor)
    entropy_bins: int = 512  # KL search: (entropy_bins/2 - entropy_quantized_bins/2) candidate thresholds per tensor
    entropy_quantized_bins: int = 128  # KL target bins (int8 has 256 levels, half a side = 128)
    power_of_two: bool = False  # mse: choose among symmetric power-of-two grids (the DPU's fix-points)


class SampleSetReader(CalibrationDataReader):
    """ORT calibration reader over a slice of a SampleSet, feeds adapted to the model's layout."""

    def __init__(self, model: onnx.ModelProto, samples: SampleSet, start: int, stop: int):
        self.model, self.samples, self.start, self.stop = model, samples, start, stop
        self._it: Iterator[int] = iter(range(start, stop))

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._it, None)
        return None if index is None else adapt_feed(self.model, self.samples.feed(index))

    def __len__(self) -> int:
        return self.stop - self.start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(range(self.start + start_index, min(self.start + end_index, self.stop)))


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantization tools print progress to stdout and log advice as warnings: keep stdout clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr if sys.stderr.isatty() else open("/dev/null", "w")):
            yield
    finally:
        logger.setLevel(level)


def _lean_session(calibrator: Any) -> None:
    """Re-open the calibrator's augmented model so tensors are freed as soon as their min/max is taken.

    ORT's calibrators add a reduction (or an output) per tensor; with the default arena, memory
    pattern and execution order the whole forward pass stays resident (docs/decisions.md, Quantize).
    """
    # One copy of the weights at a time: the tool's own session, and its in-memory augmented graph (saved, with its
    # weights in an external file ORT maps, and never read again), go before ours opens (light_vgg19 cpu-avx: -0.5 GB).
    calibrator.infer_session = None
    calibrator.model = None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrators do
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    calibrator.infer_session = ort.InferenceSession(
        str(calibrator.augmented_model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def _chunk_size(calibrator: Any, model: onnx.ModelProto, samples: SampleSet, settings: CalibrationSettings) -> int:
    """Samples per ``collect_data`` call: ``settings.chunk``, fewer when one sample's calibration outputs are
    large (histogram methods return whole tensors, tens of MB a sample for a detector)."""
    outputs = calibrator.infer_session.run(None, adapt_feed(model, samples.feed(0)))
    per_sample = max(1, sum(np.asarray(o).nbytes for o in outputs))
    return max(1, min(settings.chunk, settings.chunk_memory_mb * 2**20 // per_sample))


def _rebinned(hist: np.ndarray, edges: np.ndarray, low: float, high: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``hist`` moved onto ``bins`` uniform bins over [low, high], each count by its bin's centre."""
    centres = (edges[:-1].astype(np.float64) + edges[1:]) / 2
    new_hist, new_edges = np.histogram(centres, bins=bins, range=(low, high), weights=hist)
    return new_hist.astype(hist.dtype), new_edges.astype(edges.dtype)


def _bound_histograms(calibrator: Any, settings: CalibrationSettings) -> None:
    """Keep ORT's histograms at most ``4 x bins`` wide whatever the later chunks' ranges.

    ``HistogramCollector`` keeps the bin width and adds bins when a chunk is wider than the histogram
    so far (``merge_histogram``; ``np.arange`` in ``collect_absolute_value``): a tensor whose first
    samples were near zero grows to millions of bins in one merge (gigabytes: docs/decisions.md).
    Before ORT merges a wider chunk, the histogram is moved onto a coarser grid that already covers
    the chunk's range, so ORT's merge adds no bins. Counts move by bin centre, a resolution the
    percentile and KL searches still resolve.
    """
    collector = getattr(calibrator, "collector", None)
    if collector is None or getattr(collector, "_lepton_bounded", False):
        return
    limit = 4 * (settings.histogram_bins if settings.method in ("percentile", "mse") else settings.entropy_bins)
    original = collector.collect

    def collect(name_to_arr: dict[str, Any]) -> Any:
        name_to_arr = {name: _finite(arr) for name, arr in name_to_arr.items()}
        for name, arrays in name_to_arr.items():
            entry = collector.histogram_dict.get(name)
            values = [np.asarray(a) for a in (arrays if isinstance(arrays, list) else [arrays]) if np.asarray(a).size]
            if entry is None or not values:
                continue
            amax = max(float(np.nanmax(np.abs(v))) for v in values)
            hist, edges, *rest = entry
            width = float(edges[1] - edges[0])
            # collect_value's entries carry a threshold: (hist, edges, min, max, threshold), symmetric edges.
            # Not edges[0] < 0: a first chunk of all zeros gives |x| edges (-0.5, 0.5) (np.histogram's
            # range for constant data) to collect_absolute_value's (hist, edges, min, max) too.
            if len(rest) == 3:
                if amax <= float(edges[-1]) or len(hist) + 2 * ((amax - float(edges[-1])) // width + 1) <= limit:
                    continue
                new_hist, new_edges = _rebinned(hist, edges, -amax, amax, limit // 2)
                rest[2] = np.array(amax, dtype=edges.dtype)  # (min, max, threshold)
            else:  # collect_absolute_value: [min |x|, max |x|]
                if amax <= float(edges[-1]) or len(hist) + (amax - float(edges[-1])) // width + 1 <= limit:
                    continue
                new_hist, new_edges = _rebinned(hist, edges, float(edges[0]), amax, limit // 2)
            collector.histogram_dict[name] = (new_hist, new_edges, *rest)
        return original(name_to_arr)

    collector.collect = collect
    collector._lepton_bounded = True


FLOAT32_EDGE = float(np.finfo(np.float32).max) / 4  # beyond this, twice the value overflows float32


class _WideningCollector(HistogramCollector):
    """ORT's collector computes a signed histogram's range, ±max|x|, in the tensor's dtype: a float32 tensor holding
    -3.4e38 (all-MiniLM-L6's additive attention mask) overflows its width to inf and numpy refuses the bins (the
    entropy and mse methods crashed on it). Such tensors are histogrammed in float64."""

    def collect(self, name_to_arr: dict[str, Any]) -> None:
        signed = self.method in ("entropy", "distribution") or not self.symmetric  # |x| histograms do not overflow
        if not getattr(self, "_lepton_bounded", False):  # else _bound_histograms' wrapper filtered them already
            name_to_arr = {name: _finite(arr) for name, arr in name_to_arr.items()}
        super().collect({name: _widened(arr) for name, arr in name_to_arr.items()} if signed else name_to_arr)

    def collect_absolute_value(self, name_to_arr: dict[str, Any]) -> None:
        """ORT's |x| histograms, each later chunk binned by its uniform edges' range rather than the edge array:
        numpy sorts the data for an array of edges (PP-OCRv4 rec fpga: most of a percentile calibration)."""
        for tensor, data in name_to_arr.items():
            values = np.asarray(data).ravel()
            low, high = (np.nanmin(values), np.nanmax(values)) if values.size else (values.dtype.type(0),) * 2
            magnitudes = np.absolute(values)
            if tensor not in self.histogram_dict:  # its first chunk sets its bins; later chunks reuse them
                if _too_narrow(magnitudes, self.num_bins):  # one zero widens it to [0, max |x|], a symmetric grid's
                    magnitudes = np.append(magnitudes, magnitudes.dtype.type(0))
                    low, high = min(low, values.dtype.type(0)), max(high, values.dtype.type(0))
                hist, edges = np.histogram(magnitudes, bins=self.num_bins)
                self.histogram_dict[tensor] = (hist, edges.astype(magnitudes.dtype), low, high)
                continue
            old_hist, edges, old_low, old_high = self.histogram_dict[tensor]
            widest = max(abs(low), abs(high))  # max |x| from the chunk's range: no third pass over its values
            if widest > edges[-1]:  # ORT's growth: more bins of the same width (np.arange, maybe one spare)
                width = edges[1] - edges[0]
                edges = np.hstack((edges, np.arange(edges[-1] + width, widest + width, width))).astype(edges.dtype)
            hist, _ = np.histogram(magnitudes, bins=len(edges) - 1, range=(float(edges[0]), float(edges[-1])))
            hist[: len(old_hist)] += old_hist
            self.histogram_dict[tensor] = (hist, edges, min(old_low, low), max(old_high, high))

    def compute_collection_result(self) -> dict[str, Any]:
        """ORT's results, float64 numbers back in float32 (its TensorData takes no other; ±3.4e38 fits)."""
        return {name: _narrowed(value) for name, value in super().compute_collection_result().items()}


def _narrowed(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_narrowed(v) for v in value)
    if isinstance(value, np.ndarray | np.floating) and value.dtype == np.float64:
        return value.astype(np.float32)
    return value


def _finite(arr: Any) -> Any:
    """``arr`` without its infinities and NaNs, which no 8-bit grid holds and numpy cannot bin: swift-f0 pads its
    pitch salience with -inf before a GatherElements. Such a value quantizes to the range's end; the search scores
    what that costs."""
    values = [np.asarray(a) for a in arr] if isinstance(arr, list) else [np.asarray(arr)]
    if all(v.dtype.kind != "f" or np.isfinite(v).all() for v in values):
        return arr
    kept = [v[np.isfinite(v)] if v.dtype.kind == "f" else v.ravel() for v in values]
    # One flat array for a chunk: its samples keep different counts, and ORT stacks a chunk's list into one array.
    return [np.concatenate(kept)] if isinstance(arr, list) else kept[0]


def _widened(arr: Any) -> Any:
    """``arr`` (an array, or one tensor's arrays of a chunk, which ORT wants in one dtype) in float64 when a float32
    value is beyond FLOAT32_EDGE."""
    values = [np.asarray(a) for a in arr] if isinstance(arr, list) else [np.asarray(arr)]
    if not any(v.dtype == np.float32 and v.size and float(np.nanmax(np.abs(v))) > FLOAT32_EDGE for v in values):
        return arr
    wide = [v.astype(np.float64) if v.dtype == np.float32 else v for v in values]
    return wide if isinstance(arr, list) else wide[0]


def _too_narrow(magnitudes: np.ndarray, bins: int) -> bool:
    """Whether float32 |x| values all lie within ``bins`` float32 steps of each other: numpy cannot cut so narrow a
    range into ``bins`` bins (a block of a light-zoo ResNet's Relu outputs did that)."""
    if magnitudes.dtype != np.float32 or not magnitudes.size:
        return False
    low, high = float(np.nanmin(magnitudes)), float(np.nanmax(magnitudes))
    return low < high and high - low <= float(np.spacing(np.float32(high))) * bins


def _widening_collector(calibrator: Any) -> None:
    """Give a histogram calibrator the widening collector before its first chunk (ORT makes its own when none)."""
    if isinstance(calibrator, HistogramCalibrater) and calibrator.collector is None:
        calibrator.collector = _WideningCollector(
            method=calibrator.method,
            symmetric=calibrator.symmetric,
            num_bins=calibrator.num_bins,
            num_quantized_bins=calibrator.num_quantized_bins,
            percentile=calibrator.percentile,
            scenario=calibrator.scenario,
        )


def calibrate(
    model: onnx.ModelProto,
    samples: SampleSet,
    settings: CalibrationSettings,
    progress: Callable[[int, int], None] | None = None,
    op_types: list[str] | None = None,
) -> TensorsData:
    """Activation ranges of the inputs/outputs of ``op_types`` nodes (all: every node), chunk by chunk."""
    method = METHODS[settings.method]
    extra: dict[str, object] = {}
    if settings.method == "minmax":
        pass
    elif settings.method == "percentile":  # ORT's default for it: symmetric, a histogram of |x|
        extra |= {"num_bins": settings.histogram_bins, "percentile": settings.percentile}
    elif settings.method == "mse":  # signed values: each side of the range is chosen on its own
        extra |= {"num_bins": settings.histogram_bins, "percentile": settings.percentile, "symmetric": False}
    else:
        extra |= {"num_bins": settings.entropy_bins, "num_quantized_bins": settings.entropy_quantized_bins}
    total = min(len(samples), settings.max_samples)
    with tempfile.TemporaryDirectory(prefix="lepton-calib-") as tmp, quiet_ort():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 1_800_000_000)
        calibrator = create_calibrator(
            path,
            list(op_types or []),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            use_external_data_format=True,
            calibrate_method=method,
            extra_options=extra,
        )
        _lean_session(calibrator)
        _widening_collector(calibrator)
        chunk = _chunk_size(calibrator, model, samples, settings)
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            calibrator.collect_data(SampleSetReader(model, samples, start, stop))
            _bound_histograms(calibrator, settings)  # the collector exists after the first chunk
            if progress:
                progress(stop, total)
        collector = getattr(calibrator, "collector", None)
        if collector is not None and not getattr(collector, "histogram_dict", None):
            ranges = TensorsData(method, {})  # nothing of op_types to calibrate: as min/max returns (ORT raises)
        elif settings.method == "mse":
            ranges = mse_tensors_data(collector.histogram_dict, power_of_two=settings.power_of_two)
        else:
            ranges = calibrator.compute_data()
        del calibrator
    return ranges
