#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set-up, assets, build, then the whole IRO loop
# (`iro run configs/demo.toml`): SmolLM2-135M-Instruct frozen, AlpacaEval prompts, the MiniLM similarity reward,
# 2 iterations plus the base and Best-of-N baselines, the results table at the end. A killed run resumes when
# the script is started again; `runs/demo/report/` holds summary.json, summary.md and reward.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
bash scripts/assets.sh
cargo build --release --locked --bin iro
exec target/release/iro run configs/demo.toml "$@"
