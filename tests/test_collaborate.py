"""The collaborate binary's run(): config to summary, config errors by field, and the two
model-backed teachers on one tiny random checkpoint: the local backend (our sampler) and the
project's own OpenAI-compatible server (`python -m wakea_jax.serve`'s app) as an endpoint."""

import json

import pytest

from tests.serving.live import serving
from wakea_jax import collaborate, config_files, serve
from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset


def _config(variant="test", **overrides):
  return config_files.get_config(f"collaborate:{variant}", **overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("collab") / "ckpt"
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512), seed=1)
  export.save_model_dir(model, path)
  return str(path)


def test_run_programmatic_writes_summary_and_resumes(tmp_path):
  summary = collaborate.run(_config(), tmp_path)
  assert summary == json.loads((tmp_path / "summary.json").read_text())
  assert summary["problems"] == 12 and summary["teacher"]["backend"] == "programmatic"
  assert summary["attempts"] == summary["accepted"] + summary["rejected"]
  lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
  assert len(lines) == summary["accepted_total"] == summary["accepted"]
  again = collaborate.run(_config(), tmp_path)
  assert again["skipped_already_accepted"] == summary["accepted"]
  arithmetic = collaborate.run(_config("test+arithmetic"), tmp_path / "arithmetic")
  assert arithmetic["task"] == "arithmetic" and arithmetic["accepted"] > 0


def test_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"config.collaboration: max_attempts must be >= 1"):
    collaborate.run(_config(**{"collaboration.max_attempts": 0}), tmp_path)
  with pytest.raises(ValueError, match=r"config.collaboration: unknown field 'attempts'"):
    config = _config()
    config.collaboration.unlock()
    config.collaboration.attempts = 2
    collaborate.run(config, tmp_path)
  with pytest.raises(ValueError, match=r"config.judge: judge: model is empty"):
    collaborate.run(_config("test+judge", **{"judge.model": ""}), tmp_path)
  with pytest.raises(ValueError, match=r"unknown variant\(s\) \['gpt'\]"):
    _config("gpt")


def test_local_teacher_through_the_pipeline(tmp_path, checkpoint):
  config = _config("test+local", **{"teacher.checkpoint": checkpoint,
                                    "collaboration.num_problems": 3,
                                    "collaboration.max_attempts": 1,
                                    "collaboration.context_k": 0,
                                    "collaboration.max_tokens": 8})
  summary = collaborate.run(config, tmp_path)
  rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
  # A random model's text is rejected: that is a count, not a failure.
  assert summary["attempts"] == 3 == summary["rejected"] == len(rejected)
  assert summary["teacher"] == {"backend": "local", "model": checkpoint}
  assert any(r["text"] for r in rejected)


def test_own_server_as_the_teacher_endpoint(tmp_path, checkpoint):
  app, host = serve.build_app(checkpoint, model_name="tiny", slots=4, context=512,
                              chunk_steps=8)
  try:
    with serving(app) as url:
      config = _config("test+openai", **{"teacher.url": f"{url}/v1", "teacher.model": "tiny",
                                         "teacher.retries": 0,
                                         "collaboration.num_problems": 2,
                                         "collaboration.max_attempts": 1,
                                         "collaboration.context_k": 0,
                                         "collaboration.max_tokens": 8})
      summary = collaborate.run(config, tmp_path)
  finally:
    host.model.engine.close()
  rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
  # The server answered (random text, so rejected by the verifier, not a teacher error).
  assert summary["attempts"] == 2 and "teacher_error" not in summary["rejected_by_reason"]
  assert all(r["text"] for r in rejected)
