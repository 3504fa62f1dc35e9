"""tools/bench_matvec.py at toy size: the bandwidth references and every engine's dot rate,
with the ratio of the XLA dots to the memcpy bound, and the XLA dots' rates by row count."""

import os
import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_matvec.py"


def test_bench_matvec_prints_rates_and_the_bound():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--batch=2", "--repeats=2", "--no_torch",
       "--sweep=1,3"],
      capture_output=True, text=True, timeout=300, check=True,
      env={**os.environ, "XLA_FLAGS": ""}).stdout   # one device, not the suite's 8
  assert re.search(r"machine: .+, 1 device", out), out
  # tiny: 2 layers x 7 projections + the LM head; 64-wide, vocabulary 256.
  assert "tiny decode matmuls: 15 dots" in out, out
  for name in ("read, 1 thread", "read, 2 threads", "memcpy \\(read \\+ write\\)",
               "XLA:CPU \\(jax.jit\\)", "numpy \\(OpenBLAS\\)"):
    match = re.search(rf"^  {name} +([\d.]+) GB/s", out, re.MULTILINE)
    assert match and float(match.group(1)) > 0, (name, out)
  assert "torch" not in out
  assert re.search(r"the XLA dots alone take [\d.]+ ms \([\d.]+x the bound\)$", out, re.MULTILINE)
  # The sweep: one row per row count, every rate positive.
  sweep = re.findall(r"^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.MULTILINE)
  assert [int(row[0]) for row in sweep] == [1, 3], out
  assert all(float(x) > 0 for row in sweep for x in row[1:]), out


def test_bench_matvec_times_the_dots_under_each_xla_flag_set():
  # Each set in a fresh process; a flag this jaxlib does not know is reported, not fatal.
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--batch=2", "--repeats=2", "--no_torch",
       "--sweep=", "--xla_flag_sets=default;--xla_cpu_use_onednn=true;--xla_cpu_no_such_flag=1"],
      capture_output=True, text=True, timeout=300, check=True,
      env={**os.environ, "XLA_FLAGS": ""}).stdout
  assert "XLA:CPU dots at 2 rows under other XLA flags" in out, out
  rows = re.findall(r"^ +([\d.]+) +([\d.]+) +([\d.]+)  (\S.*)$", out, re.MULTILINE)
  assert [row[3] for row in rows] == ["default", "--xla_cpu_use_onednn=true"], out
  assert all(float(x) > 0 for row in rows for x in row[:3]), out
  assert re.search(r"^ +- +- +-  --xla_cpu_no_such_flag=1: not known to this jaxlib", out,
                   re.MULTILINE), out
