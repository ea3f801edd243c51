#!/usr/bin/env bash
# Installs moto's S3-compatible server (`moto_server`) into the project venv .deps/venv, for the object-store
# test common/tests/s3.rs, which starts it on a free loopback port. Idempotent: skips when the pinned version
# is already there.
#
#   scripts/moto.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.deps/venv"
MOTO_VERSION="5.2.1"

say()  { printf '\033[1mmoto:\033[0m %s\n' "$*"; }
fail() { printf '\033[31mmoto: error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || fail "python3 is missing"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the project venv .deps/venv"
  python3 -m venv "$VENV" || fail "python3 -m venv failed: install python3-venv"
fi

installed="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true)"
if [ "$installed" = "$MOTO_VERSION" ] && [ -x "$VENV/bin/moto_server" ]; then
  say "moto_server $MOTO_VERSION already installed (.deps/venv/bin/moto_server)"
  exit 0
fi

say "installing moto[server]==$MOTO_VERSION into .deps/venv"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "moto[server]==$MOTO_VERSION" \
  || fail "pip could not install moto[server]==$MOTO_VERSION"
[ -x "$VENV/bin/moto_server" ] || fail "moto_server is missing from .deps/venv/bin after the install"
say "moto_server $MOTO_VERSION ready (.deps/venv/bin/moto_server)"
