"""The one training loop: resume, step, log, evaluate, checkpoint, stop on NaN, report progress.

Objective-agnostic. Every runner (SFT, preference, RL) hands it
  step_fn(state, step) -> (state, metrics, tokens)   one training step; the metrics are
                  scalars (host floats, or device arrays still being computed) and include
                  `finite` (0 when the step was non-finite and not applied); `tokens` feeds
                  tokens/s and TFLOP/s
  data            the resumable input (get_state / set_state), saved with every checkpoint
  summarize(interval sums, steps) -> scalars   turns the metrics added up over a logging
                  interval into logged scalars (SFT divides loss sums by token weights; RL
                  averages per-step figures)
  evaluate(state, step) -> scalars   held-out evaluation (optional)
and the loop does the rest the same way for all of them.

A step whose metrics are device arrays (SFT, preference training) is read to the host only
after the next step has been dispatched (at once on a step that logs, evaluates, checkpoints
or ends the run), so the host draws and shards batch s+1 while the device still computes
step s instead of waiting for it. A non-finite step is still found before any checkpoint or
evaluation follows it; the step dispatched after it starts from the unchanged state (the
train step applies nothing that is non-finite) and is dropped with it. Host-float metrics
(RL, whose step has already waited for the device) are read at once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
from absl import logging

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train.state import TrainState

StepFn = Callable[[TrainState, int], tuple[TrainState, dict[str, Any], float]]
Summarize = Callable[[dict[str, float], int], dict[str, float]]
EvaluateFn = Callable[[TrainState, int], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train: the loop's cadence (steps are optimizer steps for SFT and preference
  training, RL steps (rollout + updates) for RL)."""

  steps: int = 1000
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  # Peak FLOP/s of the whole mesh for MFU (e.g. 989e12 per H100 in bf16); 0 = don't report.
  peak_flops: float = 0.0
  # Evaluate once before the first step (a fresh run only).
  eval_at_start: bool = False

  def __post_init__(self) -> None:
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


class Resumable(Protocol):
  """Input whose position is saved in checkpoints."""

  def get_state(self) -> Any:
    """A JSON-serialisable position."""

  def set_state(self, state: Any) -> None:
    """Continues from a position `get_state` returned."""


class NonFiniteLossError(FloatingPointError):
  """Training hit a NaN/Inf; the state (and latest checkpoint) is the last good one."""


def ratio(sums: dict[str, float], num: str, den: str) -> float:
  """sums[num] / sums[den], NaN when the denominator is missing or zero."""
  return sums[num] / sums[den] if sums.get(den) else float("nan")


def _nonfinite_message(step: int, metrics: dict[str, float],
                       checkpoints: CheckpointManager) -> str:
  if "loss_sum" in metrics:
    loss = metrics["loss_sum"] / max(metrics.get("weight", 1.0), 1.0)
  else:
    loss = metrics.get("loss", float("nan"))
  good = checkpoints.latest_verified_step()  # the newest step that matches its manifest
  if good is not None:
    where = f"step {good} in {checkpoints.directory}"
  else:
    good = checkpoints.latest_verified_step(include_unverifiable=True)
    where = (f"step {good} in {checkpoints.directory} (saved without a manifest: unverified)"
             if good is not None else "none")
  return (f"non-finite loss or gradient at step {step} (loss={loss:.4g}, "
          f"grad_norm={metrics.get('grad_norm', float('nan')):.4g}); training stopped "
          f"without applying it. Last good checkpoint: {where}")


def train_loop(
    *,
    state: TrainState,
    step_fn: StepFn,
    data: Resumable,
    summarize: Summarize,
    config: TrainConfig,
    checkpoints: CheckpointManager,
    writer: metrics_lib.MetricWriter,
    evaluate: EvaluateFn | None = None,
    flops_per_token: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """Runs until `config.steps`, resuming from the latest checkpoint if there is one.

  Returns the final state and the last value of every logged scalar.
  """
  start = 0
  if checkpoints.latest_step():
    # The newest step that verifies against its manifest; damaged newer ones are skipped
    # (with a warning), and no intact step at all is an error, not a silent fresh start.
    start, state, data_state, _ = checkpoints.restore_with_step(state)
    if data_state:
      data.set_state(data_state)
    logging.info("resumed from step %d in %s", start, checkpoints.directory)
  if start >= config.steps:
    logging.info("already at step %d >= train.steps=%d; nothing to do", start, config.steps)
  throughput = metrics_lib.Throughput(total_steps=config.steps, flops_per_token=flops_per_token,
                                      peak_flops=config.peak_flops or None, start_step=start)
  interval: dict[str, float] = {}
  count = 0
  last: dict[str, float] = {}
  step = start
  try:
    if start == 0 and evaluate is not None and config.eval_at_start:
      scalars = evaluate(state, 0)
      writer.write_scalars(0, scalars)
      last.update(scalars)
    # Steps dispatched whose metrics the host has not read yet: (step number, metrics, tokens).
    pending: collections.deque[tuple[int, dict[str, Any], float]] = collections.deque()
    while step < config.steps:
      state, metrics, tokens = step_fn(state, step)
      step += 1
      pending.append((step, metrics, tokens))
      last_step = step == config.steps
      log_now = step % config.log_every == 0 or last_step
      eval_now = evaluate is not None and (step % config.eval_every == 0 or last_step)
      save_now = step % config.checkpoint_every == 0 or last_step
      lag = (not (log_now or eval_now or save_now)
             and any(isinstance(v, jax.Array) for v in metrics.values()))
      # Every step but the one just dispatched, and that one too where something follows it
      # or where its metrics are on the host already.
      while len(pending) > (1 if lag else 0):
        number, metrics, tokens = pending.popleft()
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not host.pop("finite", 1.0):
          checkpoints.wait_until_finished()
          raise NonFiniteLossError(_nonfinite_message(number, host, checkpoints))
        throughput.add_tokens(tokens)
        for k, v in host.items():
          interval[k] = interval.get(k, 0.0) + v
        count += 1

      scalars: dict[str, float] = {}
      if log_now:
        scalars.update(summarize(interval, count))
        scalars.update(throughput.measure(step))
        interval, count = {}, 0
      eval_scalars: dict[str, float] = {}
      if eval_now:
        eval_scalars = evaluate(state, step)
        scalars.update(eval_scalars)
      if scalars:
        writer.write_scalars(step, scalars)
        last.update(scalars)
      if save_now:
        checkpoints.save(step, state, data_state=data.get_state(), meta=meta,
                         metrics=eval_scalars)
  finally:
    checkpoints.wait_until_finished()
    writer.flush()
  return state, last


def mean_summary(interval: dict[str, float], count: int) -> dict[str, float]:
  """Per-step figures averaged over the logging interval (RL's metrics are per step)."""
  return {k: v / max(count, 1) for k, v in interval.items()}
