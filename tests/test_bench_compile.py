"""tools/bench_compile.py at toy size: both layer layouts run in their own process and the
table carries trace, compile, step, XLA memory, sampling and RSS figures."""

import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_compile.py"


def test_bench_compile_prints_the_figures():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--layers=2", "--embed=32", "--mlp=64", "--heads=2",
       "--kv_heads=1", "--head_dim=16", "--vocab=128", "--seq=16", "--batch=2",
       "--new_tokens=2", "--steps=1", "--remat=full"],
      capture_output=True, text=True, timeout=400, check=True).stdout
  assert re.search(r"machine: .+, \d+ cores", out)
  assert "model: 2 layers, embed 32" in out
  for layout in ("loop", "scan"):
    row = re.search(rf"^full +{layout} +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +(-?[\d.]+) "
                    rf"+([\d.]+)$", out, re.MULTILINE)
    assert row, out
    trace, compile_s, step, xla, _, rss = map(float, row.groups())
    assert trace > 0 and compile_s > 0 and step > 0 and xla > 0 and rss > 0
  assert re.search(r"remat=full: trace \+ compile of the train step [\d.]+ s \(loop\) vs "
                   r"[\d.]+ s \(scan\)", out), out
  assert "total wall time" in out
