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
