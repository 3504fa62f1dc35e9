"""What every benchmark in tools/ prints beside its figures: the machine they were measured on.

Imported by the bench_*.py scripts (run as `python tools/bench_x.py`, so this directory is on
sys.path).
"""

from __future__ import annotations

import os
import subprocess
import sys


def _without_persistent_compile_cache() -> None:
  """Compiles in a benchmark are real compiles. A persistent compilation cache named by the
  environment (the test suite sets one for its processes and their children) would turn the
  compile seconds the benchmarks print into cache reads."""
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
  if "jax" in sys.modules:   # imported first: switch the cache off before anything compiles
    sys.modules["jax"].config.update("jax_enable_compilation_cache", False)


_without_persistent_compile_cache()


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
