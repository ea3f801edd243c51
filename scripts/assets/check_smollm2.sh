#!/usr/bin/env bash
# Loads the converted SmolLM2 folder with Hugging Face transformers, prints greedy answers to three chat prompts,
# and writes scripts/assets/smollm2_reference.json (token ids our Rust decoder must reproduce, plus transformers'
# CPU throughput). Needs its own venv .deps/pycheck with the full PyPI torch (about 4.7 GB, a few minutes once).
#
#   scripts/assets/check_smollm2.sh [--no-bench]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.deps/pycheck"
PINS=(torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3)

say()  { printf '\033[1mcheck_smollm2:\033[0m %s\n' "$*"; }
fail() { printf '\033[31mcheck_smollm2: error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || fail "python3 is missing; install python3 and python3-venv"
"$ROOT/scripts/assets.sh" smollm2 || fail "scripts/assets.sh smollm2 failed: the converted model is needed first"

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the Python venv .deps/pycheck"
  python3 -m venv "$VENV" || fail "python3 -m venv failed: install python3-venv"
fi
PY="$VENV/bin/python"
need=$("$PY" - "${PINS[@]}" <<'EOF'
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have != want:
        print(pin)
EOF
)
if [ -n "$need" ]; then
  say "installing $(echo $need) (the Linux torch wheel is the CUDA build, about 4.7 GB; it runs on CPU too)"
  # shellcheck disable=SC2086
  "$PY" -m pip --disable-pip-version-check -q install $need || fail "pip could not install $(echo $need)"
else
  say "${PINS[*]} already installed"
fi
"$PY" -c 'import torch' 2>/dev/null \
  || fail ".deps/pycheck's torch does not import (a slim --no-deps torch?); remove .deps/pycheck and re-run"

exec "$PY" "$ROOT/scripts/assets/check_smollm2.py" "$@"
