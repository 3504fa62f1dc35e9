"""The training loop: resume, step, log, evaluate, checkpoint, stop on NaN.

Objective-agnostic: it drives a jitted `train_step(state, batch) -> (state, metrics)` whose
metrics are sums with a `weight` denominator (see train/step.py), and an `eval_step`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import numpy as np

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train.state import TrainState

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 1000
  log_every: int = 10
  eval_every: int = 200
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  # Peak FLOP/s of the whole mesh for MFU (e.g. 989e12 per H100 in bf16); 0 = don't report.
  peak_flops: float = 0.0

  def __post_init__(self) -> None:
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


class ResumableIterator(Protocol):
  def __next__(self) -> dict[str, np.ndarray]: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


class NonFiniteLossError(FloatingPointError):
  """Training hit a NaN/Inf; the state (and latest checkpoint) is the last good one."""


def _ratio(sums: dict[str, float], num: str, den: str) -> float:
  return sums[num] / sums[den] if sums.get(den) else float("nan")


def evaluate(eval_step: Callable[..., dict[str, Any]], state: TrainState,
             batches: Iterable[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
             rules: mesh_lib.Rules) -> dict[str, float]:
  """Token-weighted eval loss, perplexity and next-token accuracy over all `batches`."""
  totals: dict[str, float] = {}
  with mesh_lib.logical_rules(mesh, rules):
    for batch in batches:
      out = eval_step(state.params, state.frozen, mesh_lib.shard_batch(batch, mesh, rules))
      for k, v in jax.device_get(out).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  if not totals:
    return {}
  loss = _ratio(totals, "nll_sum", "weight")
  result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_tokens": totals.get("weight", 0.0)}
  if "correct" in totals:
    result["eval_accuracy"] = _ratio(totals, "correct", "weight")
  return result


def train_loop(
    *,
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]],
    eval_step: Callable[..., dict[str, Any]] | None,
    train_iter: ResumableIterator,
    eval_batches: list[dict[str, np.ndarray]],
    config: LoopConfig,
    checkpoints: CheckpointManager,
    writer: Any,
    mesh: jax.sharding.Mesh,
    rules: mesh_lib.Rules,
    flops_per_token: float,
    meta: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """Runs until `config.steps`, resuming from the latest checkpoint if there is one."""
  start = checkpoints.latest_step()
  if start is not None:
    state, data_state, _ = checkpoints.restore(state)
    if data_state:
      train_iter.set_state(data_state)
    _log.info("resumed from step %d in %s", start, checkpoints.directory)
  step = int(jax.device_get(state.step))
  if step >= config.steps:
    _log.info("already at step %d >= train.steps=%d; nothing to do", step, config.steps)
  throughput = metrics_lib.Throughput(total_steps=config.steps, flops_per_token=flops_per_token,
                                      peak_flops=config.peak_flops or None, start_step=step)
  interval: dict[str, float] = {}
  last: dict[str, float] = {}
  try:
    while step < config.steps:
      batch = next(train_iter)
      data_state = train_iter.get_state()
      tokens = float(np.asarray(batch["input_ids"]).size)
      with mesh_lib.logical_rules(mesh, rules):
        state, step_metrics = train_step(state, mesh_lib.shard_batch(batch, mesh, rules))
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      if not host.pop("finite", 1.0):
        checkpoints.wait_until_finished()
        good = checkpoints.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step + 1} "
            f"(loss={host['loss_sum'] / max(host['weight'], 1):.4g}, "
            f"grad_norm={host['grad_norm']:.4g}); training stopped without applying it. "
            f"Last good checkpoint: "
            f"{'step %d in %s' % (good, checkpoints.directory) if good is not None else 'none'}")
      step += 1
      throughput.add_tokens(tokens)
      for k, v in host.items():
        interval[k] = interval.get(k, 0.0) + v
      interval["_count"] = interval.get("_count", 0.0) + 1

      scalars: dict[str, float] = {}
      if step % config.log_every == 0 or step == config.steps:
        n = interval.pop("_count")
        scalars.update({
            "loss": _ratio(interval, "loss_sum", "weight"),
            "grad_norm": interval["grad_norm"] / n,
            **({"accuracy": _ratio(interval, "correct", "weight")} if "correct" in interval
               else {}),
            **({"learning_rate": interval["learning_rate"] / n} if "learning_rate" in interval
               else {}),
            **throughput.measure(step),
        })
        interval = {}
      eval_metrics: dict[str, float] = {}
      if eval_step is not None and eval_batches and (
          step % config.eval_every == 0 or step == config.steps):
        eval_metrics = evaluate(eval_step, state, eval_batches, mesh, rules)
        scalars.update(eval_metrics)
      if scalars:
        writer.write_scalars(step, scalars)
        last.update(scalars)
      if step % config.checkpoint_every == 0 or step == config.steps:
        checkpoints.save(step, state, data_state=data_state, meta=meta,
                         metrics=eval_metrics)
  finally:
    checkpoints.wait_until_finished()
    writer.flush()
  return state, last


