#!/usr/bin/env bash
# Starts ONE real vLLM (CPU) instance serving the tiny offline model, with NixlConnector
# (or MooncakeConnector over TCP) set up for its PD role. Run scripts/vllm-env.sh first. Replaces itself with vLLM (exec),
# so the caller's pid is vLLM's; stop it by signalling its process group.
#
#   scripts/vllm-serve.sh prefill|decode|both|plain PORT [--side-channel-port P] [--cpu N]
#                         [--max-model-len L] [--connector nixl|mooncake]
#                         [--bootstrap-port B] [-- extra vllm serve args]
#
# prefill: kv_role kv_producer; decode: kv_role kv_consumer; both: kv_both (either leg per
# request, as the GB200 guide starts every engine); plain: no KV connector.
set -euo pipefail
ROLE=${1:?usage: vllm-serve.sh prefill|decode|both|plain PORT [...]}
PORT=${2:?usage: vllm-serve.sh prefill|decode|both|plain PORT [...]}
shift 2
SIDE=5600
CPU=0
MAXLEN=2048
CONNECTOR=nixl
BOOTSTRAP=8998
while [[ $# -gt 0 ]]; do
  case "$1" in
    --side-channel-port) SIDE=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --max-model-len) MAXLEN=$2; shift 2 ;;
    --connector) CONNECTOR=$2; shift 2 ;;
    --bootstrap-port) BOOTSTRAP=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "vllm-serve.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
eval "$("$HERE/vllm-env.sh" --print)"
[[ -f "$VENV/.disagg-complete" ]] || { echo "vllm-serve.sh: no complete venv at $VENV: run scripts/vllm-env.sh" >&2; exit 1; }
[[ -f "$MODEL/.disagg-complete" ]] || { echo "vllm-serve.sh: no model at $MODEL: run scripts/vllm-env.sh" >&2; exit 1; }
case "$ROLE" in
  prefill) KV_ROLE=kv_producer ;;
  decode) KV_ROLE=kv_consumer ;;
  both) KV_ROLE=kv_both ;;
  plain) KV_ROLE= ;;
  *) echo "vllm-serve.sh: role must be prefill, decode, both or plain" >&2; exit 2 ;;
esac
KV_ARGS=()
case "$CONNECTOR" in
  nixl)
    [[ -z "$KV_ROLE" ]] || KV_ARGS=(--kv-transfer-config "{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"$KV_ROLE\",\"kv_buffer_device\":\"cpu\",\"kv_connector_extra_config\":{\"num_threads\":0}}") ;;
  mooncake)
    [[ -f "$MOONCAKE/.disagg-complete" ]] || { echo "vllm-serve.sh: no Mooncake transfer engine at $MOONCAKE: run scripts/vllm-env.sh" >&2; exit 1; }
    [[ -z "$KV_ROLE" ]] || KV_ARGS=(--kv-transfer-config "{\"kv_connector\":\"MooncakeConnector\",\"kv_role\":\"$KV_ROLE\",\"kv_connector_extra_config\":{\"mooncake_protocol\":\"tcp\",\"num_workers\":2}}")
    # The shim (see scripts/mooncake_cpu_shim.py) and the engine; every address on loopback.
    export PYTHONPATH="$MOONCAKE/shim:$MOONCAKE/site${PYTHONPATH:+:$PYTHONPATH}"
    export VLLM_HOST_IP=127.0.0.1 VLLM_MOONCAKE_BOOTSTRAP_PORT=$BOOTSTRAP ;;
  *) echo "vllm-serve.sh: --connector must be nixl or mooncake" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=$SIDE
export VLLM_CPU_OMP_THREADS_BIND=$CPU
export NIXL_PTHR_DELAY_US=${NIXL_PTHR_DELAY_US:-1000}
export VLLM_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$VENV/bin/vllm" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype float32 \
  --max-model-len "$MAXLEN" --enforce-eager --served-model-name tiny-llama "${KV_ARGS[@]}" "$@"
