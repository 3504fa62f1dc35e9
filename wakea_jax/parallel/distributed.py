"""Multi-host initialisation.

On Cloud TPU pods and SLURM/Kubernetes GPU clusters every host runs the same binary;
`jax.distributed.initialize` must be called before any other JAX call so that
`jax.devices()` lists the devices of all hosts. JAX auto-detects the coordinator on TPU VMs,
SLURM and (with the right env) Kubernetes; elsewhere pass it explicitly.
"""

from __future__ import annotations

import os

import jax
from absl import logging

_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "JAX_COORDINATOR_ADDRESS",
             "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False) -> bool:
  """Initialises `jax.distributed` when running multi-host; returns whether it did.

  Single-host runs (the default, tests, laptops) skip initialisation unless `force` is set
  or a coordinator is given, so calling this from every binary is always safe.
  """
  explicit = coordinator_address is not None or num_processes is not None
  detected = any(os.environ.get(name) for name in _AUTO_ENV)
  if not (force or explicit or detected):
    return False
  if num_processes is not None and num_processes <= 1 and not force:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count())
  return True
