"""Runs a command as a real multi-process JAX job on this machine (loopback only).

Every process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by `wakea_jax.parallel.distributed.initialize`), and its own
`devices_per_process` fake CPU devices. Used by the two-process tests.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                extra: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one process of a local cluster."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                              "JAX_PROCESS_ID", "TPU_WORKER"))}
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
      JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  if num_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Result:
  """What one process did: its exit code and its output (stdout and stderr together)."""

  returncode: int
  output: str


def start(argv: Sequence[str], *, num_processes: int, devices_per_process: int,
          log_dir: pathlib.Path, env: dict[str, str] | None = None,
          per_process_env: Sequence[dict[str, str]] | None = None
          ) -> list[subprocess.Popen]:
  """Starts the processes (output to log_dir/process_<i>.log); returns them."""
  port = free_port()
  log_dir.mkdir(parents=True, exist_ok=True)
  procs = []
  for i in range(num_processes):
    extra = dict(env or {})
    if per_process_env:
      extra.update(per_process_env[i])
    log = open(log_dir / f"process_{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env=process_env(i, num_processes, devices_per_process, port, extra)))
    log.close()
  return procs


def wait(procs: Sequence[subprocess.Popen], log_dir: pathlib.Path, timeout: float
         ) -> list[Result]:
  """Waits for every process (killing all of them past `timeout` seconds)."""
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      for q in procs:
        q.wait()
      break
  return [Result(p.returncode, (log_dir / f"process_{i}.log").read_text())
          for i, p in enumerate(procs)]


def run(argv: Sequence[str], *, num_processes: int, devices_per_process: int,
        log_dir: pathlib.Path, timeout: float = 600, env: dict[str, str] | None = None
        ) -> list[Result]:
  """Runs `python argv...` as `num_processes` processes and waits for all of them."""
  procs = start(argv, num_processes=num_processes, devices_per_process=devices_per_process,
                log_dir=log_dir, env=env)
  return wait(procs, log_dir, timeout)


def check(results: Sequence[Result]) -> None:
  """Raises with every process's output tail when one of them failed."""
  if any(r.returncode != 0 for r in results):
    tails = "\n".join(f"--- process {i} (exit {r.returncode}) ---\n{r.output[-4000:]}"
                      for i, r in enumerate(results))
    raise AssertionError(f"a process failed:\n{tails}")
