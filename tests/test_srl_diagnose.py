"""tools/srl_diagnose.py: its tallies on hand-written rewards, and a run at toy size."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import srl_diagnose  # noqa: E402


def test_diagnose_counts_hand_written_groups():
  greedy = [1.0,            # right greedily
            0.94,           # wrong, and one sample is right: reachable
            0.9,            # wrong, no sample right: a confident error
            -1.0]           # unparsed greedily, no sample right
  sampled = [[1.0, 1.0, 1.0],
             [0.94, 1.0, 0.94],
             [0.9, 0.9, 0.9],
             [-1.0, 0.5, 0.5]]
  counts = srl_diagnose.diagnose(greedy, sampled, [1, 1, 2, 2], min_std=0.01)
  total = counts["all"].summary()
  assert total["prompts"] == 4
  assert total["greedy_exact"] == pytest.approx(1 / 4)
  assert total["greedy_unparsed"] == pytest.approx(1 / 4)
  assert total["greedy_similarity"] == pytest.approx((1.0 + 0.94 + 0.9 + 0.0) / 4)
  assert total["wrong"] == 3
  assert total["reachable"] == pytest.approx(1 / 3)
  # std of (0.94, 1, 0.94) is 0.028 and of (-1, .5, .5) 0.71; the other two groups are flat.
  assert total["spread"] == pytest.approx(2 / 4)
  first, second = counts[1].summary(), counts[2].summary()
  assert (first["prompts"], first["greedy_exact"], first["reachable"]) == (2, 0.5, 1.0)
  assert (second["prompts"], second["wrong"], second["reachable"]) == (2, 2, 0.0)
  # A threshold above the smaller spread keeps one group.
  assert srl_diagnose.diagnose(greedy, sampled, [1, 1, 2, 2],
                               min_std=0.05)["all"].summary()["spread"] == pytest.approx(1 / 4)


def test_srl_diagnose_runs_on_a_tiny_model(tmp_path):
  config = get_preset("tiny", vocab_size=1024, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=512)
  export.save_model_dir(transformer.create_model(config, seed=0), tmp_path / "model")
  out = subprocess.run(
      [sys.executable, str(TOOLS / "srl_diagnose.py"), f"--model={tmp_path / 'model'}",
       "--trajectories=task:equations?n=3&seed=0&min_level=2&max_level=2", "--samples=2",
       "--max_new_tokens=8", "--batch_prompts=4"],
      capture_output=True, text=True, timeout=400, check=True, cwd=tmp_path,
      env={**os.environ, "XLA_FLAGS": ""}).stdout   # one device, not the suite's 8
  # 3 trajectories of 2 steps: 2 step prompts and the answer's each.
  assert re.search(r"^cpu: .+; 9 step prompts of 3 trajectories; greedy and 2 samples at "
                   r"temperature 1; [\d.]+ s$", out, re.MULTILINE), out
  assert re.search(r"^all +9 +[\d.]+% +[\d.]+ +[\d.]+% +\d+ +[\d.]+% +[\d.]+%$", out,
                   re.MULTILINE), out
  for step in (1, 2, 3):
    assert re.search(rf"^{step} +3 ", out, re.MULTILINE), out
