#!/usr/bin/env bash
# Train on GPU nodes under SLURM: one process per node drives all of that node's GPUs; the
# first node of the allocation is the jax.distributed coordinator.
#
#   sbatch --nodes=4 launch/slurm.sh -- train --config=configs/phi-2.py --workdir=/shared/runs/phi-2
#   launch/slurm.sh --dry-run -- train ...    # print the srun command (inside or outside a job)
#
# Options (before --):
#   --port P         coordinator port on the first node (default 12000 + job id % 20000)
#   --python EXE     interpreter on the nodes (default: $PYTHON, else python3)
#   --dry-run        print the exact commands, start nothing
# Outside an allocation, --dry-run reads the node list from SLURM_JOB_NODELIST (a plain
# comma-separated list there, e.g. gpu1,gpu2) and the job id from SLURM_JOB_ID (default 0).
# The workdir must be on a filesystem every node mounts: all processes write checkpoints.
#
#SBATCH --job-name=phi-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=phi-jax-%j.log
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

port=""
python="${PYTHON:-python3}"
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option $1 (phi-jax arguments go after --)" >&2; usage 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "slurm.sh: no phi-jax command given; e.g. -- train --config=configs/phi-2.py --workdir=DIR" >&2
  exit 2
fi

nodelist="${SLURM_JOB_NODELIST:-}"
if [[ -z "$nodelist" ]]; then
  echo "slurm.sh: not inside a SLURM allocation (no SLURM_JOB_NODELIST); submit with sbatch," \
       "or set SLURM_JOB_NODELIST=host1,host2 with --dry-run" >&2
  exit 2
fi
if command -v scontrol >/dev/null 2>&1; then
  mapfile -t hosts < <(scontrol show hostnames "$nodelist")
elif [[ "$dry_run" == 1 && "$nodelist" != *"["* ]]; then
  IFS=, read -r -a hosts <<< "$nodelist"
else
  echo "slurm.sh: cannot expand the node list '$nodelist' without scontrol" >&2
  exit 2
fi
num_nodes=${#hosts[@]}
job_id="${SLURM_JOB_ID:-0}"
port="${port:-$(( 12000 + job_id % 20000 ))}"
coordinator="${hosts[0]}:${port}"

# One task per node; each reads its rank from SLURM_PROCID (phi_jax.distributed does).
cmd=(srun --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
     env "PHI_JAX_COORDINATOR=${coordinator}" "PHI_JAX_NUM_PROCESSES=${num_nodes}"
     "$python" -m phi_jax.cli "$@")
if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
echo "slurm.sh: ${num_nodes} nodes, coordinator ${coordinator}" >&2
exec "${cmd[@]}"
