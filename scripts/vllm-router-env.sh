#!/usr/bin/env bash
# Installs vllm-router (vllm-project/router, from PyPI) into a cached venv: the baseline
# `disagg scoreboard` and `cargo bench --bench router` measure against.
# Idempotent: a complete venv is reused. Prints VLLM_ROUTER=<path of the vllm-router binary>.
#   scripts/vllm-router-env.sh [--print]
set -euo pipefail
VERSION=0.1.17
CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/vllm-router-venv"
if [[ "${1:-}" == "--print" ]]; then echo "VLLM_ROUTER=$VENV/bin/vllm-router"; exit 0; fi
source "$(dirname "$0")/pip-venv.sh"
pip_venv vllm-router-env "$VENV" "vllm-router==$VERSION" sh -c 'vllm-router --help > /dev/null'
echo "VLLM_ROUTER=$VENV/bin/vllm-router"
