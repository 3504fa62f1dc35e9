"""Preference run(): learning on generated pairs, exact resume, reference-free losses."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax import config_lib, trainers
from wakea_jax.checkpoints import export
from wakea_jax.config_files import get_config
from wakea_jax.data import preferences as pref
from wakea_jax.data import sources
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import scoring, transformer
from wakea_jax.models.config import get_preset
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import preference


def _dpo_config(variant="test"):
  return get_config(f"dpo:{variant}")


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
  return workdir, trainers.run(_config(pairs_file), workdir)


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
  assert trainers.run(config, workdir) == {}
  assert len(metrics_lib.read_jsonl(workdir / "metrics.jsonl")) == len(records)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == checkpoints


def test_interrupted_run_resumes_exactly(tmp_path, straight_run, pairs_file):
  straight_dir, straight = straight_run
  trainers.run(_config(pairs_file, steps=10), tmp_path)
  resumed = trainers.run(_config(pairs_file), tmp_path)
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
  monkeypatch.setattr(preference, "attach_reference",
                      lambda *a, **k: pytest.fail("reference used"))
  last = trainers.run(config, tmp_path / loss)
  assert np.isfinite(last["loss"]) and 0.0 <= last["accuracy"] <= 1.0


def test_default_config_needs_data_and_train_binary_dispatches(tmp_path):
  config = _dpo_config("default")
  assert config.objective == "dpo" and trainers.trainer_for("dpo") is trainers.train_preference
  with pytest.raises(ValueError, match="config.data.sources is empty"):
    trainers.run(config, tmp_path)


def test_reference_logps_are_stored_per_pair_index():
  tok = tokenizer_lib.default_tokenizer()
  config = get_preset("tiny", vocab_size=1024, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32)
  model = transformer.create_model(config, seed=0)
  graphdef, state = nnx.split(model)
  dataset = pref.load_dataset("task:arithmetic?n=6&seed=0", tok, seq_len=32)
  ref = preference.compute_reference_logps(graphdef, state, dataset.batches(4))
  assert sorted(ref) == list(range(6))  # the padded last batch adds nothing
  for i in (0, 5):
    batch = dataset.batch([i])
    logp, _ = scoring.sequence_logps(model, jnp.asarray(batch["input_ids"]),
                                     jnp.asarray(batch["targets"]),
                                     jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(ref[i], np.asarray(logp), rtol=1e-5)
  preference.attach_reference(dataset, graphdef, state, batch_size=4)
  batch = next(pref.PreferenceIterator(dataset, batch_size=3, seed=1))
  for k, i in enumerate(batch["pair_index"]):
    assert batch["ref_chosen_logps"][k] == pytest.approx(ref[int(i)][0], rel=1e-6)
    assert batch["ref_rejected_logps"][k] == pytest.approx(ref[int(i)][1], rel=1e-6)

