"""tools/bench_serve.py at toy size: 50 concurrent openai clients against the serve binary,
0 errors, latency percentiles and the sample-binary reference printed."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_serve.py"


@pytest.mark.slow
def test_bench_serve_fifty_clients_no_errors():
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset=tiny", "--clients=50", "--requests=150",
       "--max_tokens=8", "--slots=8"],
      capture_output=True, text=True, timeout=500,
      env={**os.environ, "XLA_FLAGS": ""})   # one device, as users run it
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  text = out.stdout
  assert "server: 150 requests from 50 clients, 0 errors" in text, text
  assert re.search(r"latency p50 [\d.]+ s, p95 [\d.]+ s", text), text
  assert re.search(r"reference: sample binary path.+= [\d.]+x", text), text
