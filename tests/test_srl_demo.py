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
from wakea_jax.data.tasks import equations

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config():
  return config_files.get_config(str(ROOT / "configs" / "srl_demo.py") + ":test")


def test_specs_keep_held_out_problems_out_of_training():
  specs = srl_demo.specs(_config())
  assert "split=1" in specs["eval"] and "split=1" in specs["srl_eval"]
  for key in ("base", "expert", "rl_prompts"):
    assert "split=0" in specs[key]
  held_out = {p.text for p in equations.problems(8, 7, split=1, min_level=4)}
  train = {p.text for p in equations.problems(400, 1, split=0, min_level=4)}
  assert held_out and not held_out & train


@pytest.mark.slow
def test_srl_demo_pipeline(tmp_path, capsys):
  config = _config()
  results = srl_demo.run(config, tmp_path)
  stages = [r["stage"] for r in results["rows"]]
  assert stages == ["base", "sft", "rlvr", "srl", "srl_rlvr"]
  for row in results["rows"]:
    assert row["questions"] == config.eval_problems
    for key in ("accuracy", "valid_solutions", "answered"):
      assert 0.0 <= row[key] <= 1.0
  # Each later stage starts from the model the issue names.
  inits = {name: json.loads((tmp_path / name / "config.json").read_text()).get("init_from", "")
           for name in ("sft", "rlvr_seed0", "srl_seed0", "srl_rlvr_seed0")}
  assert inits["sft"].startswith(str(tmp_path / "base"))
  assert inits["rlvr_seed0"].startswith(str(tmp_path / "base"))
  assert inits["srl_seed0"].startswith(str(tmp_path / "base"))
  assert inits["srl_rlvr_seed0"].startswith(str(tmp_path / "srl_seed0"))
  assert (tmp_path / "srl_seed0" / "srl_step_prompts.jsonl").exists()
  table = (tmp_path / "results.md").read_text()
  assert "| SRL -> RLVR | 0 |" in table and "targets:" in table
  assert "| SRL -> RLVR | 0 |" in capsys.readouterr().out
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
