"""``lepton run BUNDLE --key PRIVKEY --trust PUBKEY.pem (--input NAME=FILE.npy ... | --inputs DATA.npz) [-o OUT.npz]``.

Verifies, unwraps and decrypts in memory (``load_bundle``), then runs ONNX Runtime. Inputs are
in the source model's layout; the session converts for a compiled NHWC model. ``--inputs`` takes
the ``--calib`` sample format (``data.load_samples``), and the outputs are stacked on axis 0.
``--format ort|tflite`` runs the bundle's device file instead (``bundle.device_session``).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import onnx
import typer
from onnx import helper

from lepton_cli.commands._bundle_keys import key_spec, trust_spec
from lepton_cli.commands._options import BundleArg, JsonFlag, StateOpt, TrustOpt
from lepton_cli.console import emit_json, note, settings, stdout
from lepton_cli.errors import BadInputError
from lepton_cli.model.shapes import graph_inputs
from lepton_cli.runtime.bundle_session import BundleSession, load_bundle
from lepton_cli.runtime.device_session import FORMATS, load_device_file
from lepton_cli.samples.sample_set import check_whole_input, load_samples


def _source_layout_model(session: BundleSession) -> onnx.ModelProto:
    """A stub model with the inputs as the user feeds them (NCHW where the compiled model is NHWC),
    so ``load_samples`` validates names, ranks, shapes and dtypes."""
    inputs = []
    for arg in session.get_inputs():
        dims = list(arg.shape)
        if session.contract.is_nhwc(arg.name) and len(dims) == 4:
            dims = [dims[0], dims[3], dims[1], dims[2]]
        # an integer-I/O input (lepton.io_quant.*) takes the source's float data; the session quantizes it
        dtype = "float32" if arg.name in session.contract.quant else _ORT_TYPES.get(arg.type, "float32")
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inputs.append(
            helper.make_tensor_value_info(arg.name, elem, [d if isinstance(d, int) else (d or "?") for d in dims])
        )
    graph = helper.make_graph([], "inputs", inputs, [])
    return helper.make_model(graph)


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _single_inputs(specs: list[str], session: Any) -> dict[str, np.ndarray]:
    sigs = {sig.name: sig for sig in graph_inputs(_source_layout_model(session))}
    names = set(sigs)
    feed = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise BadInputError(f"--input {spec!r} is not NAME=FILE.npy", "e.g. --input image=x.npy")
        if name not in names:
            raise BadInputError(
                f"--input {name!r} names no input of the model", f"the model's inputs are: {', '.join(sorted(names))}"
            )
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise BadInputError(
                f"--input {name}: cannot read {file} as .npy ({exc.__class__.__name__})", "save it with numpy.save"
            ) from None
        if not isinstance(array, np.ndarray):  # an .npz given where one tensor is wanted
            raise BadInputError(
                f"--input {name}: {file} is an .npz, not one .npy tensor", f"pass it with --inputs {file}"
            )
        feed[name] = check_whole_input(name, array, sigs[name], f"--input {name}")
    missing = sorted(names - set(feed))
    if missing:
        raise BadInputError(f"no --input for model input {missing[0]!r}", f"add --input {missing[0]}=FILE.npy")
    return feed


KeyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--key", help="Your encryption private key (PEM); else $LEPTON_DECRYPTION_KEY, else the local dev key."
    ),
]
InputOpt = Annotated[
    Optional[list[str]], typer.Option("--input", help="NAME=FILE.npy, one whole input tensor (repeatable).")
]
InputsOpt = Annotated[
    Optional[Path], typer.Option("--inputs", help="Samples .npz keyed by input name (the --calib format).")
]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the outputs to this .npz.")]
ProviderOpt = Annotated[
    Optional[list[str]],
    typer.Option("--provider", help="ONNX Runtime execution provider to prefer (repeatable; default: the target's)."),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option(
        "--variant", help="Variant name or model path inside the bundle (default: the best one this device can run)."
    ),
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="Which file of the bundle runs: onnx (ONNX Runtime, default), ort (ONNX Runtime, ORT format), tflite (LiteRT).",
    ),
]


@dataclass
class _Run:
    """The outputs of one ``lepton run``, stacked over the samples, and the labels that came with them."""

    results: dict[str, np.ndarray]
    count: int
    labels: np.ndarray | None


def _check_options(input_: list[str] | None, inputs: Path | None, output: Path | None, file_format: str) -> None:
    if bool(input_) == bool(inputs):
        raise BadInputError(
            "give either --input NAME=FILE.npy ... or --inputs DATA.npz", "e.g. --inputs examples/digits/eval.npz"
        )
    if output is not None and output.suffix != ".npz":
        raise BadInputError(f"-o {output} must end in .npz", "e.g. -o out.npz")
    if inputs is not None and not inputs.is_file():
        raise BadInputError(f"--inputs {inputs} does not exist or is not a file", "pass an .npz keyed by input name")
    if file_format not in FORMATS:
        raise BadInputError(f"--format {file_format!r} is not one of {', '.join(FORMATS)}", "e.g. --format tflite")


def _open_session(
    bundle: Path,
    file_format: str,
    key: str | None,
    trust: str | None,
    state: Path | None,
    variant: str | None,
    providers: list[str] | None,
) -> Any:
    """The verified, decrypted session (ONNX Runtime, or the bundle's device file with ``--format``)."""
    private, trusted = key_spec(key), trust_spec(trust)
    if file_format == "onnx":
        return load_bundle(bundle, key=private, trust=trusted, providers=providers, variant=variant, state_path=state)
    return load_device_file(
        bundle, file_format, key=private, trust=trusted, state_path=state, variant=variant, providers=providers
    )


def _run_session(session: Any, input_: list[str] | None, inputs: Path | None) -> _Run:
    out_names = [o.name for o in session.get_outputs()]
    if inputs is None:
        feed = _single_inputs(input_ or [], session)
        return _Run(dict(zip(out_names, session.run(out_names, feed))), 1, None)
    samples = load_samples(inputs, _source_layout_model(session), role="--inputs")
    per_sample = [session.run(out_names, feed) for feed in samples.feeds()]
    stack = np.stack if any(samples.batched.values()) else np.concatenate
    results = {name: stack([outs[i] for outs in per_sample], axis=0) for i, name in enumerate(out_names)}
    return _Run(results, len(samples), samples.labels)


def _save_outputs(output: Path, results: dict[str, np.ndarray]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        np.savez(output, **results)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"cannot write {output}: {exc}", "choose a writable -o path") from None


def _run_document(bundle: Path, session: Any, file_format: str, run: _Run, output: Path | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "bundle": str(bundle),
        "model": session.model_path,
        "format": file_format,
        "runtime": session.selection.runtime if file_format != "onnx" else "ONNX Runtime",
        "samples": run.count,
        "providers": session.get_providers(),
        "output": str(output) if output else None,
        "selection": session.selection.to_dict(),
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in run.results.items()},
    }
    first = next(iter(run.results.values()))
    if run.labels is not None and first.ndim == 2 and len(first) == len(run.labels):
        doc["top1_accuracy_pct"] = round(float((first.argmax(axis=1) == run.labels).mean() * 100), 2)
    return doc


