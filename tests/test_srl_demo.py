"""The SRL demonstration's pipeline end to end, shrunk (configs/srl_demo.py:test).

This checks the plumbing: every stage trains from the right model on the right data, every
row is scored on the same held-out problems, the table and the curves. (Skipping finished
stages is the trainers' resume, tested with them; re-scoring five models here would double
this test's time.) The learning figures come from the full run documented in the README.
"""

import json
import pathlib

import pytest

from wakea_jax import config_files, srl_demo
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data.tasks import equations

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config():
  return config_files.get_config(str(ROOT / "configs" / "srl_demo.py") + ":test")


def test_specs_keep_held_out_problems_out_of_training():
  specs = srl_demo.specs(_config())
  assert "split=1" in specs["eval"] and "split=1" in specs["srl_eval"]
  for key in ("base", "base_hard", "expert", "rl_prompts"):
    assert "split=0" in specs[key]
  held_out = {p.text for p in equations.problems(8, 7, split=1, min_level=4)}
  train = {p.text for p in equations.problems(400, 1, split=0, min_level=4)}
  assert held_out and not held_out & train


def test_base_mixes_in_hard_problems_at_its_share():
  config = _config()
  specs = srl_demo.specs(config)
  config.base_hard_percent = 10
  (easy, w_easy), (hard, w_hard) = srl_demo.base_sources(config)
  assert (easy, hard) == (specs["base"], specs["base_hard"])
  assert (w_easy, w_hard) == pytest.approx((0.9, 0.1))
  assert "split=0" in hard and "min_level=4" in hard
  # Its own seed: neither the expert set's nor the RL prompts'.
  seed = dict(kv.split("=") for kv in hard.split("?")[1].split("&"))["seed"]
  for key in ("expert", "rl_prompts"):
    assert f"seed={seed}&" not in specs[key]
  config.base_hard_percent = 0
  assert srl_demo.base_sources(config) == ((specs["base"], 1.0),)
  config.base_hard_percent = 100
  with pytest.raises(ValueError, match="base_hard_percent"):
    srl_demo.base_sources(config)


def test_the_base_embeds_exactly_the_tokenizer_s_ids(tmp_path):
  """No embedding rows or logits that no token takes: the base's vocab_size is its
  tokenizer's, for the bundled tokenizer and for a task tokenizer of another size; an
  explicit vocab_size stays as given."""
  config = _config()
  assert config.base.model.vocab_size == 0
  bundled = srl_demo.base_stage(config, "")
  assert bundled.model.vocab_size == tokenizer_lib.default_tokenizer().vocab_size == 1024
  with config.unlocked():
    config.tokenizer_vocab = 320
  path = srl_demo.task_tokenizer(config, tmp_path)
  assert srl_demo.base_stage(config, path).model.vocab_size == 320
  config.base.model.vocab_size = 2048
  assert srl_demo.base_stage(config, path).model.vocab_size == 2048
  assert config_files.get_config(str(ROOT / "configs" / "srl_demo.py")).base.model.vocab_size == 0


@pytest.mark.slow
def test_srl_demo_pipeline(tmp_path, capsys):
  config = _config()
  with config.unlocked():
    config.seeds = (0, 1)     # the seeds' chains in two worker processes (config.workers)
  assert config.workers == 2
  results = srl_demo.run(config, tmp_path)
  stages = [(r["stage"], r["seed"]) for r in results["rows"]]
  assert stages == [("base", 0), ("sft", 0), ("rlvr", 0), ("srl", 0), ("srl_rlvr", 0),
                    ("rlvr", 1), ("srl", 1), ("srl_rlvr", 1)]
  for seed in (0, 1):   # each chain ran in its worker, which logged its stages
    assert f"srl_rlvr seed {seed}:" in (tmp_path / "logs" / f"seed{seed}.log").read_text()
    assert results["timing_s"][f"srl_rlvr_seed{seed}"] > 0
  for row in results["rows"]:
    assert row["questions"] == config.eval_problems
    for key in ("accuracy", "valid_solutions", "answered"):
      assert 0.0 <= row[key] <= 1.0
  # Each later stage starts from the model the issue names.
  inits = {name: json.loads((tmp_path / name / "config.json").read_text()).get("init_from", "")
           for name in ("sft", "rlvr_seed0", "srl_seed0", "srl_rlvr_seed0", "srl_rlvr_seed1")}
  assert inits["sft"].startswith(str(tmp_path / "base"))
  assert inits["rlvr_seed0"].startswith(str(tmp_path / "base"))
  assert inits["srl_seed0"].startswith(str(tmp_path / "base"))
  assert inits["srl_rlvr_seed0"].startswith(str(tmp_path / "srl_seed0"))
  assert inits["srl_rlvr_seed1"].startswith(str(tmp_path / "srl_seed1"))
  assert (tmp_path / "srl_seed0" / "srl_step_prompts.jsonl").exists()
  table = (tmp_path / "results.md").read_text()
  assert "| SRL -> RLVR | 0 |" in table and "| SRL -> RLVR | 1 |" in table
  assert "targets:" in table
  assert "| SRL -> RLVR | 0 |" in capsys.readouterr().out
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
