#!/usr/bin/env bash
# Issue 4's quality benchmark: IRO (2 iterations) against the base policy and Best-of-4 on 48 held-out AlpacaEval
# prompts, with `head`-kind value functions (configs/bench-quality.toml) and `model`-kind ones
# (configs/bench-quality-model.toml). Each run resumes if interrupted; the tables land in
# runs/bench-quality-{head,model}/report/summary.md. Tens of minutes per config on a 2-core CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bash scripts/setup.sh
bash scripts/assets.sh
cargo build --release --locked --bin iro
for config in configs/bench-quality.toml configs/bench-quality-model.toml; do
  echo "== $config"
  /usr/bin/time -f "wall %e s" target/release/iro run "$config"
done
