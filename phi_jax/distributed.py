"""Multi-host start-up: `jax.distributed.initialize()` when the launch environment asks for it.

Multi-host JAX is the same program on every host plus one call before any other JAX work; the
launch scripts (`launch/`) only start processes. What decides the call, first match wins:

  1. explicit arguments (`phi-jax train --coordinator_address=host:port --num_processes=N
     --process_id=i`), or PHI_JAX_COORDINATOR / PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID
     (`launch/local.sh`, `launch/slurm.sh`); a missing count or id is taken from SLURM_NTASKS /
     SLURM_PROCID when running under srun;
  2. PHI_JAX_DISTRIBUTED=1: `jax.distributed.initialize()` with no arguments, letting JAX detect
     the cluster (Cloud TPU VMs and pods, SLURM, Open MPI); `launch/tpu.sh` sets it;
     PHI_JAX_DISTRIBUTED=0 turns every detection off;
  3. a SLURM step with more than one task, or a GKE TPU slice with several workers.
Nothing matching means one process, no initialisation.

After initialisation only process 0 logs at INFO: every process computes the same metrics, and
N copies of each line help no one. Warnings and errors still come from every process.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)
_initialized = False


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def _cluster_detected(env: Mapping[str, str]) -> bool:
    slurm = bool(env.get("SLURM_JOB_ID")) and (_int_env(env, "SLURM_NTASKS") or 1) > 1
    gke_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    return slurm or gke_tpu


def initialize_arguments(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None,
                         env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Pure (reads `env`, default os.environ) so the decision is testable without starting anything.
    An empty dict means "initialize with no arguments: JAX detects the cluster".
    """
    env = os.environ if env is None else env
    switch = env.get("PHI_JAX_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "false", "off", "no"):
        return None
    coordinator_address = coordinator_address or env.get("PHI_JAX_COORDINATOR") or None
    if coordinator_address:
        if num_processes is None:
            num_processes = _int_env(env, "PHI_JAX_NUM_PROCESSES", "SLURM_NTASKS")
        if process_id is None:
            process_id = _int_env(env, "PHI_JAX_PROCESS_ID", "SLURM_PROCID")
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator {coordinator_address} given without the number of processes or this "
                "process's id; pass --num_processes and --process_id (or set PHI_JAX_NUM_PROCESSES "
                "and PHI_JAX_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
        return {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    if num_processes is not None or process_id is not None:
        raise ValueError("--num_processes/--process_id need --coordinator_address (host:port of "
                         "process 0) too")
    if switch in ("1", "true", "on", "yes", "auto") or _cluster_detected(env):
        return {}
    return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialize jax.distributed if flags, PHI_JAX_* variables or the cluster say so.

    Must run before anything touches a JAX backend (even `jax.devices()`). Returns True when this
    is (now) a multi-process run.
    """
    global _initialized
    if _initialized:
        return True
    kwargs = initialize_arguments(coordinator_address, num_processes, process_id)
    if kwargs is None:
        return False
    # CPU collectives across processes (tests, local runs) need gloo; GPU/TPU ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    if jax.process_index() != 0:
        logging.getLogger("phi_jax").setLevel(logging.WARNING)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
