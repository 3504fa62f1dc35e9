"""The command line every learning demonstration shares (`python -m wakea_jax.<name>_demo`).

`run_demo(run, default_config)` defines `--config` (an ml_collections config file, default
`default_config`, overridable with `--config.a.b=value`) and the required `--workdir`,
quietens the libraries' logs and calls `run(config, workdir)`: each demonstration is an
importable `run` plus this one line under `if __name__ == "__main__"`.

`StageTimes` times the stages of a demonstration for its results.json, across re-runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from wakea_jax import logs


def run_demo(run: Callable[[Any, str], Any], default_config: str) -> None:
  """Parses the flags and runs `run(config, workdir)` as an absl app."""
  config_flags.DEFINE_config_file("config", default_config, "The demonstration config.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where every stage writes.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)


class StageTimes:
  """Wall seconds of a demonstration's stages (its results.json "timing_s"), kept across
  re-runs: a stage that a re-run skips keeps the seconds measured by the run that did it,
  read from `workdir`/results.json, so the table reports training time, not the skip.

  A stage counts as skipped when its run directory's metrics.jsonl is the same file (size and
  modification time) after the stage as before: every trainer appends to it when it trains,
  and a finished run is returned as it is. Stages without a run directory are timed anew.
  """

  def __init__(self, workdir: str | os.PathLike[str]) -> None:
    path = pathlib.Path(workdir) / "results.json"
    self.previous: dict[str, float] = {}
    if path.exists():
      try:
        self.previous = dict(json.loads(path.read_text()).get("timing_s", {}))
      except (ValueError, AttributeError):   # unreadable: every stage is timed anew
        self.previous = {}
    self.seconds: dict[str, float] = {}

  def run(self, name: str, fn: Callable[..., Any], *args: Any,
          run_dir: str | os.PathLike[str] | None = None) -> Any:
    """`fn(*args)`, timed into `seconds[name]`; with `run_dir`, a skip keeps the old time."""
    metrics = None if run_dir is None else pathlib.Path(run_dir) / "metrics.jsonl"
    before = _stamp(metrics)
    start = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - start
    if before is not None and _stamp(metrics) == before and name in self.previous:
      seconds = float(self.previous[name])
    self.seconds[name] = seconds
    return out


def _stamp(path: pathlib.Path | None) -> tuple[int, int] | None:
  if path is None or not path.exists():
    return None
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns


__all__ = ["StageTimes", "run_demo"]
