#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set-up, assets, build, run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
cargo build --release --locked --bin iro
IRO=target/release/iro
"$IRO" info
"$IRO" check-config configs/demo.toml >/dev/null && echo "demo: configs/demo.toml is valid"
