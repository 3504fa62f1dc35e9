"""The multimodal demonstration end to end on its `test` variant (a few steps per stage): the
generated shapes and tones tasks, SFT, GRPO, the held-out evaluations, the table and the
curves, for both modalities. The learning figures come from the full run in the README."""

import json

import pytest

from wakea_jax import multimodal_demo
from wakea_jax.config_files import get_config


@pytest.mark.slow
def test_multimodal_demo_pipeline(tmp_path, capsys):
  config = get_config("multimodal_demo:test")
  results = multimodal_demo.run(config, tmp_path)
  assert [(r["modality"], r["seed"]) for r in results["rows"]] == [("vision", 0), ("audio", 0)]
  for row in results["rows"]:
    assert all(0.0 <= row[k] <= 1.0 for k in ("chance", "majority", "sft", "grpo"))
  assert results["rows"][0]["chance"] == pytest.approx(0.375, abs=0.05)
  for modality, task in (("vision", "shapes"), ("audio", "tones")):
    assert (tmp_path / "data" / task / "eval_prompts.jsonl").is_file()
    assert (tmp_path / f"{modality}_seed0" / "grpo" / "export" / "hf" /
            "preprocessor_config.json").is_file()
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
  assert "| **vision mean** |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert "| audio | 0 |" in capsys.readouterr().out


def test_unknown_modality_fails_before_training(tmp_path):
  config = get_config("multimodal_demo:test")
  config.modalities = ("vision", "smell")
  with pytest.raises(ValueError, match="unknown modality 'smell'"):
    multimodal_demo.run(config, tmp_path)
  assert not (tmp_path / "data").exists()
