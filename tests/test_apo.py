"""The APO binary's run(): a tiny random target checkpoint, the rule-based proposer, the files
it writes, and config errors by field."""

import json

import pytest

from wakea_jax import apo, config_files
from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset


def _config(variant="test", **overrides):
  return config_files.get_config(f"apo:{variant}", **overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("apo") / "ckpt"
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=256,
                                                num_layers=1), seed=1)
  export.save_model_dir(model, path)
  return str(path)


def test_run_writes_the_best_prompt_and_the_table(tmp_path, checkpoint):
  summary = apo.run(_config(**{"target.checkpoint": checkpoint}), tmp_path)
  assert summary == json.loads((tmp_path / "summary.json").read_text())
  rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
  # A random model answers nothing right: the start prompt stays best (ties keep it), and the
  # rule proposer's edits (no <answer> tags seen) were scored in round 1.
  assert rows[0] == {**rows[0], "id": 0, "round": 0, "parent": None, "note": "start",
                     "prompt": "You are a helpful assistant.", "num_examples": 6}
  assert len(rows) == summary["candidates"] == 3
  assert all(r["round"] == 1 and r["parent"] == 0 for r in rows[1:])
  assert (tmp_path / "best_prompt.txt").read_text() == summary["best_prompt"] + "\n"
  assert summary["held_out"]["examples"] == 4 and summary["dev"]["examples"] == 6
  assert summary["rl_override"].startswith("--config.rl.system_prompt=")
  table = (tmp_path / "table.md").read_text()
  assert all(r["prompt"] in table for r in rows) and "Held-out score" in table


def test_config_errors_name_the_field(tmp_path, checkpoint):
  with pytest.raises(ValueError, match=r"config.target.checkpoint is empty"):
    apo.run(_config(), tmp_path)
  with pytest.raises(ValueError, match=r"config.apo: apo.beam_width must be >= 1, got 0"):
    apo.run(_config(**{"apo.beam_width": 0}), tmp_path)
  with pytest.raises(ValueError, match=r"config.proposer.kind: 'gpt' is not a proposer"):
    apo.run(_config(**{"proposer.kind": "gpt", "target.checkpoint": checkpoint}), tmp_path)
  with pytest.raises(ValueError, match=r"config.data.dev is empty"):
    apo.run(_config(**{"data.dev": "", "target.checkpoint": checkpoint}), tmp_path)
  with pytest.raises(ValueError, match=r"config.data.dev: .*no prompt records"):
    (tmp_path / "empty.jsonl").write_text("")
    apo.run(_config(**{"data.dev": str(tmp_path / "empty.jsonl"),
                       "target.checkpoint": checkpoint}), tmp_path)
  with pytest.raises(ValueError, match=r"unknown variant\(s\) \['gpt'\]"):
    _config("gpt")


def test_demo_dialogues_follow_their_instructions():
  from wakea_jax import apo_demo
  records = apo_demo.dialogues(200, 0)
  assert records == apo_demo.dialogues(200, 0)
  kinds = set()
  for record in records:
    system = record["messages"][0]["content"] if len(record["messages"]) == 3 else ""
    answer = record["messages"][-1]["content"]
    tags, work = apo_demo.TAGS in system, apo_demo.WORK in system
    kinds.add((tags, work))
    assert ("<answer>" in answer) == tags
    assert (answer.count("=") >= 1) == work
  assert len(kinds) == 4
