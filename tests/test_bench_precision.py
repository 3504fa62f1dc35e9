"""tools/bench_precision.py at toy size: one row per rollout precision, with decode time and
the gap against float32 scoring (float32's own gap at numerics level)."""

import os
import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_precision.py"


def test_bench_precision_prints_every_precision():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--batch=2", "--new_tokens=8", "--prompt=4",
       "--repeats=1"],
      capture_output=True, text=True, timeout=400, check=True,
      env={**os.environ, "XLA_FLAGS": ""}).stdout   # one device, not the suite's 8
  assert re.search(r"machine: .+, 1 device", out), out
  number = r"[\d.e+-]+"
  rows = {}
  for name in ("float32", "bfloat16", "int8"):
    match = re.search(rf"^{name} +({number}) +({number})x +{number} +{number} +({number}) "
                      rf"+({number}) +(-?{number})$", out, re.MULTILINE)
    assert match, out
    rows[name] = [float(x) for x in match.groups()]
  assert rows["float32"][1] == 1.0 and rows["float32"][3] < 1e-4     # numerics only
  assert 0 < rows["bfloat16"][2] <= rows["bfloat16"][3] < 0.1
  assert 0 < rows["int8"][2] <= rows["int8"][3] < 0.1
