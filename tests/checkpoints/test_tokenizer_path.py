"""`loader.tokenizer_path`: an imported model (or a run started from one) brings its tokenizer."""

import json

import pytest

from wakea_jax.checkpoints import loader


def test_hf_dir_run_workdir_and_chain(tmp_path):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text("{}")
  assert loader.tokenizer_path(hf_dir) == ""          # no tokenizer files: the bundled one
  (hf_dir / "tokenizer.json").write_text("{}")
  assert loader.tokenizer_path(hf_dir) == str(hf_dir)

  def run_dir(name, record):
    workdir = tmp_path / name
    (workdir / loader.RUN_EXPORT).mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(record))
    return workdir

  sft = run_dir("sft", {"init_from": str(hf_dir), "tokenizer": ""})
  grpo = run_dir("grpo", {"init_from": str(sft), "tokenizer": ""})
  assert loader.tokenizer_path(grpo) == str(hf_dir)    # run -> run -> HF model
  named = run_dir("named", {"init_from": str(hf_dir), "tokenizer": "/tok"})
  assert loader.tokenizer_path(named) == "/tok"        # the run's own choice wins
  (grpo / "export" / "hf").mkdir()
  (grpo / "export" / "hf" / "tokenizer.json").write_text("{}")
  assert loader.tokenizer_path(grpo) == str(grpo / "export" / "hf")  # what the run exported
  assert loader.tokenizer_path("") == ""
  scratch = run_dir("scratch", {"init_from": "", "tokenizer": ""})
  assert loader.tokenizer_path(scratch) == ""


def test_a_run_without_export_is_named_as_such(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="a run workdir without an exported model"):
    loader.resolve(tmp_path)
