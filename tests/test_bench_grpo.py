"""tools/bench_grpo.py at toy size: both old-log-prob modes run the real learner step and the
table carries every phase, the generated tokens and the auto-vs-trainer ratio."""

import os
import pathlib
import re
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_grpo.py"


def test_bench_grpo_prints_the_figures():
  # One CPU device, as the benchmark runs: conftest's 8 fake devices would split the 4 rows
  # of this toy step over an 8-way data mesh.
  env = {**os.environ, "XLA_FLAGS": ""}
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--model=vocab_size=1024,num_layers=1",
       "--prompts=2", "--group=2", "--prompt_tokens=24", "--new=4", "--steps=1"],
      capture_output=True, text=True, timeout=120, check=True, env=env).stdout
  assert re.search(r"machine: .+, \d+ cores", out)
  assert "model tiny:" in out and "prompts <= 24 tokens" in out
  for mode in ("trainer", "auto"):
    row = re.search(rf"^{mode} +" + r" +".join([r"([\d.]+)"] * 7) + r"  \(reward std", out,
                    re.MULTILINE)
    assert row, out
    rollout, _, score, update, step, tokens, _ = map(float, row.groups())
    # Printed to 0.01 s, so the phases may add up to a rounding more than the step.
    assert step > 0 and min(rollout, score, update) >= 0 and step + 0.02 >= rollout + update
    assert 0 < tokens <= 2 * 2 * 4
  assert re.search(r"auto vs trainer \(the reference\): step [\d.]+x faster", out), out
  assert "total wall time" in out
