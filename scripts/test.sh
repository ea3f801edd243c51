#!/usr/bin/env bash
# The whole test suite from a fresh machine: set-up (idempotent), build, every test of every crate.
# This is the README's test command, and .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A one-off build gains nothing from incremental state (about 2 GB of it); a developer's own CARGO_INCREMENTAL wins.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi
# The suite needs roughly 8 GB free (libtorch, assets, the build); say so up front rather than failing mid-link.
free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
echo "test: $((free_kb / 1024 / 1024)) GB free on $(df -P . | awk 'NR==2 {print $6}')"

bash scripts/setup.sh
bash scripts/assets.sh     # the real small model, sentence encoder and AlpacaEval prompts some tests check
bash scripts/moto.sh       # a real S3-compatible server for the object-store tests
echo "test: the control plane must not link libtorch"
for crate in iro-common iro-coordinator; do
  if cargo tree --locked -p "$crate" -e normal,build | grep -qwE 'tch|torch-sys'; then
    echo "test: error: $crate depends on tch/torch-sys" >&2; exit 1
  fi
done
echo "test: building the workspace"
cargo build --workspace --all-targets --locked
echo "test: the shipped run configs validate"
for config in configs/*.toml; do target/debug/iro check-config "$config" >/dev/null; done
echo "test: the Kubernetes manifests (flags against the built binary, names, run configs)"
.deps/venv/bin/python scripts/check_k8s.py   # PyYAML comes with moto into .deps/venv
echo "test: running every test"
cargo test --workspace --locked "$@"
