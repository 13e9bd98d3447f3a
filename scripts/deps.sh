#!/usr/bin/env bash
# Debian packages the project needs: iproute2 (network namespaces for real-vLLM and Ray
# tests), curl (scripts/demo.sh), fonts-dejavu-core (the text of `disagg bench --plot`),
# libibverbs1 (Mooncake's transfer engine links it, even over TCP), openssl (the TLS tests'
# certificates, scripts/test-certs.sh), postgresql (the Responses store shared by router
# replicas: the tests start a server of their own on loopback), prometheus (the dashboard
# and rules in deploy/ are checked on a real Prometheus and its promtool), tmux (`disagg top`
# is driven in a real terminal), munge, slurmctld, slurmd and slurm-client (`disagg launch` under a
# real Slurm cluster on loopback: scripts/slurm-cluster.sh, tests/slurm.rs).
# Installs only what is missing.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || missing+=(fonts-dejavu-core)
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 ' || missing+=(libibverbs1)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v tmux >/dev/null || missing+=(tmux)
command -v munged >/dev/null || missing+=(munge)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null && command -v scontrol >/dev/null || missing+=(slurm-client)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "[deps] installing ${missing[*]}" >&2
  if [[ $EUID -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "[deps] could not install ${missing[*]} with apt-get" >&2; exit 1; }
fi
