#!/usr/bin/env python3
"""Computes all-MiniLM-L6-v2 sentence embeddings of four fixed texts with Hugging Face transformers and writes
scripts/assets/minilm_reference.json, which the Rust test `minilm_embeddings_match_transformers`
(worker/tests/bert_parity.rs) must reproduce.

The recipe is sentence-transformers' for this model (modules.json: Transformer -> Pooling -> Normalize):
AutoModel's last_hidden_state, mean over the attention mask, L2-normalised; inputs truncated to
sentence_bert_config.json's max_seq_length (256 word pieces, [CLS]/[SEP] included). The fourth text is longer
than that, so truncation is checked too.

Run from the repository root, after scripts/assets.sh has made assets/all-minilm-l6-v2 (the venv .deps/pycheck
has torch 2.13.0 + transformers 5.24.0; scripts/assets/check_smollm2.sh creates it):

    .deps/pycheck/bin/python scripts/assets/check_minilm.py [--model DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A short summary should keep the main point of the post and drop the details.",
    "Café crème, naïve résumé — ünïcödé and CJK 東京 survive the BERT normaliser?",
    # About 500 word pieces: cut to 256 by the encoder.
    " ".join(["Value models score partial answers so that the search keeps the most promising chunks."] * 30),
]


def die(msg: str) -> None:
    print(f"check_minilm: error: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=root / "assets" / "all-minilm-l6-v2")
    ap.add_argument("--out", type=Path, default=root / "scripts" / "assets" / "minilm_reference.json")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        die(f"{args.model} has no config.json: run scripts/assets.sh minilm first")

    modules = json.loads((args.model / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds != ["Transformer", "Pooling", "Normalize"]:
        die(f"unexpected modules.json {kinds}")
    pooling = json.loads((args.model / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        die(f"1_Pooling/config.json is not mean pooling: {pooling}")
    max_len = json.loads((args.model / "sentence_bert_config.json").read_text())["max_seq_length"]

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    out = {
        "producer": "scripts/assets/check_minilm.py",
        "command": ".deps/pycheck/bin/python scripts/assets/check_minilm.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "recipe": "AutoModel last_hidden_state -> mean over attention_mask -> F.normalize(p=2); "
                  f"truncation to max_seq_length {max_len}",
        "max_seq_length": max_len,
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": [[float(x) for x in row] for row in emb.tolist()],
        "cosine": [[round(float(x), 6) for x in row] for row in (emb @ emb.T).tolist()],
    }
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"check_minilm: wrote {args.out} ({len(SENTENCES)} texts, lengths {[len(i) for i in ids]})")


if __name__ == "__main__":
    main()
