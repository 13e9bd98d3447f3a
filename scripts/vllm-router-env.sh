#!/usr/bin/env bash
# Installs vllm-router (vllm-project/router, from PyPI) into a cached venv: the baseline
# `disagg scoreboard` and `cargo bench --bench router` measure against.
# Idempotent: a complete venv is reused. Prints VLLM_ROUTER=<path of the vllm-router binary>.
#   scripts/vllm-router-env.sh [--print]
set -euo pipefail
VERSION=0.1.17
CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/vllm-router-venv"
STAMP="vllm-router=$VERSION"
if [[ "${1:-}" == "--print" ]]; then echo "VLLM_ROUTER=$VENV/bin/vllm-router"; exit 0; fi
say() { printf '[vllm-router-env] %s\n' "$*" >&2; }
if [[ -f "$VENV/.disagg-complete" && "$(cat "$VENV/.disagg-complete")" == "$STAMP" ]]; then
  say "venv present and complete: $VENV"
else
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  PY="${PYTHON:-python3}"
  "$PY" -m venv "$VENV" || { say "error: cannot create a venv with $PY"; exit 1; }
  "$VENV/bin/pip" install --no-input --progress-bar off -q "vllm-router==$VERSION" \
    || { say "error: pip could not install vllm-router==$VERSION (is PyPI reachable?)"; exit 1; }
  "$VENV/bin/vllm-router" --help > /dev/null || { say "error: vllm-router does not run"; exit 1; }
  echo "$STAMP" > "$VENV/.disagg-complete"
  say "venv ready: $VENV"
fi
echo "VLLM_ROUTER=$VENV/bin/vllm-router"
