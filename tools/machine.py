"""What every benchmark in tools/ prints beside its figures: the machine they were measured on.

Imported by the bench_*.py scripts (run as `python tools/bench_x.py`, so this directory is on
sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _benchmark_environment() -> None:
  """Compiles in a benchmark are real compiles, and its programs are optimised as a user's
  are. The test suite (tests/conftest.py) sets a persistent compilation cache, which would
  turn the compile seconds the benchmarks print into cache reads, and XLA:CPU's LLVM
  optimisation level 0, which makes compiles faster and programs slower; both reach the
  benchmarks the tests start, through the environment, and are dropped here. XLA reads
  XLA_FLAGS when its backend starts, so this module is imported before anything runs."""
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  flags = os.environ.get("XLA_FLAGS", "").split()
  kept = [f for f in flags if not f.startswith("--xla_backend_optimization_level")]
  if kept != flags:
    os.environ["XLA_FLAGS"] = " ".join(kept)
  if "jax" in sys.modules:   # imported first: switch the cache off before anything compiles
    sys.modules["jax"].config.update("jax_enable_compilation_cache", False)


_benchmark_environment()


def cpu_model() -> str:
  """lscpu's model name (the figures depend on the machine)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    return "unknown (no lscpu)"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def memcpy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes moved per second (read + write) by a large numpy copy."""
  import numpy as np
  src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
  dst = np.empty_like(src)
  np.copyto(dst, src)
  start = time.perf_counter()
  for _ in range(repeats):
    np.copyto(dst, src)
  return 2 * src.nbytes * repeats / (time.perf_counter() - start)
