"""Orbax checkpoint manager: round trip with shardings, retention (latest K + best), errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.parallel import mesh as mesh_lib


def _state(value, mesh):
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  return {"w": jax.device_put(jnp.full((8, 4), value, jnp.float32), sharding),
          "step": jnp.asarray(int(value), jnp.int32)}


def test_round_trip_keeps_values_shardings_and_data_state(tmp_path):
  mesh = mesh_lib.create_mesh((1, 8, 1))
  manager = CheckpointManager(tmp_path, keep=2)
  manager.save(5, _state(5.0, mesh), data_state={"pos": 17}, meta={"note": "x"})
  manager.wait_until_finished()
  restored, data_state, meta = manager.restore(_state(0.0, mesh))
  np.testing.assert_array_equal(restored["w"], np.full((8, 4), 5.0))
  assert restored["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert data_state == {"pos": 17} and meta["note"] == "x"
  manager.close()


def test_retention_keeps_latest_and_best(tmp_path):
  mesh = mesh_lib.create_mesh((1, 8, 1))
  manager = CheckpointManager(tmp_path, keep=2, best_metric="eval_loss")
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
  for step, loss in losses.items():
    manager.save(step, _state(step, mesh), metrics={} if loss is None else {"eval_loss": loss})
  manager.wait_until_finished()
  assert manager.best_step() == 2
  assert manager.all_steps() == [2, 4, 5]
  assert manager.latest_step() == 5
  manager.close()


def test_restore_errors(tmp_path):
  mesh = mesh_lib.create_mesh((1, 8, 1))
  manager = CheckpointManager(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    manager.restore(_state(0.0, mesh))
  manager.save(1, _state(1.0, mesh))
  manager.wait_until_finished()
  wrong = {"w": jnp.zeros((3, 3)), "step": jnp.asarray(0)}
  with pytest.raises(ValueError, match="cannot restore checkpoint"):
    manager.restore(wrong)
  with pytest.raises(ValueError, match="keep"):
    CheckpointManager(tmp_path / "x", keep=0)


def test_the_loader_reads_every_checkpoint_kind(tmp_path):
  """HF directory, wakea_jax model directory, and a run workdir (which also holds a
  config.json: the run's configuration record, not an HF config)."""
  import json

  from wakea_jax.checkpoints import export, hf, loader
  from wakea_jax.models import transformer
  from wakea_jax.models.config import get_preset
  model = transformer.create_model(get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1,
                                              num_heads=2, num_kv_heads=1, head_dim=16,
                                              mlp_dim=64, max_seq_len=32), seed=0)
  hf.save_model(model, tmp_path / "hf")
  export.save_model_dir(model, tmp_path / "native")
  run = tmp_path / "run"
  export.save_model_dir(model, run / "export" / "model")
  (run / "config.json").write_text(json.dumps({"objective": "sft", "seed": 0}))
  assert loader.resolve(tmp_path / "hf") == ("hf", tmp_path / "hf")
  assert loader.resolve(tmp_path / "native") == ("native", tmp_path / "native")
  assert loader.resolve(run) == ("native", run / "export" / "model")
  for path in ("hf", "native", "run"):
    assert loader.load_model(tmp_path / path).config.num_layers == 1
  with pytest.raises(FileNotFoundError, match="neither a wakea_jax model directory"):
    loader.resolve(tmp_path)


def test_a_model_directory_computes_as_the_caller_says(tmp_path):
  """dtype, param_dtype and remat_policy given to the loader replace a wakea_jax model
  directory's own (they were silently ignored): the weights are the saved ones, cast to the
  new param_dtype; what the model is (shapes, layers) stays the directory's."""
  from flax import nnx

  from wakea_jax.checkpoints import export, loader
  from wakea_jax.models import transformer
  from wakea_jax.models.config import get_preset
  config = get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32)
  model = transformer.create_model(config.replace(dtype="bfloat16"), seed=0)
  export.save_model_dir(model, tmp_path / "native")
  saved = nnx.to_pure_dict(nnx.state(model))
  kept = loader.load_model(tmp_path / "native")
  assert kept.config.dtype == "bfloat16"
  f32 = loader.load_model(tmp_path / "native", dtype="float32", remat_policy="dots",
                          value_head=True)    # value_head: build_model's business, ignored
  assert (f32.config.dtype, f32.config.param_dtype, f32.config.remat_policy) == (
      "float32", "float32", "dots")
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(f32)), saved)
  ids = jnp.arange(8)[None] % 64
  # The same logits as the model built in float32 from the start (same seed, same
  # weights), not the bfloat16-compute ones the directory says.
  reference = transformer.create_model(config, seed=0)(ids)
  np.testing.assert_array_equal(f32(ids), reference)
  assert np.abs(np.asarray(kept(ids), np.float32) - reference).max() > 1e-4
  bf16 = loader.load_model(tmp_path / "native", param_dtype="bfloat16")
  assert bf16.config.param_dtype == "bfloat16" and bf16.config.dtype == "bfloat16"
  for leaf, ref in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(bf16))),
                       jax.tree.leaves(saved)):
    if jnp.issubdtype(ref.dtype, jnp.floating):
      assert leaf.dtype == jnp.bfloat16
      np.testing.assert_array_equal(leaf, ref.astype(jnp.bfloat16))
  with pytest.raises(TypeError, match="unknown fields"):
    export.load_model_dir(tmp_path / "native", num_layers=2)
  with pytest.raises(ValueError):
    loader.load_model(tmp_path / "native", dtype="float17")
