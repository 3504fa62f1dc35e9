"""End-to-end SFT runs: exact resume after SIGKILL, and the NaN guard keeping the last
good checkpoint."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import supervised
from wakea_jax.train.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40


def _train_cmd(workdir):
  return [sys.executable, "-m", "wakea_jax.train", f"--config={ROOT / 'configs/sft.py'}:test",
          f"--workdir={workdir}", f"--config.train.steps={STEPS}"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a plain user run
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _losses(workdir):
  """step -> loss, the last record per step winning (a resumed run re-logs its steps)."""
  out = {}
  for record in metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl"):
    if "loss" in record:
      out[record["step"]] = record["loss"]
  return out


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_losses(tmp_path):
  straight = tmp_path / "straight"
  subprocess.run(_train_cmd(straight), check=True, env=_env(), cwd=ROOT, capture_output=True)
  reference = _losses(straight)
  assert sorted(reference) == list(range(1, STEPS + 1))

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      if (killed / "metrics.jsonl").exists() and max(_losses(killed), default=0) >= 12:
        break
      if proc.poll() is not None:
        pytest.fail("the training run ended before it could be killed")
      time.sleep(0.01)
    else:
      pytest.fail("the training run did not reach step 12 in time")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert max(_losses(killed)) < STEPS, "killed too late to test resume"

  # Every checkpoint left behind is complete and readable; nothing half-written is listed.
  manager = CheckpointManager(killed / "checkpoints")
  steps = manager.all_steps()
  assert steps and all(s % 5 == 0 for s in steps) and max(steps) >= 5
  for step in steps:  # each one restores
    assert (killed / "checkpoints" / str(step) / "state").is_dir()
  manager.close()

  subprocess.run(_train_cmd(killed), check=True, env=_env(), cwd=ROOT, capture_output=True)
  resumed = _losses(killed)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  # Bitwise identical on CPU: same batches (data-iterator state), same RNG, same updates.
  everything = range(1, STEPS + 1)
  assert [resumed[s] for s in everything] == [reference[s] for s in everything]
  eval_records = [r for r in metrics_lib.read_jsonl(killed / "metrics.jsonl") if "eval_loss" in r]
  assert eval_records and eval_records[-1]["step"] == STEPS
  assert reference[STEPS] < reference[1]  # it learns


class _FakeIterator:
  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return {"input_ids": np.zeros((8, 4), np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _lagged_run(tmp_path, monkeypatch, *, steps, log_every, checkpoint_every, eval_every=100,
                nan_at=None, on_device=True, events=None):
  """The loop over a fake step whose metrics are device arrays (or host floats with
  `on_device=False`) -> the events: ("dispatch", i), ("read", i) when the loop fetches step
  i's metrics, ("eval", step) (appended to `events` if given); and the checkpoint manager."""
  events = [] if events is None else events
  dispatched = {}    # id(metrics) -> the step index that made them
  iterator = _FakeIterator()
  device_get = loop_lib.jax.device_get

  def recording_get(tree):
    if id(tree) in dispatched:
      events.append(("read", dispatched[id(tree)]))
    return device_get(tree)

  monkeypatch.setattr(loop_lib.jax, "device_get", recording_get)

  def step_fn(state, step):
    events.append(("dispatch", step))
    next(iterator)
    finite = step + 1 != nan_at
    if finite:
      state = state.replace(step=state.step + 1)
    metrics = {"loss_sum": 1.0 if finite else float("nan"), "weight": 1.0, "grad_norm": 1.0,
               "finite": float(finite)}
    if on_device:
      metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    dispatched[id(metrics)] = step
    return state, metrics, 4.0

  def evaluate(state, step):
    del state
    events.append(("eval", step))
    return {"eval_loss": 1.0}

  state = TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.zeros(2)}, frozen={},
                     opt_state=(), rng=jnp.zeros(2, jnp.uint32))
  manager = CheckpointManager(tmp_path / "ckpt", keep=2)
  writer = metrics_lib.create_writer(tmp_path)
  config = loop_lib.TrainConfig(steps=steps, log_every=log_every, eval_every=eval_every,
                                checkpoint_every=checkpoint_every)
  try:
    loop_lib.train_loop(state=state, step_fn=step_fn, data=iterator,
                        summarize=supervised.sums_summary, config=config, checkpoints=manager,
                        writer=writer, evaluate=evaluate, flops_per_token=1.0)
  finally:
    writer.close()
    manager.wait_until_finished()
  return events, manager


