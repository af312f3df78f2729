"""Multi-host start-up: `jax.distributed.initialize()` when the launch environment asks for it.

One code path for every cluster: Cloud TPU pods and SLURM are detected by JAX itself
(`jax.distributed.initialize()` with no arguments); explicit flags or the PHI_JAX_COORDINATOR /
PHI_JAX_NUM_PROCESSES / PHI_JAX_PROCESS_ID variables cover everything else (e.g. `launch/local.sh`).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
_initialized = False


def _cluster_detected() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1) or \
        bool(os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ["TPU_WORKER_HOSTNAMES"])


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialize jax.distributed if flags, PHI_JAX_* variables or the cluster say so."""
    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or os.environ.get("PHI_JAX_COORDINATOR")
    if num_processes is None and os.environ.get("PHI_JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["PHI_JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("PHI_JAX_PROCESS_ID"):
        process_id = int(os.environ["PHI_JAX_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id too "
                             "(--num_processes/--process_id or PHI_JAX_NUM_PROCESSES/PHI_JAX_PROCESS_ID)")
        if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
