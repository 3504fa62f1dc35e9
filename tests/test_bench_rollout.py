"""tools/bench_rollout.py at toy size: both batching modes run the same workload and the
ratio is printed beside the static reference."""

import os
import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_rollout.py"


def test_bench_rollout_prints_both_modes():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--requests=8", "--slots=2", "--prompt=4",
       "--short=2,4", "--long=8,12"],
      capture_output=True, text=True, timeout=400, check=True,
      env={**os.environ, "XLA_FLAGS": ""}).stdout   # one device, not the suite's 8
  assert re.search(r"machine: .+, 1 device", out), out
  for mode in ("static", "continuous"):
    assert re.search(rf"^{mode} *: +[\d.]+ s, +\d+ generated tokens/s", out, re.MULTILINE), out
  assert re.search(r"continuous / static tokens/s: [\d.]+x", out), out
