"""The multimodal demonstration end to end on its `test` variant (a few steps per stage): the
generated shapes task (with described answers) and the tones task, SFT, GRPO, the held-out
evaluations, the table and the curves, for vision (the loop over modalities runs the same code
for audio). The learning figures come from the full run in the README."""

import json

import pytest

from wakea_jax import multimodal_demo
from wakea_jax.config_files import get_config


@pytest.mark.slow
def test_multimodal_demo_pipeline(tmp_path, capsys):
  config = get_config("multimodal_demo:test")
  config.data.described = 0.5
  results = multimodal_demo.run(config, tmp_path)
  assert [(r["modality"], r["seed"]) for r in results["rows"]] == [("vision", 0)]
  for row in results["rows"]:
    assert all(0.0 <= row[k] <= 1.0 for k in ("chance", "majority", "sft", "grpo"))
  assert results["rows"][0]["chance"] == pytest.approx(0.375, abs=0.05)
  assert (tmp_path / "data" / "shapes" / "eval_prompts.jsonl").is_file()
  train = [json.loads(line) for line in (tmp_path / "data" / "shapes" / "train.jsonl").open()]
  assert len(train) == config.data.train.vision          # the labelled set, per modality
  replies = [r["messages"][1]["content"] for r in train]
  assert any(reply.endswith(": " + r["answer"]) for reply, r in zip(replies, train))
  assert (tmp_path / "vision_seed0" / "grpo" / "export" / "hf" /
          "preprocessor_config.json").is_file()
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
  assert "| **vision mean** |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert "| vision | 0 |" in capsys.readouterr().out


def test_unknown_modality_fails_before_training(tmp_path):
  config = get_config("multimodal_demo:test")
  config.modalities = ("vision", "smell")
  with pytest.raises(ValueError, match="unknown modality 'smell'"):
    multimodal_demo.run(config, tmp_path)
  assert not (tmp_path / "data").exists()
