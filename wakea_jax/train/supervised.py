"""Batch-driven training over the shared loop: one batch -> one jitted step.

What SFT (`train/sft.py`) and preference training (`train/preference.py`) have in common:
a resumable iterator of host batches, the jitted step's metric sums (losses and counts with
a `weight` denominator, exact under accumulation), and evaluation over a fixed list of
held-out batches. RL drives the same loop with its own step (`rl/learner.py`).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable
from typing import Any, Protocol

import jax
import numpy as np

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.parallel import multihost
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import setup as setup_lib
from wakea_jax.train.state import TrainState


class BatchIterator(Protocol):
  """A resumable iterator of host batches (the data pipeline's, the preference pairs')."""

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch."""

  def get_state(self) -> Any:
    """A JSON-serialisable position."""

  def set_state(self, state: Any) -> None:
    """Continues from a position `get_state` returned."""


def check_global_batch(built: setup_lib.Setup, rows: int, field: str) -> None:
  """Raises ValueError naming `field` when a global batch of `rows` does not split over the
  mesh's batch shards (the 'act_batch' axes)."""
  sharding = mesh_lib.batch_sharding(built.mesh, built.rules)
  shards = multihost.batch_shards(sharding)
  if rows % shards:
    raise ValueError(f"{field}={rows} (the global batch) must be divisible by the {shards} "
                     f"batch shards of mesh {dict(built.mesh.shape)} (the 'act_batch' axes "
                     f"{multihost.batch_spec_axes(built.mesh, sharding.spec)})")


def sums_summary(interval: dict[str, float], count: int) -> dict[str, float]:
  """Loss and accuracy as ratios of the interval's sums; grad norm and learning rate as
  per-step means."""
  out = {"loss": loop_lib.ratio(interval, "loss_sum", "weight"),
         "grad_norm": interval["grad_norm"] / count}
  if "correct" in interval:
    out["accuracy"] = loop_lib.ratio(interval, "correct", "weight")
  if "learning_rate" in interval:
    out["learning_rate"] = interval["learning_rate"] / count
  return out


def evaluate_batches(eval_step: Any, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
                     mesh: jax.sharding.Mesh, rules: mesh_lib.Rules) -> dict[str, float]:
  """Token-weighted (pair-weighted for preference losses) eval loss, perplexity and accuracy
  over all `batches`."""
  totals: dict[str, float] = {}
  with mesh_lib.logical_rules(mesh, rules):
    for batch in batches:
      out = eval_step(state.params, state.frozen, mesh_lib.shard_batch(batch, mesh, rules))
      for k, v in jax.device_get(out).items():
        totals[k] = totals.get(k, 0.0) + float(v)
  if not totals:
    return {}
  loss = loop_lib.ratio(totals, "nll_sum", "weight")
  result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_tokens": totals.get("weight", 0.0)}
  if "correct" in totals:
    result["eval_accuracy"] = loop_lib.ratio(totals, "correct", "weight")
  return result


def train_on_batches(built: setup_lib.Setup, workdir: pathlib.Path, *,
                     train_iter: BatchIterator, eval_batches: list[dict[str, np.ndarray]],
                     seq_len: int, checkpoints: CheckpointManager | None = None
                     ) -> tuple[TrainState, dict[str, float]]:
  """Runs (or resumes) the shared loop over `train_iter`; returns (state, last scalars).

  `checkpoints` defaults to the run's manager (best by eval loss when there are eval
  batches); it is closed at the end either way.
  """
  mesh, rules, train_step = built.mesh, built.rules, built.train_step

  def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict[str, jax.Array], float]:
    del step
    batch = next(train_iter)
    # Every process holds an equal share of the global batch, so this is the global count
    # without a collective per step.
    tokens = float(np.asarray(batch["input_ids"]).size) * jax.process_count()
    with mesh_lib.logical_rules(mesh, rules):
      state, out = train_step(state, mesh_lib.shard_batch(batch, mesh, rules))
    # Device scalars: the loop reads them after dispatching the next step.
    return state, out, tokens

  evaluate = None
  if eval_batches:
    eval_step = built.eval_step()

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
      del step
      return evaluate_batches(eval_step, state, eval_batches, mesh, rules)

  if checkpoints is None:
    checkpoints = setup_lib.checkpoint_manager(
        built.run, workdir, best_metric="eval_loss" if eval_batches else None)
  writer, meta = setup_lib.start_run_files(built.run, workdir, built.model_config)
  try:
    return loop_lib.train_loop(
        state=built.state, step_fn=step_fn, data=train_iter, summarize=sums_summary,
        evaluate=evaluate, config=built.run.train, checkpoints=checkpoints, writer=writer,
        flops_per_token=built.flops_per_token(seq_len), meta=meta)
  finally:
    checkpoints.close()
    writer.close()
