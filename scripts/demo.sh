#!/usr/bin/env bash
# The main job (README): a simulated prefill and decode, one request sent through the PD
# handshake by hand (prefill leg, then decode leg with the prefill's kv_transfer_params),
# and the same request colocated, to show both give the same text.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
BIN=target/release/disagg
LOGS=$(mktemp -d)
$BIN sim --port 0 --role prefill > "$LOGS/prefill.out" 2> "$LOGS/prefill.log" &
P=$!
$BIN sim --port 0 --role decode > "$LOGS/decode.out" 2> "$LOGS/decode.log" &
D=$!
trap 'kill $P $D 2>/dev/null || true' EXIT
url_of() { for _ in $(seq 100); do grep -o 'http://[^ ]*' "$1" 2>/dev/null && return; sleep 0.05; done; echo "no banner in $1" >&2; exit 1; }
PURL=$(url_of "$LOGS/prefill.out"); DURL=$(url_of "$LOGS/decode.out")
echo "prefill (simulated): $PURL"; echo "decode  (simulated): $DURL"
PROMPT='{"prompt": "Disaggregated serving splits prefill from decode", "max_tokens": 12, "temperature": 0'
KV='"kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}'
PREFILL=$(curl -sf "$PURL/v1/completions" -H 'content-type: application/json' -d "$PROMPT, \"max_tokens\": 1, \"stream\": false, $KV}")
PARAMS=$(printf '%s' "$PREFILL" | sed 's/.*"kv_transfer_params":\({.*}\)}$/\1/')
echo "prefill returned kv_transfer_params: $PARAMS"
DECODE=$(curl -sf "$DURL/v1/completions" -H 'content-type: application/json' -d "$PROMPT, \"kv_transfer_params\": $PARAMS}")
echo "decode answered: $DECODE"
echo "colocated:       $(curl -sf "$PURL/v1/completions" -H 'content-type: application/json' -d "$PROMPT}")"
