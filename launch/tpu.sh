#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, install phi_jax on every worker,
# start the same command on all workers (--worker=all), stream worker 0's log, delete on request.
# Multi-host start-up is JAX's own: PHI_JAX_DISTRIBUTED=1 makes phi-jax call
# jax.distributed.initialize(), which finds the other workers from the TPU metadata.
#
#   launch/tpu.sh --name phi2 --zone us-west4-a --type v5litepod-16 --bucket gs://my-bucket run -- \
#       train --config=configs/phi-2.py                  # workdir: gs://my-bucket/runs/phi2
#   launch/tpu.sh --name phi2 --zone us-west4-a logs      # re-attach to the log
#   launch/tpu.sh --name phi2 --zone us-west4-a stop      # kill the run on every worker
#   launch/tpu.sh --name phi2 --zone us-west4-a delete    # delete the TPU (and queued resource)
#
# Actions: run (create or reuse, install, start, stream logs), create, install, start, logs,
# stop, delete.  Options:
#   --name NAME          TPU VM name (required)
#   --zone ZONE          e.g. us-west4-a (v5e), us-east5-a (v5p) (required)
#   --type TYPE          accelerator type, e.g. v5litepod-8, v5litepod-256, v5p-128 (create)
#   --version VERSION    TPU software version (default: v2-alpha-tpuv5-lite for v5e, else
#                        v2-alpha-tpuv5)
#   --project PROJECT    gcloud project (default: gcloud's configured one)
#   --queued             create through a queued resource (waits until it is ACTIVE)
#   --spot               spot capacity
#   --delete-after       delete the TPU when the log stream ends (the run finished, or Ctrl-C)
#   --bucket URL         gs://BUCKET[/PREFIX] (default: $PHI_JAX_BUCKET); a `train` command
#                        without --workdir gets --workdir=URL/runs/NAME
#   --max-restarts N     when the log stream ends because the TPU was preempted (spot, or a
#                        reclaimed queued resource), recreate it, reinstall and rerun the same
#                        command, up to N times: `train` resumes from the bucket's last checkpoint
#   --dry-run            print the exact commands, run nothing
# The workdir must be storage every worker, and a recreated VM, sees: a gs:// bucket (the
# default; the VM's service account needs read/write on it) or a Filestore/NFS mount. All workers
# write their shards of each checkpoint.
set -euo pipefail

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

name=""
zone=""
type=""
version=""
project=""
queued=0
spot=0
delete_after=0
dry_run=0
bucket="${PHI_JAX_BUCKET:-}"
max_restarts=0
action=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --delete-after) delete_after=1; shift ;;
    --bucket) bucket="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    run|create|install|start|logs|stop|delete) action="$1"; shift ;;
    --) shift; break ;;
    *) echo "tpu.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
[[ -n "$action" ]] || { echo "tpu.sh: give an action (run, create, install, start, logs, stop, delete)" >&2; exit 2; }
[[ -n "$name" && -n "$zone" ]] || { echo "tpu.sh: --name and --zone are required" >&2; exit 2; }
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "tpu.sh: --max-restarts must be a number >= 0" >&2; exit 2; }
if [[ -n "$bucket" && "$bucket" != gs://* ]]; then
  echo "tpu.sh: --bucket must be a gs:// URL (gs://BUCKET or gs://BUCKET/PREFIX)" >&2; exit 2
fi
# `train` without --workdir: the bucket's runs/NAME, so a recreated VM finds the checkpoints.
if [[ "${1:-}" == train ]]; then
  has_workdir=0
  for arg in "$@"; do [[ "$arg" == --workdir* ]] && has_workdir=1; done
  if [[ "$has_workdir" == 0 ]]; then
    [[ -n "$bucket" ]] || { echo "tpu.sh: give --bucket gs://BUCKET (or \$PHI_JAX_BUCKET) for the run's workdir, or --workdir=... after --" >&2; exit 2; }
    set -- "$@" "--workdir=${bucket%/}/runs/$name"
  fi
fi
if [[ -z "$version" ]]; then
  if [[ "$type" == v5litepod* ]]; then version="v2-alpha-tpuv5-lite"; else version="v2-alpha-tpuv5"; fi
fi

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
remote_dir=phi_jax  # relative to the worker's home directory, where ssh commands start
log=phi_jax_run.log
pidfile=phi_jax_run.pid
tarball="${TMPDIR:-/tmp}/phi_jax_src.tar.gz"

# Print (dry run) or execute one command given as words.
run_cmd() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: one ssh to the given worker(s)
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command="$2"
}

exists() {
  if [[ "$dry_run" == 1 ]]; then
    echo "# create only if this fails (else the TPU VM is reused):"
    run_cmd gcloud compute tpus tpu-vm describe "$name" "${common[@]}"
    return 1
  fi
  gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1
}

do_create() {
  if exists; then
    echo "tpu.sh: reusing the existing TPU VM $name" >&2
    return
  fi
  [[ -n "$type" ]] || { echo "tpu.sh: creating $name needs --type (e.g. v5litepod-16)" >&2; exit 2; }
  local extra=()
  [[ "$spot" == 1 ]] && extra+=(--spot)
  if [[ "$queued" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources create "$name" "${common[@]}" --node-id="$name" \
      --accelerator-type="$type" --runtime-version="$version" "${extra[@]}"
    if [[ "$dry_run" == 1 ]]; then
      echo "# then poll until ACTIVE:"
      run_cmd gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)'
      return
    fi
    local state=""
    until [[ "$state" == ACTIVE ]]; do
      state=$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
      case "$state" in
        FAILED|SUSPENDED) echo "tpu.sh: queued resource $name is $state" >&2; exit 1 ;;
        ACTIVE) ;;
        *) echo "tpu.sh: queued resource $name is ${state:-unknown}; waiting" >&2; sleep 60 ;;
      esac
    done
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$type" \
      --version="$version" "${extra[@]}"
  fi
}

