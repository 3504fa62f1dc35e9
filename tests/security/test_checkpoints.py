"""Damaged checkpoints: per-step sha256 manifests, verified restore with fallback to the last
intact step, legacy steps without a manifest, pruning, and the train loop's resume and NaN
message naming a verified step."""

import json
import logging
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.checkpoints import manager as manager_lib
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import supervised
from wakea_jax.train.state import TrainState


def _state(step):
  # Random values: the array data dominates the step directory and is not compressible, so a
  # flipped bit lands in array data that orbax restores without noticing.
  return {"w": jax.random.normal(jax.random.key(step), (64, 64), jnp.float32),
          "step": jnp.asarray(step, jnp.int32)}


def _saved(directory, steps=(10, 20), keep=3):
  manager = CheckpointManager(directory, keep=keep)
  for step in steps:
    manager.save(step, _state(step), data_state={"pos": step}, meta={"note": f"s{step}"})
  manager.close()
  return CheckpointManager(directory, keep=keep)


def _data_file(step_dir):
  """The largest file of a step's array data."""
  files = [p for p in (pathlib.Path(step_dir) / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _rel(step_dir, path):
  return path.relative_to(step_dir).as_posix()


def _remove(path):
  path.unlink()


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _flip_bit(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _warnings(caplog):
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_manifest_records_every_file_of_a_finished_step(tmp_path):
  manager = CheckpointManager(tmp_path, keep=3)
  manager.save(1, _state(1))
  manifest_path = tmp_path / "manifests" / "1.json"
  deadline = time.time() + 60  # written in the background once the async save has finished
  while not manifest_path.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert manifest_path.exists()
  manager.close()
  manifest = json.loads(manifest_path.read_text())
  step_dir = tmp_path / "1"
  files = sorted(_rel(step_dir, p) for p in step_dir.rglob("*") if p.is_file())
  assert manifest["step"] == 1 and sorted(manifest["files"]) == files
  data = _data_file(step_dir)
  assert manifest["files"][_rel(step_dir, data)]["size"] == data.stat().st_size
  assert manager.verify(1) is True
  # Orbax lists and restores the steps with the manifests directory beside them.
  again = CheckpointManager(tmp_path, keep=3)
  assert again.all_steps() == [1]
  restored, _, _ = again.restore(_state(0))
  np.testing.assert_array_equal(restored["w"], _state(1)["w"])
  again.close()


@pytest.mark.parametrize("damage,reason", [(_remove, "missing file"),
                                           (_truncate, "size differs for"),
                                           (_flip_bit, "sha256 differs for")])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
  manager = _saved(tmp_path)
  data = _data_file(tmp_path / "20")
  damage(data)
  with caplog.at_level(logging.WARNING):
    restored, data_state, meta = manager.restore(_state(0))
  np.testing.assert_array_equal(restored["w"], _state(10)["w"])
  assert int(restored["step"]) == 10 and data_state == {"pos": 10} and meta["note"] == "s10"
  warnings = _warnings(caplog)
  assert re.search(rf"step 20 .*{reason} {re.escape(_rel(tmp_path / '20', data))}", warnings)
  assert "restored checkpoint step 10" in warnings
  assert manager.restore_with_step(_state(0))[0] == 10
  assert manager.latest_step() == 20 and manager.latest_verified_step() == 10
  manager.close()


def test_explicit_damaged_step_raises_naming_the_file(tmp_path):
  manager = _saved(tmp_path)
  data = _data_file(tmp_path / "20")
  _flip_bit(data)
  with pytest.raises(ValueError, match=f"sha256 differs for {_rel(tmp_path / '20', data)}"):
    manager.restore(_state(0), step=20)
  restored, _, _ = manager.restore(_state(0), step=10)
  np.testing.assert_array_equal(restored["w"], _state(10)["w"])
  manager.close()


def test_extra_file_in_a_step_is_damage(tmp_path):
  manager = _saved(tmp_path)
  (tmp_path / "20" / "state" / "stray").write_bytes(b"x")
  with pytest.raises(ValueError, match="unexpected file state/stray"):
    manager.verify(20)
  assert manager.restore_with_step(_state(0))[0] == 10
  manager.close()


def test_no_intact_step_raises_listing_every_step(tmp_path, caplog):
  manager = _saved(tmp_path)
  _flip_bit(_data_file(tmp_path / "20"))
  _truncate(_data_file(tmp_path / "10"))
  with caplog.at_level(logging.WARNING), pytest.raises(
      manager_lib.CheckpointIntegrityError, match="no step is intact") as info:
    manager.restore(_state(0))
  assert "step 20: damaged: sha256 differs" in str(info.value)
  assert "step 10: damaged: size differs" in str(info.value)
  assert manager.latest_verified_step() is None
  manager.close()


def test_corrupt_manifest_is_damage_not_a_legacy_step(tmp_path):
  manager = _saved(tmp_path)
  (tmp_path / "manifests" / "20.json").write_text('{"files": ')
  assert manager.restore_with_step(_state(0))[0] == 10
  manager.close()


def test_legacy_steps_without_manifest_restore_with_a_warning(tmp_path, caplog):
  manager = _saved(tmp_path)
  for path in (tmp_path / "manifests").iterdir():  # as the code before manifests left it
    path.unlink()
  with caplog.at_level(logging.WARNING):
    step, restored, data_state, _ = manager.restore_with_step(_state(0))
  assert step == 20 and data_state == {"pos": 20}
  np.testing.assert_array_equal(restored["w"], _state(20)["w"])
  assert re.search(r"step 20 .*no manifest and cannot be verified", _warnings(caplog))
  assert manager.latest_verified_step() is None
  assert manager.latest_verified_step(include_unverifiable=True) == 20
  assert manager.verify(20) is False
  manager.close()


def test_verified_step_preferred_over_a_newer_unverifiable_one(tmp_path, caplog):
  manager = _saved(tmp_path)
  (tmp_path / "manifests" / "20.json").unlink()
  with caplog.at_level(logging.WARNING):
    step, restored, _, _ = manager.restore_with_step(_state(0))
  assert step == 10
  np.testing.assert_array_equal(restored["w"], _state(10)["w"])
  assert re.search(r"step 20 .*no manifest", _warnings(caplog))
  manager.close()


def test_orbax_error_on_a_verified_step_falls_back(tmp_path, caplog):
  manager = _saved(tmp_path)
  # Damage the manifest and the step consistently: the step "verifies" but orbax fails.
  step_dir = tmp_path / "20"
  data = _data_file(step_dir)
  data.unlink()
  manifest_path = tmp_path / "manifests" / "20.json"
  manifest = json.loads(manifest_path.read_text())
  del manifest["files"][_rel(step_dir, data)]
  manifest_path.write_text(json.dumps(manifest))
  assert manager.verify(20) is True
  with caplog.at_level(logging.WARNING):
    assert manager.restore_with_step(_state(0))[0] == 10
  assert re.search(r"step 20 .*orbax cannot restore it", _warnings(caplog))
  manager.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_pruning_removes_manifests(tmp_path, async_save):
  manager = CheckpointManager(tmp_path, keep=2, async_save=async_save)
  for step in range(1, 6):
    manager.save(step, _state(step))
    if not async_save:  # written before save returns
      assert (tmp_path / "manifests" / f"{step}.json").exists()
  manager.close()
  assert manager.all_steps() == [4, 5]
  assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["4.json", "5.json"]
  assert manager.verify(4) and manager.verify(5)


def test_saving_over_a_damaged_step_replaces_it(tmp_path):
  manager = _saved(tmp_path)
  _flip_bit(_data_file(tmp_path / "20"))
  assert manager.save(20, _state(20)) is True
  manager.wait_until_finished()
  assert manager.verify(20) is True
  restored, _, _ = manager.restore(_state(0))
  np.testing.assert_array_equal(restored["w"], _state(20)["w"])
  assert manager.save(20, _state(20)) is False  # an intact step is kept
  manager.close()


class _Iterator:
  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return {"input_ids": np.zeros((8, 4), np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _train_state():
  return TrainState(step=jnp.asarray(0, jnp.int32),
                    params={"w": jax.random.normal(jax.random.key(0), (64, 64))}, frozen={},
                    opt_state=(), rng=jnp.zeros(2, jnp.uint32))


def _run(tmp_path, manager, steps, nan_at=None, on_step=None):
  iterator = _Iterator()
  seen = []

  def step_fn(state, step):
    seen.append(step)
    if on_step is not None:
      on_step(step)
    next(iterator)
    finite = step + 1 != nan_at
    if finite:
      state = state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0})
    return state, {"loss_sum": 1.0 if finite else float("nan"), "weight": 1.0,
                   "grad_norm": 1.0, "finite": float(finite)}, 32.0

  writer = metrics_lib.create_writer(tmp_path)
  config = loop_lib.TrainConfig(steps=steps, log_every=1, eval_every=100, checkpoint_every=5)
  try:
    state, _ = loop_lib.train_loop(
        state=_train_state(), step_fn=step_fn, data=iterator,
        summarize=supervised.sums_summary, config=config, checkpoints=manager, writer=writer,
        flops_per_token=1.0)
  finally:
    writer.close()
  return state, seen, iterator


def test_train_loop_resumes_from_the_newest_verified_step(tmp_path, caplog):
  manager = CheckpointManager(tmp_path / "ckpt", keep=3)
  _run(tmp_path, manager, steps=10)
  assert manager.all_steps() == [5, 10]
  _flip_bit(_data_file(tmp_path / "ckpt" / "10"))
  with caplog.at_level(logging.WARNING):
    state, seen, iterator = _run(tmp_path, manager, steps=12)
  assert seen == list(range(5, 12))  # resumed from step 5, not the damaged step 10
  assert int(state.step) == 12 and iterator.position == 12
  np.testing.assert_allclose(state.params["w"], _train_state().params["w"] + 12.0, rtol=1e-6)
  assert re.search(r"step 10 .*sha256 differs", _warnings(caplog))
  assert manager.verify(10) is True  # trained past it again: replaced by an intact step
  manager.close()


def test_nan_message_names_a_verified_checkpoint(tmp_path):
  manager = CheckpointManager(tmp_path / "ckpt", keep=3)

  def damage_step_10(step):
    if step == 10:  # step 10's checkpoint was saved just before this step
      manager.wait_until_finished()
      _flip_bit(_data_file(tmp_path / "ckpt" / "10"))

  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"at step 12 .*Last good checkpoint: step 5 in"):
    _run(tmp_path, manager, steps=20, nan_at=12, on_step=damage_step_10)
  assert manager.latest_step() == 10 and manager.latest_verified_step() == 5
  manager.close()
