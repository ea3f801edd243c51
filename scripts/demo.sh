#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set-up, assets, build, run.
# Today that is the frozen policy (SmolLM2-135M-Instruct) answering AlpacaEval instructions through
# `iro generate`; it becomes `iro run configs/demo.toml` (the full IRO loop) when that lands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
bash scripts/assets.sh
cargo build --release --locked --bin iro
IRO=target/release/iro
"$IRO" check-config configs/demo.toml >/dev/null && echo "demo: configs/demo.toml is valid"

mkdir -p runs/demo-generate
# The first 8 AlpacaEval instructions as a prompts file.
python3 - <<'PY'
import json
rows = json.load(open("assets/alpaca_eval/alpaca_eval_gpt4_baseline.json"))[:8]
with open("runs/demo-generate/prompts.jsonl", "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps({"id": i, "prompt": r["instruction"]}) + "\n")
PY
"$IRO" generate --model assets/smollm2-135m-instruct --chat-template chatml \
  --prompts runs/demo-generate/prompts.jsonl --output runs/demo-generate/outputs.jsonl \
  --max-new-tokens 64 --temperature 0.6 --top-p 0.9 --seed 1234 --batch-size 8 --device cpu
python3 - <<'PY'
import json
for r in map(json.loads, open("runs/demo-generate/outputs.jsonl")):
    print(f"\n### {r['prompt']}\n{r['output']}")
PY
