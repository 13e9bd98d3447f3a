#!/usr/bin/env bash
# The main job (README): `disagg launch` with its built-in demo topology (two SIMULATED
# prefill instances, one SIMULATED decode instance, `disagg route` in front; no GPU, no
# model needed), one request through the router, then a clean stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked -q
WORK=$(mktemp -d)
cd "$WORK"
"$OLDPWD/target/release/disagg" launch > launch.out 2> launch.err &
LAUNCH=$!
trap 'kill -TERM $LAUNCH 2>/dev/null; wait $LAUNCH 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  URL=$(sed -n 's/^disagg launch ready: //p' launch.out)
  [[ -n "$URL" ]] && break
  kill -0 $LAUNCH 2>/dev/null || { cat launch.err >&2; exit 1; }
  sleep 0.1
done
[[ -n "${URL:-}" ]] || { echo "the demo topology did not come up:" >&2; cat launch.err >&2; exit 1; }
cat launch.out
echo
echo "POST $URL/v1/completions"
curl -sf "$URL/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "demo-model", "prompt": "Disaggregated serving splits prefill from decode", "max_tokens": 16}'
echo
echo
echo "the router's view of its workers ($URL/workers):"
curl -sf "$URL/workers"
echo
kill -TERM $LAUNCH
wait $LAUNCH
trap - EXIT
echo "stopped; logs were in $WORK/disagg-demo/logs"
