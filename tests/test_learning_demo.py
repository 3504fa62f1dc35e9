"""The learning demonstration's pipeline end to end, shrunk to a few steps per stage.

This checks the plumbing (stages, pair generation, evaluation, the table, skipping finished
stages on a re-run); the learning figures themselves come from the full run documented in
the README (minutes, not a test).
"""

import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from wakea_jax import learning_demo

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHRINK = [
    "--config.sft.train.steps=20", "--config.sft.train.eval_every=20",
    "--config.sft.train.checkpoint_every=20", "--config.sft.data.batch_size=8",
    "--config.sft.data.eval_batches=1", "--config.sft.data.eval_batch_size=8",
    "--config.grpo.train.steps=2", "--config.grpo.rl.prompts_per_step=2",
    "--config.grpo.rollout.group_size=4", "--config.grpo.rollout.max_new_tokens=16",
    "--config.grpo.data.eval_sources=task:arithmetic?n=4&seed=777&max_operand=99&tools=0",
    "--config.grpo.eval.num_samples=2", "--config.grpo.eval.pass_k=(1,2)",
    "--config.grpo.export.enabled=True",
    "--config.ppo.train.steps=2", "--config.ppo.rl.prompts_per_step=4",
    "--config.ppo.rollout.max_new_tokens=16",
    "--config.ppo.data.eval_sources=task:arithmetic?n=4&seed=777&max_operand=99&tools=0",
    "--config.ppo.eval.num_samples=2", "--config.ppo.eval.pass_k=(1,2)",
    "--config.pairs.train_prompts=task:arithmetic?n=8&seed=200&max_operand=99&tools=0",
    "--config.dpo.train.steps=2", "--config.dpo.data.batch_size=4",
    "--config.dpo.data.eval_batch_size=4", "--config.dpo.optimizer.warmup_steps=0",
    "--config.grpo_seeds=(0,)",
]


def _config():
  argv = ["prog", f"--config={ROOT / 'configs' / 'learning_demo.py'}"] + SHRINK
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.slow
def test_learning_demo_pipeline(tmp_path, capsys):
  config = _config()
  results = learning_demo.run(config, tmp_path)
  stages = [r["stage"] for r in results["rows"]]
  assert stages[:3] == ["SFT", "GRPO", "PPO"]
  for row in results["rows"]:
    assert 0.0 <= row["greedy_accuracy"] <= 1.0 and "pass@2" in row
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == results["rows"]
  table = (tmp_path / "results.md").read_text()
  assert "| SFT |" in table and "GRPO greedy accuracy gain" in table
  assert "| SFT |" in capsys.readouterr().out
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
  if "DPO" in stages:   # only when the tiny SFT model produced both right and wrong answers
    assert 0.0 <= results["dpo"]["preference_accuracy_after"] <= 1.0
