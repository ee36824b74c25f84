"""``lepton run BUNDLE --key PRIVKEY --trust PUBKEY.pem (--input NAME=FILE.npy ... | --inputs DATA.npz) [-o OUT.npz]``.

Verifies, unwraps and decrypts in memory (``load_bundle``), then runs ONNX Runtime. Inputs are
in the source model's layout; the session converts for a compiled NHWC model. ``--inputs`` takes
the ``--calib`` sample format (``data.load_samples``), and the outputs are stacked on axis 0.
``--format ort|tflite`` runs the bundle's device file instead (``bundle.device_session``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import onnx
import typer
from onnx import helper

from lepton_cli.commands._bundle_keys import key_spec, trust_spec
from lepton_cli.console import emit_json, note, settings, stdout
from lepton_cli.errors import BadInputError
from lepton_cli.runtime.bundle_session import BundleSession, load_bundle
from lepton_cli.runtime.device_session import FORMATS, load_device_file
from lepton_cli.samples.sample_set import load_samples


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


def _single_inputs(specs: list[str], names: set[str]) -> dict[str, np.ndarray]:
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
            feed[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise BadInputError(
                f"--input {name}: cannot read {file} as .npy ({exc.__class__.__name__})", "save it with numpy.save"
            ) from None
    missing = sorted(names - set(feed))
    if missing:
        raise BadInputError(f"no --input for model input {missing[0]!r}", f"add --input {missing[0]}=FILE.npy")
    return feed


def run_command(
    bundle: Annotated[Path, typer.Argument(help="A <model>.<target>.lepton folder or its .zip archive.")],
    key: Annotated[
        Optional[str],
        typer.Option(
            "--key", help="Your encryption private key (PEM); else $LEPTON_DECRYPTION_KEY, else the local dev key."
        ),
    ] = None,
    trust: Annotated[
        Optional[str],
        typer.Option(
            "--trust", help="The publisher's signing public key (PEM); else $LEPTON_TRUST, else the local dev key."
        ),
    ] = None,
    input_: Annotated[
        Optional[list[str]], typer.Option("--input", help="NAME=FILE.npy, one whole input tensor (repeatable).")
    ] = None,
    inputs: Annotated[
        Optional[Path], typer.Option("--inputs", help="Samples .npz keyed by input name (the --calib format).")
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the outputs to this .npz.")] = None,
    state: Annotated[
        Optional[Path],
        typer.Option("--state", help="Rollback state file (default: bundle-state.json in the Lepton config folder)."),
    ] = None,
    provider: Annotated[
        Optional[list[str]],
        typer.Option(
            "--provider", help="ONNX Runtime execution provider to prefer (repeatable; default: the target's)."
        ),
    ] = None,
    variant: Annotated[
        Optional[str],
        typer.Option(
            "--variant",
            help="Variant name or model path inside the bundle (default: the best one this device can run).",
        ),
    ] = None,
    file_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Which file of the bundle runs: onnx (ONNX Runtime, default), ort (ONNX Runtime, ORT format), tflite (LiteRT).",
        ),
    ] = "onnx",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Verify and decrypt the bundle in memory, run it on the inputs, write the outputs (exit 4 if verification fails)."""
    settings.json_mode = json_out
    settings.quiet = json_out
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
    if file_format == "onnx":
        session = load_bundle(
            bundle, key=key_spec(key), trust=trust_spec(trust), providers=provider, variant=variant, state_path=state
        )
    else:
        session = load_device_file(
            bundle,
            file_format,
            key=key_spec(key),
            trust=trust_spec(trust),
            state_path=state,
            variant=variant,
            providers=provider,
        )
    note(f"verified and decrypted {session.model_path} in memory; running on {', '.join(session.get_providers())}")
    for line in session.selection.log:  # variant / provider / thread choices and every fallback, with reasons
        note(f"  {line}")
    out_names = [o.name for o in session.get_outputs()]
    labels = None
    if inputs is not None:
        samples = load_samples(inputs, _source_layout_model(session), role="--inputs")
        labels = samples.labels
        per_sample = [session.run(out_names, feed) for feed in samples.feeds()]
        batched = any(samples.batched.values())
        results = {
            name: (np.stack if batched else np.concatenate)([outs[i] for outs in per_sample], axis=0)
            for i, name in enumerate(out_names)
        }
        count = len(samples)
    else:
        results = dict(
            zip(out_names, session.run(out_names, _single_inputs(input_ or [], {i.name for i in session.get_inputs()})))
        )
        count = 1
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            np.savez(output, **results)
        except (OSError, zipfile.BadZipFile) as exc:
            raise BadInputError(f"cannot write {output}: {exc}", "choose a writable -o path") from None
    runtime = session.selection.runtime if file_format != "onnx" else "ONNX Runtime"
    doc: dict[str, Any] = {
        "bundle": str(bundle),
        "model": session.model_path,
        "format": file_format,
        "runtime": runtime,
        "samples": count,
        "providers": session.get_providers(),
        "output": str(output) if output else None,
        "selection": session.selection.to_dict(),
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in results.items()},
    }
    first = results[out_names[0]]
    if labels is not None and first.ndim == 2 and len(first) == len(labels):
        doc["top1_accuracy_pct"] = round(float((first.argmax(axis=1) == labels).mean() * 100), 2)
    if json_out:
        emit_json(doc)
        return
    for name, meta in doc["outputs"].items():
        stdout.print(f"{name}: shape {tuple(meta['shape'])} {meta['dtype']}")
    if "top1_accuracy_pct" in doc:
        stdout.print(f"top-1 accuracy on the labels: {doc['top1_accuracy_pct']:.2f}%")
    if output is not None:
        stdout.print(f"outputs: {output}")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
