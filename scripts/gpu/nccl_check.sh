#!/usr/bin/env bash
# NCCL check for a GPU host, ready for the first time one is available: a 2-rank NCCL all-reduce (in place on
# torch tensors, plus broadcast, barrier, bucketed gradients and a rank that leaves) and a 2-rank data-parallel
# value-training run compared with a 1-rank one, then all-gather / reduce-scatter and the 2-rank fully sharded
# (ZeRO-3, `[value] sharding = "full"`) training step compared with the same 1-rank run. See
# worker/examples/nccl_check.rs for the phases.
#
# With a single GPU both ranks run on it. NCCL does not allow two ranks of one communicator on one GPU, so each
# rank gets its own NCCL_HOSTID and NCCL treats them as two hosts talking over its socket transport. That is a
# FUNCTIONAL check of our code path only (rendezvous, in-place calls, deadlines, training); its timings say
# nothing about multi-GPU performance. With two or more GPUs each rank has its own.
#
#   scripts/gpu/nccl_check.sh           set up (full CUDA libtorch, idempotent), build, run
#   SKIP_SETUP=1 scripts/gpu/nccl_check.sh   when .deps/ already holds the full CUDA install
#
# Needs: an NVIDIA driver, and PyPI reachable for the first set-up (the full torch 2.13.0 install brings
# nvidia-nccl-cu13 2.29.7, the NCCL this build's cudarc bindings match).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

say()  { printf '\033[1mnccl_check:\033[0m %s\n' "$*"; }
fail() { printf '\033[31mnccl_check: error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 || fail "no NVIDIA GPU visible (nvidia-smi -L failed)"
nvidia-smi -L

if [ -z "${SKIP_SETUP:-}" ]; then
  IRO_TORCH=full bash scripts/setup.sh
fi
[ "$(cat .deps/torch-flavour 2>/dev/null)" = full ] || fail ".deps holds the '$(cat .deps/torch-flavour 2>/dev/null)' libtorch; run without SKIP_SETUP (or IRO_TORCH=full scripts/setup.sh)"

# cudarc opens `libnccl.so` by name; pip's nvidia-nccl-cu13 ships only libnccl.so.2. Link it and put its folder on
# the loader's path (dlopen by name does not search libtorch's rpath).
site="$(.deps/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nccl_dir="$site/nvidia/nccl/lib"
[ -f "$nccl_dir/libnccl.so.2" ] || fail "$nccl_dir/libnccl.so.2 not found: the full torch install should have brought nvidia-nccl-cu13"
[ -e "$nccl_dir/libnccl.so" ] || ln -s libnccl.so.2 "$nccl_dir/libnccl.so"
export LD_LIBRARY_PATH="$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "NCCL from $nccl_dir"

# The GPU build force-links libtorch_cuda.so (see build/libtorch_rpath.rs), or CUDA would look unavailable.
export IRO_LINK_CUDA=1
say "building the check (release)"
cargo build --release -p iro-worker --example nccl_check
NCCL_DEBUG="${NCCL_DEBUG:-WARN}" target/release/examples/nccl_check
