"""Orbax checkpoints of the train state and the data-iterator state, with exact resume.

Each step directory holds three items:
  state  the TrainState (params, frozen state, optimizer state, step, RNG), sharded arrays;
  data   the input pipeline's iterator state (JSON), so a resumed run sees exactly the
         batches it would have seen;
  meta   JSON: the step's metrics and whatever the caller records (config, model config).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
(even SIGKILL mid-save) never leaves a directory that `latest_step` would pick up; leftover
temporaries are removed on the next start. Saves are asynchronous: the arrays are copied to
host memory, training continues, and the write finishes in the background.

Retention: the latest `keep` checkpoints, plus the best one by `best_metric` when given.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointManager:
  """Saves and restores (train state, data-iterator state, meta) per step with Orbax.

  Keeps the latest `keep` steps plus, with `best_metric`, the best step by that metric
  (`best_mode` "min" or "max"). With `async_save` the writes finish in the background.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.keep = keep
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,  # retention is ours: latest `keep` plus the best
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, in ascending order."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The saved step with the best `best_metric`; None without one (or no step has metrics)."""
    return self._manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, *, data_state: dict[str, Any] | None = None,
           meta: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` at `step` (asynchronously); returns whether it saved."""
    self._manager.wait_until_finished()  # the previous save, usually long done
    if step in self._manager.all_steps():
      return False
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric and self.best_metric not in metrics:
      metrics = {}  # no eval this step: a checkpoint without metrics, never "best"
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave({**(meta or {}), "metrics": metrics})),
        metrics=metrics or None, force=True)
    self._prune(extra=step)
    return bool(saved)

  def _prune(self, extra: int) -> None:
    steps = sorted(set(self._manager.all_steps()) | {extra})
    keep = set(steps[-self.keep:])
    best = self.best_step()
    if best is not None:
      keep.add(best)
    for step in steps:
      if step not in keep and step != extra:
        self._manager.delete(step)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state, data_state, meta) at `step` (default: latest) laid out like `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (or of arrays, whose
    shapes, dtypes and shardings are used).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        data=ocp.args.JsonRestore(),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise ValueError(f"cannot restore checkpoint {self.directory / str(step)}: {e}") from e
    return restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {})

  def wait_until_finished(self) -> None:
    """Blocks until the pending asynchronous save, if any, is fully written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save, then releases the Orbax manager."""
    self._manager.wait_until_finished()
    self._manager.close()
