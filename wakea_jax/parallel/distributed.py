"""Multi-host initialisation.

On Cloud TPU pods and SLURM/Kubernetes GPU clusters every host runs the same binary;
`jax.distributed.initialize` must be called before any other JAX call so that
`jax.devices()` lists the devices of all hosts.

Where the coordinator comes from, first match wins:
  1. arguments (a binary's flags);
  2. the environment: JAX_COORDINATOR_ADDRESS (host:port) with JAX_NUM_PROCESSES and
     JAX_PROCESS_ID (what `launch/` and the tests set; a Kubernetes Indexed Job gives the
     process id as JOB_COMPLETION_INDEX);
  3. JAX's own cluster detection: Cloud TPU VMs (TPU_WORKER_HOSTNAMES, or the metadata server
     when WAKEA_DISTRIBUTED=1, which `launch/tpu_pod.sh` sets), a SLURM step of more than one
     task (`srun`), MegaScale.
Nothing of it set: a single-process run, and `initialize` does nothing.

With all three of 2. known, JAX's own detection is switched off: under SLURM it would
otherwise restrict each process to the GPU numbered SLURM_LOCALID (JAX's one-process-per-GPU
convention), hiding all but one GPU of a host that runs one task (`launch/slurm_task.sh`).

On CPU the cross-process collectives go through gloo
(`jax_cpu_collectives_implementation`), which is what lets two local processes run a real
multi-host job on a laptop or in CI.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(*names: str) -> int | None:
  for name in names:
    value = os.environ.get(name)
    if value not in (None, ""):
      try:
        return int(value)
      except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None
  return None


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection should find a multi-process job here."""
  if os.environ.get("WAKEA_DISTRIBUTED") == "1" or any(os.environ.get(n) for n in _AUTO_ENV):
    return True
  # SLURM: only inside a step of several tasks; a one-task job or an `salloc` shell is a
  # single-process run (and JAX would fail there, or limit it to one GPU).
  return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_NODELIST")
              and (_env_int("SLURM_NTASKS") or 1) > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False) -> bool:
  """Initialises `jax.distributed` when running multi-host; returns whether it did.

  Single-host runs (the default, tests, laptops) skip initialisation unless `force` is set
  or a coordinator is given, so calling this from every binary is always safe.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID", "JOB_COMPLETION_INDEX")
  explicit = coordinator_address is not None or num_processes is not None
  detected = _cluster_detected()
  if not (force or explicit or detected):
    return False
  if num_processes is not None and num_processes <= 1 and not force:
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError(f"coordinator {coordinator_address} given without the number of "
                     "processes and this process's id (set JAX_NUM_PROCESSES and "
                     "JAX_PROCESS_ID, or pass them)")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
  # CPU collectives across processes (no-op for GPU/TPU backends); before any backend starts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  known = None not in (coordinator_address, num_processes, process_id)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             cluster_detection_method="deactivate" if known else None)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