def test_the_loop_reads_a_step_only_after_dispatching_the_next(tmp_path, monkeypatch):
  """The host prepares step s+1 while the device computes step s; a step that logs,
  evaluates, checkpoints or ends the run is read at once (nothing follows an unread step)."""
  d, r = "dispatch", "read"
  events, manager = _lagged_run(tmp_path / "log", monkeypatch, steps=6, log_every=3,
                                checkpoint_every=100)
  assert [e for e in events if e[0] != "eval"] == [
      (d, 0), (d, 1), (r, 0), (d, 2), (r, 1), (r, 2), (d, 3), (d, 4), (r, 3), (d, 5), (r, 4),
      (r, 5)]
  records = metrics_lib.read_jsonl(tmp_path / "log" / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(3, 1.0), (6, 1.0)]
  assert manager.latest_step() == 6
  manager.close()
  events, manager = _lagged_run(tmp_path / "eval", monkeypatch, steps=4, log_every=100,
                                checkpoint_every=100, eval_every=2)
  assert events == [(d, 0), (d, 1), (r, 0), (r, 1), ("eval", 2), (d, 2), (d, 3), (r, 2),
                    (r, 3), ("eval", 4)]
  manager.close()


@pytest.mark.parametrize("nan_at, log_every, checkpoint_every", [(7, 5, 5), (10, 4, 5)])
def test_a_nan_between_logs_stops_before_the_next_checkpoint(tmp_path, monkeypatch, nan_at,
                                                              log_every, checkpoint_every):
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=rf"at step {nan_at} .*Last good checkpoint: step 5 in"):
    _lagged_run(tmp_path, monkeypatch, steps=20, log_every=log_every,
                checkpoint_every=checkpoint_every, nan_at=nan_at)
  manager = CheckpointManager(tmp_path / "ckpt", keep=2)
  assert manager.latest_step() == 5
  manager.close()


def test_host_float_metrics_are_read_at_once(tmp_path, monkeypatch):
  """RL's step has waited for the device already: its NaN stops the loop before another
  step (minutes of rollouts) runs."""
  events = []
  with pytest.raises(loop_lib.NonFiniteLossError, match=r"at step 7 "):
    _lagged_run(tmp_path, monkeypatch, steps=20, log_every=5, checkpoint_every=5, nan_at=7,
                on_device=False, events=events)
  assert events[-2:] == [("dispatch", 6), ("read", 6)]   # read at once: no step 8 ran


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
  def train_step(state, batch):
    del batch
    finite = int(state.step) + 1 != 7  # the 7th step produces a NaN
    new = state.replace(step=state.step + 1) if finite else state
    return new, {"loss_sum": np.float32(1.0 if finite else np.nan), "weight": np.float32(1.0),
                 "grad_norm": np.float32(1.0), "finite": finite}

  iterator = _FakeIterator()

  def step_fn(state, step):
    del step
    batch = next(iterator)
    state, out = train_step(state, batch)
    return state, {k: float(v) for k, v in out.items()}, float(batch["input_ids"].size)

  state = TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.zeros(2)}, frozen={},
                     opt_state=(), rng=jnp.zeros(2, jnp.uint32))
  manager = CheckpointManager(tmp_path / "ckpt", keep=2)
  writer = metrics_lib.create_writer(tmp_path)
  config = loop_lib.TrainConfig(steps=20, log_every=1, eval_every=100, checkpoint_every=5)
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"at step 7 .*Last good checkpoint: step 5 in"):
    loop_lib.train_loop(
        state=state, step_fn=step_fn, data=iterator, summarize=supervised.sums_summary,
        config=config, checkpoints=manager, writer=writer, flops_per_token=1.0)
  assert manager.latest_step() == 5
  records = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, 7))
  writer.close()
  manager.close()
