"""Run by the export venv's Python only (torch, transformers, tokenizers; no Lepton imports).

python minilm_in_venv.py export MODEL_DIR OUT.onnx SEQ_LEN
python minilm_in_venv.py tokenize MODEL_DIR SENTENCES.json SEQ_LEN OUT.npz
"""

import json
import sys

import numpy as np


def tokenize(model_dir: str, sentences_json: str, seq_len: int, out: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    with open(sentences_json, encoding="utf-8") as handle:
        encodings = tokenizer.encode_batch(json.load(handle))
    np.savez(
        out,
        input_ids=np.array([e.ids for e in encodings], np.int64),
        attention_mask=np.array([e.attention_mask for e in encodings], np.int64),
        token_type_ids=np.array([e.type_ids for e in encodings], np.int64),
    )


def export(model_dir: str, out: str, seq_len: int) -> None:
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):  # keyword arguments: BertModel.forward's positional order changes across versions
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ones = torch.ones(1, seq_len, dtype=torch.int64)
    args = (ones * 101, ones, torch.zeros_like(ones))
    with torch.no_grad():
        torch.onnx.export(
            Encoder().eval(),
            args,
            out,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "token_type_ids")
            }
            | {"last_hidden_state": {0: "batch", 1: "sequence"}},
        )


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        tokenize(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
