"""Fuzz a real bundle: random byte flips, truncations, appends, inserted/removed/swapped files.

Every mutated bundle must be refused with a ``LeptonError`` (exit 4, or 2 for a usage-level
problem). Counts: acceptances of a changed bundle and uncaught exceptions — both must be 0.

    .venv/bin/python benchmarks/fuzz_bundle.py [--iterations 2000] [--seed 0]

Writes benchmarks/results/fuzz_bundle.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lepton_cli.bundle import open_bundle, write_bundle  # noqa: E402
from lepton_cli.bundle.archive import write_archive  # noqa: E402
from lepton_cli.bundle.keys import generate_keys, load_key  # noqa: E402
from lepton_cli.errors import LeptonError  # noqa: E402

MODEL = REPO / "examples" / "digits" / "digits_cnn.onnx"


def _make(dest: Path, keys: Path, version: int) -> Path:
    return write_bundle(
        dest,
        models={"model.onnx": MODEL.read_bytes()},
        plain_files={"report.json": json.dumps({"v": version}).encode(), "report.md": b"# report\n"},
        manifest_fields={"model": {"name": "digits_cnn"}, "target": {"name": "fuzz"}},
        signing_key=load_key(str(keys / "signing-private.pem"), "signing", "private", origin="fuzz"),
        recipients=[load_key(str(keys / "encryption-public.pem"), "encryption", "public", origin="fuzz")],
        version=version,
        expires=None,
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mutate(rng: random.Random, bundle: Path, twin: Path) -> str:
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    kind = rng.choice(
        [
            "flip",
            "flip",
            "flip",
            "multiflip",
            "truncate",
            "append",
            "insert",
            "delete_range",
            "swap_file",
            "remove_file",
            "extra_file",
            "replace_json_value",
        ]
    )
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "multiflip" and data:
        for _ in range(rng.randint(2, 16)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(len(data) + 1) if data else 0 :]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "insert" and data:
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete_range" and data:
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 64)]
    elif kind == "swap_file":
        other = twin / target.relative_to(bundle)
        if other.exists():
            data = bytearray(other.read_bytes())
    elif kind == "remove_file":
        target.unlink()
        return f"{kind}:{target.name}"
    elif kind == "extra_file":
        name = rng.choice([".hidden", "extra.bin", "model.onnx", "sub/model.onnx.enc", "manifest.json.bak"])
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(b"x" * rng.randint(0, 100))
        return f"{kind}:{name}"
    elif kind == "replace_json_value" and target.suffix in (".json", ".sig"):
        text = data.decode("utf-8", "replace")
        for old, new in (("1", "2"), ("true", "false"), ('"a', '"b'), ("e", "E"), (":", ": "), ("version", "versiom")):
            if old in text:
                text = text.replace(old, new, 1)
                break
        data = bytearray(text.encode())
    target.write_bytes(bytes(data))
    return f"{kind}:{target.name}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lepton-fuzz-"))
    try:
        keys = work / "keys"
        generate_keys(keys)
        base = _make(work / "base" / "m.fuzz.lepton", keys, 1)
        twin = _make(work / "twin" / "m.fuzz.lepton", keys, 1)
        archive_base = write_archive(base, work / "m.fuzz.lepton.zip")
        original = _snapshot(base)
        counts: Counter[str] = Counter()
        accepted, uncaught, unchanged = [], [], 0
        start = time.perf_counter()
        for i in range(args.iterations):
            case = work / "case" / "m.fuzz.lepton"
            shutil.rmtree(case.parent, ignore_errors=True)
            shutil.copytree(base, case)
            what = mutate(rng, case, twin)
            target = case
            if i % 5 == 4:  # one in five runs against the single-file archive of the mutated folder
                target = write_archive(case, work / "case" / "m.fuzz.lepton.zip")
            if _snapshot(case) == original:
                unchanged += 1
                continue
            counts[what.split(":")[0]] += 1
            try:
                open_bundle(
                    target,
                    key=str(keys / "encryption-private.pem"),
                    trust=str(keys / "signing-public.pem"),
                    state_path=work / "state.json",
                )
                accepted.append(what)
            except LeptonError:
                pass
            except Exception:  # noqa: BLE001 - exactly what we are counting
                uncaught.append((what, traceback.format_exc(limit=3)))
        # Also mutate the archive bytes directly (zip framing, headers).
        raw = archive_base.read_bytes()
        import zipfile

        with zipfile.ZipFile(archive_base) as zf:  # zip metadata: local headers and the central directory
            metadata = [
                o
                for info in zf.infolist()
                for o in range(info.header_offset, info.header_offset + 30 + len(info.filename))
            ]
            metadata += list(range(zf.start_dir, len(raw)))
        for _ in range(args.iterations // 4):
            data = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                where = rng.choice(metadata) if rng.random() < 0.5 else rng.randrange(len(data))
                data[where] = rng.randrange(256)
            if bytes(data) == raw:
                continue
            path = work / "case" / "raw.lepton.zip"
            path.write_bytes(bytes(data))
            counts["archive_bytes"] += 1
            try:
                open_bundle(
                    path,
                    key=str(keys / "encryption-private.pem"),
                    trust=str(keys / "signing-public.pem"),
                    state_path=work / "state.json",
                )
                accepted.append("archive_bytes")
            except LeptonError:
                pass
            except Exception:  # noqa: BLE001
                uncaught.append(("archive_bytes", traceback.format_exc(limit=3)))
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(counts.values())
    print(f"{'mutation':<20} {'count':>6}")
    for kind, n in sorted(counts.items()):
        print(f"{kind:<20} {n:>6}")
    print(f"{'total':<20} {total:>6}   (+{unchanged} no-op mutations skipped)   {seconds:.1f}s")
    print(f"accepted: {len(accepted)}   uncaught exceptions: {len(uncaught)}")
    for what, tb in uncaught[:5]:
        print(f"--- uncaught after {what}\n{tb}")
    for what in accepted[:10]:
        print(f"--- accepted after {what}")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_bundle.json").write_text(
        json.dumps(
            {
                "iterations": args.iterations,
                "seed": args.seed,
                "mutations": total,
                "by_kind": counts,
                "no_ops_skipped": unchanged,
                "accepted": len(accepted),
                "accepted_cases": accepted[:50],
                "uncaught": len(uncaught),
                "uncaught_cases": [w for w, _ in uncaught[:50]],
                "seconds": round(seconds, 1),
            },
            indent=2,
        )
    )
    return 0 if not uncaught and not accepted else 1


if __name__ == "__main__":
    sys.exit(main())
