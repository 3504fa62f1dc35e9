"""tools/bench_memory.py at toy size: each configuration runs in its own process and the
table carries peak RSS, the same-run state reference and XLA's estimate."""

import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_memory.py"


def test_bench_memory_prints_the_figures():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--layers=1", "--vocab=512", "--seq=16", "--completions=2",
       "--pairs=1", "--modes=grpo:before,grpo:after", "--remat=none"],
      capture_output=True, text=True, timeout=120, check=True).stdout
  assert re.search(r"machine: .+, \d+ cores", out)
  assert "whole logits [2, 16, 512]" in out
  for mode in ("before", "after"):
    row = re.search(rf"^grpo +{mode} +none +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) .* yes$", out,
                    re.MULTILINE)
    assert row, out
    peak_rss, state_rss, xla, _ = map(float, row.groups())
    assert peak_rss >= state_rss > 0 and xla > 0
  assert "grpo remat=none: chunked scoring saves" in out
  assert "total wall time" in out
