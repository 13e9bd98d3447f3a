#!/usr/bin/env bash
# Installs Ray (from PyPI) into a cached venv for `disagg launch --ray` and its tests
# (and pyzmq + msgpack for the P2pNccl registration test).
# Idempotent: a complete venv is reused. Prints RAY_VENV=<path>.
#   scripts/ray-env.sh [--print]
set -euo pipefail
RAY_VERSION=2.60.0
CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/ray-venv"
if [[ "${1:-}" == "--print" ]]; then echo "RAY_VENV=$VENV"; exit 0; fi
source "$(dirname "$0")/pip-venv.sh"
pip_venv ray-env "$VENV" "ray==$RAY_VERSION" python -c 'import ray'
# pyzmq and msgpack: the P2pNccl registration test speaks to `disagg route` as vLLM's
# p2p_nccl_engine.py does, with the same libraries (Ray brings msgpack already).
if ! "$VENV/bin/python" -c 'import zmq, msgpack' 2>/dev/null; then
  "$VENV/bin/pip" install --no-input --progress-bar off -q pyzmq msgpack \
    || { echo "[ray-env] error: pip could not install pyzmq and msgpack (is PyPI reachable?)" >&2; exit 1; }
fi
echo "RAY_VENV=$VENV"
