#!/usr/bin/env bash
# A real Slurm cluster on loopback, from Debian's packages (scripts/deps.sh installs
# munge, slurmctld, slurmd and the client commands): one munged, one slurmctld and one
# `slurmd -N nK` per node, node K at NodeAddr 127.0.0.K, each slurmd on a port of its own.
# Everything (config, state, spool, logs, sockets) lives in DIR; nothing in /etc is used.
#
#   scripts/slurm-cluster.sh start DIR [NODES] [BASE_PORT] [GPUS]   # prints `export SLURM_CONF=...`
#   scripts/slurm-cluster.sh stop DIR
#
# NODES defaults to 3, BASE_PORT to 17800 (slurmctld on it, slurmd nK on BASE_PORT + K).
# Each node offers the machine's CPUs (oversubscribed: every node is this machine). GPUS
# (default 0): GPU gres per node, as Slurm's gres plugin assigns them (SLURM_GPUS_ON_NODE,
# CUDA_VISIBLE_DEVICES); their device files are /dev/loopN stand-ins (no GPU is used).
# Without, a cluster without GPU gres: `disagg launch` then uses the file's gpus_per_node.
set -euo pipefail
cmd=${1:?start|stop}
dir=${2:?state directory}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

stop() {
  for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
  done
  # slurmd leaves a step's slurmstepd behind only while it still runs a task; wait for
  # the daemons to be gone so a restart reuses the ports.
  for _ in $(seq 50); do
    alive=0
    for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
      [[ -f $pidfile ]] || continue
      pid=$(cat "$pidfile" 2>/dev/null || true)
      [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  rm -f "$dir"/*.pid
}

if [[ $cmd == stop ]]; then
  stop
  exit 0
fi
[[ $cmd == start ]] || { echo "usage: $0 start|stop DIR [NODES] [BASE_PORT]" >&2; exit 2; }
nodes=${3:-3}
base=${4:-17800}
gpus=${5:-0}
for bin in munged slurmctld slurmd srun sbatch scontrol; do
  command -v "$bin" >/dev/null || { echo "[slurm] $bin not found: run scripts/deps.sh" >&2; exit 1; }
done
stop
mkdir -p "$dir/state" "$dir/munge" "$dir/log"
for k in $(seq "$nodes"); do mkdir -p "$dir/spool-n$k"; done
chmod 755 "$dir/munge"
# slurmd needs the cgroup filesystems; `ip netns exec` (scripts/in-netns.sh) remounts /sys
# without them, in a mount namespace of its own: mount the machine's (PID 1's) back there.
if [[ -z $(ls -A /sys/fs/cgroup 2>/dev/null) ]]; then
  while read -r _ target fstype opts _; do
    [[ $target == /sys/fs/cgroup* ]] || continue
    case $fstype in tmpfs | cgroup | cgroup2) ;; *) continue ;; esac
    mkdir -p "$target" 2>/dev/null || true
    mount -t "$fstype" -o "$opts" "$fstype" "$target" || echo "[slurm] cannot mount $fstype on $target" >&2
  done </proc/1/mounts
fi

# Slurm's daemons look their own address up with AI_ADDRCONFIG, which finds nothing where
# loopback is the only interface (scripts/in-netns.sh's namespaces): there, a veth pair
# whose both ends stay in the namespace gives it an address (nothing is sent to it).
if [[ -z $(ip -4 -o addr show scope global 2>/dev/null) ]]; then
  ip link add slurm0 type veth peer name slurm1 && ip addr add 10.254.254.254/32 dev slurm0 \
    && ip link set slurm0 up && ip link set slurm1 up \
    || echo "[slurm] cannot add an interface: slurmctld may not find its address" >&2
fi

# munge: a key of our own, a socket in DIR.
if [[ ! -s $dir/munge/munge.key ]]; then
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$dir/munge/munge.key"
munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
user=$(id -un)
{
  echo "ClusterName=disagg"
  echo "SlurmctldHost=localhost(127.0.0.1)"
  echo "SlurmctldPort=$base"
  echo "SlurmUser=$user"
  echo "SlurmdUser=$user"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  echo "AuthInfo=socket=$dir/munge/munge.sock"
  echo "StateSaveLocation=$dir/state"
  echo "SlurmdSpoolDir=$dir/spool-%n"
  echo "SlurmctldPidFile=$dir/slurmctld.pid"
  echo "SlurmdPidFile=$dir/slurmd-%n.pid"
  echo "SlurmctldLogFile=$dir/log/slurmctld.log"
  echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "JobAcctGatherType=jobacct_gather/none"
  echo "AccountingStorageType=accounting_storage/none"
  echo "MpiDefault=none"
  echo "SchedulerType=sched/builtin"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "ReturnToService=2"
  echo "SlurmctldTimeout=30"
  echo "SlurmdTimeout=30"
  echo "KillWait=10"
  echo "InactiveLimit=0"
  echo "MinJobAge=300"
  gres=
  if [[ $gpus -gt 0 ]]; then
    echo "GresTypes=gpu"
    gres="Gres=gpu:$gpus"
  fi
  for k in $(seq "$nodes"); do
    echo "NodeName=n$k NodeAddr=127.0.0.$k NodeHostname=$(hostname) Port=$((base + k)) CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN"
  done
  echo "PartitionName=main Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
} >"$dir/slurm.conf"
if [[ $gpus -gt 0 ]]; then
  { echo "AutoDetect=off"; echo "Name=gpu File=/dev/loop[0-$((gpus - 1))]"; } >"$dir/gres.conf"
else
  rm -f "$dir/gres.conf"
fi
export SLURM_CONF=$dir/slurm.conf

slurmctld -c -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1
for k in $(seq "$nodes"); do
  slurmd -N "n$k" -f "$SLURM_CONF" >"$dir/log/slurmd-n$k.out" 2>&1
done
# Ready when every node is idle.
for _ in $(seq 100); do
  if [[ $(timeout 5 sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle') == "$nodes" ]]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "[slurm] the nodes did not come up idle:" >&2
timeout 5 sinfo -N >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
