"""Preference run(): learning on generated pairs, exact resume, reference-free losses."""

import importlib.util
import pathlib

import numpy as np
import pytest
from flax import nnx

from wakea_jax import config_lib
from wakea_jax.checkpoints import export
from wakea_jax.data import preferences as pref
from wakea_jax.data import sources
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import transformer
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import preference
from wakea_jax.train.__main__ import runner_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _dpo_config(variant="test"):
  spec = importlib.util.spec_from_file_location("dpo_config", ROOT / "configs/dpo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  """Arithmetic questions: chosen = the right answer, rejected = a wrong one."""
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  sources.write_jsonl(pref.arithmetic_pairs(32, seed=5), path)
  return path


def _train_batches(path, config):
  dataset = pref.load_dataset(str(path), tokenizer_lib.default_tokenizer(),
                              seq_len=config.data.seq_len)
  return dataset.batches(8)


def _config(pairs_file, steps=30):
  config = _dpo_config()
  config.data.sources = (str(pairs_file),)
  config.data.eval_sources = (str(pairs_file),)
  config.train.steps = steps
  config.optimizer.decay_steps = 30  # the same schedule whatever train.steps is
  config.export.enabled = True
  config.export.hf = False
  return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, pairs_file):
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, preference.run(_config(pairs_file), workdir)


def test_dpo_run_learns_preferences_and_resume_is_a_no_op(straight_run, pairs_file):
  workdir, last = straight_run
  config = _config(pairs_file)
  batches = _train_batches(pairs_file, config)
  initial = transformer.create_model(config_lib.model_config_from(config.model),
                                     seed=config.seed)
  trained = export.load_model_dir(workdir / "export" / "model")
  before = preference.preference_accuracy(*nnx.split(initial), batches)
  after = preference.preference_accuracy(*nnx.split(trained), batches)
  # DPO moves log-ratios against the reference; the raw preference follows less tightly.
  assert after >= 0.75 and after > before + 0.2, (before, after)

  records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == config.train.steps
  assert losses[0] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 1
  assert np.mean(losses[-5:]) < losses[0] - 0.05
  assert last["eval_accuracy"] >= 0.9 and last["eval_loss"] < np.log(2) - 0.05

  checkpoints = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert preference.run(config, workdir) == {}
  assert len(metrics_lib.read_jsonl(workdir / "metrics.jsonl")) == len(records)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints


def test_interrupted_run_resumes_exactly(tmp_path, straight_run, pairs_file):
  straight_dir, straight = straight_run
  preference.run(_config(pairs_file, steps=10), tmp_path)
  resumed = preference.run(_config(pairs_file), tmp_path)
  a = metrics_lib.read_jsonl(straight_dir / "metrics.jsonl")
  b = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in b] == list(range(1, 31))
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5, atol=1e-7)
  for key in ("eval_loss", "eval_accuracy"):
    assert resumed[key] == pytest.approx(straight[key], rel=1e-5)


@pytest.mark.parametrize("loss", ["orpo"])
def test_reference_free_losses_run_without_reference(tmp_path, pairs_file, loss, monkeypatch):
  config = _dpo_config()
  config.data.sources = (str(pairs_file),)
  config.data.eval_sources = ()
  config.preference.loss = loss
  config.preference.beta = 2.0 if loss == "simpo" else 0.1
  config.train.steps = 2
  monkeypatch.setattr(pref, "attach_reference", lambda *a, **k: pytest.fail("reference used"))
  last = preference.run(config, tmp_path / loss)
  assert np.isfinite(last["loss"]) and 0.0 <= last["accuracy"] <= 1.0


def test_default_config_needs_data_and_train_binary_dispatches(tmp_path):
  config = _dpo_config("default")
  assert config.objective == "dpo" and runner_for("dpo") is preference.run
  with pytest.raises(ValueError, match="config.data.sources is empty"):
    preference.run(config, tmp_path)
