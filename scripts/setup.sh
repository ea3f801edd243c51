#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test iro, into the project-local folder `.deps/`.
# Idempotent: every step checks first and skips what is already there. Safe to re-run.
#
#   scripts/setup.sh            libtorch (slim CPU, or full CUDA where nvidia-smi works) + test tools
#   IRO_TORCH=full|slim         force one libtorch flavour
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS="$ROOT/.deps"
VENV="$DEPS/venv"
TORCH_VERSION="2.13.0"   # tch 0.26.0 is built against exactly this libtorch

say()  { printf '\033[1msetup:\033[0m %s\n' "$*"; }
fail() { printf '\033[31msetup: error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null || fail "python3 is missing (needed only to fetch libtorch from PyPI); install python3 and python3-venv"
command -v cargo >/dev/null   || fail "cargo is missing; install a Rust toolchain (rustup) first"

mkdir -p "$DEPS"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating a project-local Python venv at .deps/venv (only a carrier for PyPI's libtorch)"
  python3 -m venv "$VENV" || fail "python3 -m venv failed: install python3-venv"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

flavour="${IRO_TORCH:-}"
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=full; else flavour=slim; fi
fi

site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
have_torch() { [ -f "$site/torch/lib/libtorch_cpu.so" ] && grep -qx "$TORCH_VERSION" "$DEPS/torch-version" 2>/dev/null; }

if have_torch && [ "$(cat "$DEPS/torch-flavour" 2>/dev/null)" = "$flavour" ]; then
  say "libtorch $TORCH_VERSION ($flavour) already installed"
else
  if [ "$flavour" = full ]; then
    say "installing PyTorch $TORCH_VERSION with its CUDA libraries (about 4.7 GB, a few minutes)"
    "${PIP[@]}" install "torch==$TORCH_VERSION" || fail "pip could not install torch==$TORCH_VERSION"
    # cudarc's dynamic loader looks for libnccl.so; the wheel ships only libnccl.so.2.
    nccl="$(ls "$site"/nvidia/nccl/lib/libnccl.so.2 2>/dev/null || true)"
    [ -n "$nccl" ] && ln -sf "$nccl" "$(dirname "$nccl")/libnccl.so"
  else
    say "installing the slim CPU libtorch $TORCH_VERSION (about 1.3 GB, under a minute)"
    # libtorch_cpu.so links libcudart and libcupti even on CPU: those two small wheels are all it needs.
    "${PIP[@]}" install --no-deps "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 \
      || fail "pip could not install torch==$TORCH_VERSION (slim)"
  fi
  echo "$TORCH_VERSION" > "$DEPS/torch-version"
  echo "$flavour" > "$DEPS/torch-flavour"
fi
[ -f "$site/torch/lib/libtorch_cpu.so" ] || fail "libtorch_cpu.so not found under $site/torch/lib after install"

# A stable path for .cargo/config.toml's LIBTORCH, whatever the Python minor version is.
ln -sfn "$site/torch" "$DEPS/libtorch"
say "LIBTORCH -> .deps/libtorch ($(readlink "$DEPS/libtorch"))"

# A GPU build must force-link libtorch_cuda.so (--as-needed drops it otherwise); the slim one must not.
if [ "$flavour" = full ]; then touch "$DEPS/cuda-link"; else rm -f "$DEPS/cuda-link"; fi

say "done"