do_install() {
  # The working tree's tracked files (committed or not), copied to every worker and installed.
  local repo
  repo=$(cd "$(dirname "$0")/.." && pwd)
  if [[ "$dry_run" == 1 ]]; then
    echo "(cd $(printf '%q' "$repo") && git ls-files -z | tar --null -czf $(printf '%q' "$tarball") -T -)"
  else
    (cd "$repo" && git ls-files -z | tar --null -czf "$tarball" -T -)
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:phi_jax_src.tar.gz" "${common[@]}" --worker=all
  on_workers all "mkdir -p $remote_dir && tar -xzf phi_jax_src.tar.gz -C $remote_dir && \
python3 -m pip install -q -U 'jax[tpu]' -e '${remote_dir}[gcs]'"
}

do_start() {
  [[ $# -gt 0 ]] || { echo "tpu.sh: no phi-jax command given after --" >&2; exit 2; }
  local args
  args=$(printf '%q ' "$@")
  # setsid + nohup: the run survives the ssh session; every worker logs to its own file and
  # remembers the pid, so `stop` signals exactly that process.
  on_workers all "cd $remote_dir && PHI_JAX_DISTRIBUTED=1 setsid nohup python3 -m phi_jax.cli \
${args}> ../$log 2>&1 < /dev/null & echo \$! > ../$pidfile"
}

# Worker 0's log until its run ends (Ctrl-C detaches; the run goes on).
do_logs() { on_workers 0 "tail -n +1 -F --pid=\$(cat $pidfile) $log"; }

# SIGTERM: the trainer checkpoints at the next step boundary and exits.
do_stop() { on_workers all "kill -TERM \$(cat $pidfile) 2>/dev/null || true"; }

# Whether the TPU was taken back (spot preemption, or a queued resource reclaimed).
preempted() {
  local state
  if [[ "$dry_run" == 1 ]]; then
    echo "# after the log stream ends, restart only if this says PREEMPTED:"
    run_cmd gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)'
    return 1
  fi
  state=$(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)' 2>/dev/null || echo GONE)
  [[ "$state" == PREEMPTED || "$state" == TERMINATED || "$state" == GONE ]]
}

do_delete() {
  if [[ "$queued" == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

case "$action" in
  create) do_create ;;
  install) do_install ;;
  start) do_start "$@" ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  run)
    [[ $# -gt 0 ]] || { echo "tpu.sh: no phi-jax command given after --" >&2; exit 2; }
    do_create
    do_install
    do_start "$@"
    if [[ "$delete_after" == 1 && "$dry_run" == 0 ]]; then
      trap do_delete EXIT
    fi
    do_logs || true
    restarts=0
    while (( restarts < max_restarts )) && preempted; do
      restarts=$((restarts + 1))
      echo "tpu.sh: $name was preempted; recreating it and resuming (restart $restarts of $max_restarts)" >&2
      do_delete || true
      do_create
      do_install
      do_start "$@"
      do_logs || true
    done
    if [[ "$delete_after" == 1 && "$dry_run" == 1 ]]; then do_delete; fi
    ;;
esac
