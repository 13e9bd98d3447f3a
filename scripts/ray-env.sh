#!/usr/bin/env bash
# Installs Ray (from PyPI) into a cached venv for `disagg launch --ray` and its tests
# (and pyzmq + msgpack for the P2pNccl registration test).
# Idempotent: a complete venv is reused. Prints RAY_VENV=<path>.
#   scripts/ray-env.sh [--print]
set -euo pipefail
RAY_VERSION=2.60.0
CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/ray-venv"
STAMP="ray=$RAY_VERSION"
if [[ "${1:-}" == "--print" ]]; then echo "RAY_VENV=$VENV"; exit 0; fi
say() { printf '[ray-env] %s\n' "$*" >&2; }
if [[ -f "$VENV/.disagg-complete" && "$(cat "$VENV/.disagg-complete")" == "$STAMP" ]]; then
  say "venv present and complete: $VENV"
else
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  PY="${PYTHON:-python3}"
  "$PY" -m venv "$VENV" || { say "error: cannot create a venv with $PY"; exit 1; }
  "$VENV/bin/pip" install --no-input --progress-bar off -q "ray==$RAY_VERSION" \
    || { say "error: pip could not install ray==$RAY_VERSION (is PyPI reachable?)"; exit 1; }
  "$VENV/bin/python" -c 'import ray' || { say "error: the venv does not import ray"; exit 1; }
  echo "$STAMP" > "$VENV/.disagg-complete"
  say "venv ready: $VENV"
fi
# pyzmq and msgpack: the P2pNccl registration test speaks to `disagg route` as vLLM's
# p2p_nccl_engine.py does, with the same libraries (Ray brings msgpack already).
if ! "$VENV/bin/python" -c 'import zmq, msgpack' 2>/dev/null; then
  "$VENV/bin/pip" install --no-input --progress-bar off -q pyzmq msgpack \
    || { say "error: pip could not install pyzmq and msgpack (is PyPI reachable?)"; exit 1; }
fi
echo "RAY_VENV=$VENV"
