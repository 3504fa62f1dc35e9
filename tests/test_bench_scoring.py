"""tools/bench_scoring.py at toy size: the one-call reference and each call size, with the
check that they give the same completions."""

import os
import pathlib
import re
import subprocess
import sys

from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_scoring.py"


def test_bench_scoring_prints_every_call_size(tmp_path):
  config = get_preset("tiny", vocab_size=1024, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512)
  export.save_model_dir(transformer.create_model(config, seed=0), tmp_path / "model")
  out = subprocess.run(
      [sys.executable, str(BENCH), f"--model={tmp_path / 'model'}", "--batch_prompts=2",
       "--prompts=task:equations?n=5&seed=3&min_level=4"],
      capture_output=True, text=True, timeout=400, check=True, cwd=tmp_path,
      env={**os.environ, "XLA_FLAGS": ""}).stdout   # one device, not the suite's 8
  assert re.search(r"^cpu: .+; 5 prompts, max_new_tokens 192", out, re.MULTILINE), out
  assert re.search(r"^one call \(the reference\) +[\d.]+ s", out, re.MULTILINE), out
  assert re.search(r"^calls of 2 +[\d.]+ s, .*x the reference, same completions 5/5$", out,
                   re.MULTILINE), out
