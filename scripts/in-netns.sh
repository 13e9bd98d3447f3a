#!/usr/bin/env bash
# Runs a command inside a fresh network namespace whose only interface is loopback, so
# everything it starts (vLLM, whose UCX also listens on the machine's address; Ray) can
# only talk to 127.0.0.1. The namespace is deleted afterwards; namespaces left by runs
# that were killed are deleted first. Needs root (ip netns).
#
#   scripts/in-netns.sh CMD [ARGS...]
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
  echo "in-netns.sh: needs root to create a network namespace (ip netns add)" >&2
  exit 1
fi
command -v ip >/dev/null || { echo "in-netns.sh: iproute2 (ip) is missing: apt-get install iproute2" >&2; exit 1; }
for ns in $(ip netns list 2>/dev/null | awk '/^disagg-/ {print $1}'); do
  if [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]]; then
    ip netns del "$ns" 2>/dev/null || true
  fi
done
NS="disagg-$$"
ip netns add "$NS"
cleanup() {
  for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
ip netns exec "$NS" ip link set lo up
set +e
ip netns exec "$NS" "$@"
status=$?
exit $status
