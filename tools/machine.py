"""What every benchmark in tools/ prints beside its figures: the machine they were measured on.

Imported by the bench_*.py scripts (run as `python tools/bench_x.py`, so this directory is on
sys.path).
"""

from __future__ import annotations

import subprocess


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
