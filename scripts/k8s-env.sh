#!/usr/bin/env bash
# Installs kubernetes-validate (from PyPI: the Kubernetes API's own OpenAPI schemas, for
# every release, offline) into a cached venv, for the tests that validate the manifests
# `disagg launch --k8s` writes. Idempotent. Prints K8S_VENV=<path>.
#   scripts/k8s-env.sh [--print]
set -euo pipefail
VERSION=1.37.0
CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/k8s-validate-venv"
if [[ "${1:-}" == "--print" ]]; then echo "K8S_VENV=$VENV"; exit 0; fi
source "$(dirname "$0")/pip-venv.sh"
pip_venv k8s-env "$VENV" "kubernetes-validate==$VERSION" kubernetes-validate --version
echo "K8S_VENV=$VENV"
