"""tools/bench_gpu.sh --smoke: every section of the GPU benchmark (info, cuDNN attention
parity, train-step MFU, decode tokens/s, a GRPO step) runs end to end on CPU at toy size and
prints its figures, so the GPU run, which nobody can retry cheaply, fails only for GPU
reasons."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_gpu_smoke_prints_every_section():
  # One CPU device, as the benchmark runs (conftest's 8 fake devices would shard the toy
  # batches), and this interpreter's environment.
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
  run = subprocess.run(["bash", str(ROOT / "tools" / "bench_gpu.sh"), "--smoke"],
                       capture_output=True, text=True, timeout=480, env=env, cwd=ROOT)
  out = run.stdout
  assert run.returncode == 0, out + run.stderr[-3000:]
  assert re.search(r"layers.Attention reads ModelConfig.attention: (yes|NO)", out)
  assert "nvidia-smi" in out or "memory.total" in out
  assert re.search(r"^jax [\d.]+, jaxlib .*backend cpu", out, re.MULTILINE)
  assert re.search(r"^assumed peak: ", out, re.MULTILINE)
  assert "attention='xla' -> xla on cpu" in out
  assert re.search(r"cuDNN fused attention in the step: NO", out)
  assert re.search(r"^  packed training form, dq: max \|xla - ref\| / max \|ref\| = "
                   r"[\d.e-]+ .* ok$", out, re.MULTILINE), out
  assert re.search(r"^parity: ok$", out, re.MULTILINE)
  assert re.search(r"^train step: [\d.]+ ms, [\d,]+ tokens/s, .*loss [\d.]+ -> [\d.]+ .*finite "
                   r"True", out, re.MULTILINE), out
  assert re.search(r"^decode: prefill [\d.]+ ms, [\d.]+ ms/step, [\d,]+ generated tokens/s", out,
                   re.MULTILINE), out
  assert re.search(r"^auto +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+", out, re.MULTILINE), out
  assert re.search(r"bench_gpu: total \d+ s; 0 section\(s\) failed", out)


def test_bench_gpu_refuses_without_a_gpu_and_bad_arguments():
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable}
  script = str(ROOT / "tools" / "bench_gpu.sh")
  no_gpu = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
  assert no_gpu.returncode == 2 and "jax sees no GPU (default backend 'cpu')" in no_gpu.stderr
  bad = subprocess.run(["bash", script, "--fast"], capture_output=True, text=True, timeout=60,
                       env=env, cwd=ROOT)
  assert bad.returncode == 2 and "usage:" in bad.stderr