def _print_run(doc: dict[str, Any], output: Path | None) -> None:
    for name, meta in doc["outputs"].items():
        stdout.print(f"{name}: shape {tuple(meta['shape'])} {meta['dtype']}")
    if "top1_accuracy_pct" in doc:
        stdout.print(f"top-1 accuracy on the labels: {doc['top1_accuracy_pct']:.2f}%")
    if output is not None:
        stdout.print(f"outputs: {output}")


def run_command(
    bundle: BundleArg,
    key: KeyOpt = None,
    trust: TrustOpt = None,
    input_: InputOpt = None,
    inputs: InputsOpt = None,
    output: OutputOpt = None,
    state: StateOpt = None,
    provider: ProviderOpt = None,
    variant: VariantOpt = None,
    file_format: FormatOpt = "onnx",
    json_out: JsonFlag = False,
) -> None:
    """Verify and decrypt the bundle in memory, run it on the inputs, write the outputs (exit 4 if verification fails)."""
    settings.json_mode = json_out
    settings.quiet = json_out
    _check_options(input_, inputs, output, file_format)
    session = _open_session(bundle, file_format, key, trust, state, variant, provider)
    note(f"verified and decrypted {session.model_path} in memory; running on {', '.join(session.get_providers())}")
    for line in session.selection.log:  # variant / provider / thread choices and every fallback, with reasons
        note(f"  {line}")
    run = _run_session(session, input_, inputs)
    if output is not None:
        _save_outputs(output, run.results)
    doc = _run_document(bundle, session, file_format, run, output)
    if json_out:
        emit_json(doc)
    else:
        _print_run(doc, output)


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
