#!/usr/bin/env bash
# Run N phi-jax processes on this machine as one multi-host JAX job (jax.distributed over
# localhost). The same code path as a pod: each process reads its own data shard, all of them
# write the checkpoints, process 0 logs. Useful to test multi-host runs on one box, and to drive
# several GPUs with one process each.
#
#   launch/local.sh [options] -- train --config=configs/tiny.py --workdir=runs/tiny
#
# Options:
#   --processes N          number of processes (default 2)
#   --cpu-devices D        CPU only: fake D devices per process (JAX_PLATFORMS=cpu)
#   --gpus-per-process G   give process i the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)
#   --port P               coordinator port on 127.0.0.1 (default 12355)
#   --logdir DIR           per-process logs (default logs/local); process 0's log is streamed
#   --python EXE           interpreter (default: $PYTHON, else python3)
#   --dry-run              print the exact commands, start nothing
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

processes=2
cpu_devices=""
gpus_per_process=""
port=12355
logdir="logs/local"
python="${PYTHON:-python3}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --cpu-devices) cpu_devices="$2"; shift 2 ;;
    --gpus-per-process) gpus_per_process="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (phi-jax arguments go after --)" >&2; usage 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: no phi-jax command given; e.g. -- train --config=configs/tiny.py --workdir=DIR" >&2
  exit 2
fi
if ! [[ "$processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --processes must be a positive integer, got '$processes'" >&2
  exit 2
fi

# The exact argv of process $1 (then the phi-jax arguments), into the array `cmd`.
build_command() {
  local i="$1"; shift
  cmd=(env "PHI_JAX_COORDINATOR=127.0.0.1:${port}" "PHI_JAX_NUM_PROCESSES=${processes}"
       "PHI_JAX_PROCESS_ID=${i}")
  if [[ -n "$cpu_devices" ]]; then
    cmd+=("JAX_PLATFORMS=cpu"
          "XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_force_host_platform_device_count=${cpu_devices}")
  fi
  if [[ -n "$gpus_per_process" ]]; then
    local first=$(( i * gpus_per_process )) ids="" g
    for (( g = first; g < first + gpus_per_process; g++ )); do ids+="${ids:+,}${g}"; done
    cmd+=("CUDA_VISIBLE_DEVICES=${ids}")
  fi
  cmd+=("$python" -m phi_jax.cli "$@")
}

if [[ "$dry_run" == 1 ]]; then
  echo "mkdir -p $(printf '%q' "$logdir")"
  for (( i = 0; i < processes; i++ )); do
    build_command "$i" "$@"
    printf '%q ' "${cmd[@]}"
    printf '> %q 2>&1 &\n' "${logdir}/process_${i}.log"
  done
  exit 0
fi

mkdir -p "$logdir"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

for (( i = 0; i < processes; i++ )); do
  build_command "$i" "$@"
  "${cmd[@]}" > "${logdir}/process_${i}.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -F --pid="${pids[0]}" "${logdir}/process_0.log" 2>/dev/null &
tail_pid=$!

status=0
for (( i = 0; i < processes; i++ )); do
  code=0
  wait "${pids[$i]}" || code=$?
  if [[ "$code" != 0 && "$status" == 0 ]]; then
    status=$code
    echo "local.sh: process $i exited with status $code; stopping the others" \
         "(log: ${logdir}/process_${i}.log)" >&2
    cleanup
  fi
done
wait "$tail_pid" 2>/dev/null || true
exit "$status"
