"""Learning curves from runs' `metrics.jsonl` files, drawn to one PNG.

  from wakea_jax import plots
  plots.plot_runs({"GRPO seed 0": "/tmp/demo/grpo_seed0", "PPO": "/tmp/demo/ppo"},
                  "/tmp/demo/curves.png")

Every trainer writes `workdir/metrics.jsonl` (train/metrics.py's JsonlWriter): one JSON object
per write, each with a "step" key. Train and periodic-eval scalars are separate lines, possibly
at different steps, so each metric is drawn only at the steps where it was logged. A panel is
(title, candidate keys): for each run the first key its records hold is drawn, so one panel
list serves GRPO (reward_mean, ref_kl or approx_kl), PPO and SFT/DPO (loss, eval_loss) runs.

matplotlib is imported inside the functions (Agg canvas, no pyplot state), so importing
wakea_jax never needs it. `python -m wakea_jax.plot` is the command line (plot.py).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

METRICS_FILE = "metrics.jsonl"

# (panel title, candidate keys): the first key present in a run's records is drawn.
Panel = tuple[str, tuple[str, ...]]
DEFAULT_PANELS: tuple[Panel, ...] = (
    # Mean total reward of the step's rollouts (RL learner).
    ("reward", ("reward_mean",)),
    # The periodic evaluation (the RL learner's greedy accuracy on held-out prompts; SFT's
    # held-out token accuracy; DPO's held-out reward accuracy).
    ("held-out accuracy", ("eval_greedy_accuracy", "eval_accuracy")),
    # KL to the reference (GRPO with loss.kl_beta > 0), else the k3 KL to the behaviour policy.
    ("KL", ("ref_kl", "approx_kl")),
    ("completion length (tokens)", ("response_length",)),
    ("loss", ("loss",)),
    ("held-out loss", ("eval_loss",)),
)

# Series with at most this many points get markers (sparse eval rows stay visible).
_MARKER_MAX_POINTS = 25


def metrics_path(path: str | os.PathLike) -> pathlib.Path:
  """`path` itself, or `path/metrics.jsonl` when `path` is a directory (a run's workdir)."""
  path = pathlib.Path(path)
  return path / METRICS_FILE if path.is_dir() else path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` (or of a run directory's), in file order.

  Blank lines are skipped. A line that is not a JSON object with a numeric "step" raises a
  ValueError naming the file and line number, except a last line without its newline that
  does not parse: a run killed mid-write leaves one, so it is skipped with a warning.
  """
  path = metrics_path(path)
  text = path.read_text(encoding="utf-8")
  lines = text.split("\n")
  # After split, lines[-1] is "" when the file ends with a newline; otherwise it is a last
  # line whose write never finished (or a file written without a final newline).
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        logging.warning("%s:%d: skipping a truncated last line (a run stopped mid-write?): %s",
                        path, number, e)
        continue
      raise ValueError(f"{path}:{number}: not a JSON line ({e}): {line[:80]!r}") from None
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
      raise ValueError(f"{path}:{number}: no numeric \"step\" key: {line[:80]!r}")
    records.append(record)
  return records


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
  """(steps, values) of `key` over the records holding a numeric value for it, by step. A
  step logged twice (a resumed run re-logs the steps after its last checkpoint) keeps the
  later value."""
  by_step: dict[float, float] = {}
  for r in records:
    v = r.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool) and "step" in r:
      by_step[r["step"]] = float(v)
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def moving_average(values: Sequence[float], window: int) -> list[float]:
  """Trailing mean over `window` points (fewer at the start); window <= 1 returns a copy."""
  if window <= 1:
    return list(values)
  out, total, finite = [], 0.0, []
  for i, v in enumerate(values):
    finite.append(v if math.isfinite(v) else 0.0)
    total += finite[-1]
    if i >= window:
      total -= finite[i - window]
    out.append(total / min(i + 1, window))
  return out


def plot_runs(runs: Mapping[str, str | os.PathLike | Sequence[Mapping[str, Any]]],
              out_png: str | os.PathLike, panels: Sequence[Panel] = DEFAULT_PANELS,
              title: str | None = None, smooth: int = 1) -> list[Panel]:
  """Draws one figure to `out_png`: a panel per metric with data, one line per run.

  `runs` maps a legend label ("GRPO seed 0") to a run directory, a metrics.jsonl path, or
  records already read. In each panel a run draws the first of the panel's keys its records
  hold; panels no run has data for are left out. Series of at most 25 points (periodic
  evals) are drawn raw with markers; on longer ones `smooth` > 1 draws a trailing moving
  average over that many points over the faint raw curve. The PNG is written atomically
  (a temporary file, then os.replace). Returns the panels drawn, in order.
  """
  if not runs:
    raise ValueError("plot_runs: no runs given")
  records = {label: read_metrics(r) if isinstance(r, str | os.PathLike) else list(r)
             for label, r in runs.items()}
  drawn: list[tuple[Panel, dict[str, tuple[str, list[float], list[float]]]]] = []
  for panel in panels:
    lines = {}
    for label, recs in records.items():
      for key in panel[1]:
        steps, values = series(recs, key)
        if steps:
          lines[label] = (key, steps, values)
          break
    if lines:
      drawn.append((panel, lines))
  if not drawn:
    keys = sorted({k for _, ks in panels for k in ks})
    raise ValueError(f"plot_runs: no run has any of the keys {keys}")

  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  ncols = min(3, len(drawn))
  nrows = -(-len(drawn) // ncols)
  fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  colors = {label: f"C{i % 10}" for i, label in enumerate(records)}
  handles = {}
  for ax, ((panel_title, _), lines) in zip(axes, drawn):
    for label, (_, steps, values) in lines.items():
      color, sparse = colors[label], len(steps) <= _MARKER_MAX_POINTS
      style = dict(color=color, marker="o" if sparse else None, markersize=4)
      if smooth > 1 and not sparse and len(steps) > smooth:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        handles[label], = ax.plot(steps, moving_average(values, smooth), linewidth=1.6, **style)
      else:
        handles[label], = ax.plot(steps, values, linewidth=1.4, **style)
    ax.set_title(panel_title)
    ax.set_xlabel("step")
    ax.set_ylabel(" / ".join(dict.fromkeys(key for key, _, _ in lines.values())))
    ax.grid(True, alpha=0.3)
  # One step range for every panel: sparse (eval) series line up with the train curves.
  steps = [s for _, lines in drawn for _, ss, _ in lines.values() for s in ss]
  pad = max((max(steps) - min(steps)) * 0.03, 1.0)
  for ax in axes[:len(drawn)]:
    ax.set_xlim(min(steps) - pad, max(steps) + pad)
  for ax in axes[len(drawn):]:
    ax.set_visible(False)
  fig.legend([handles[label] for label in records if label in handles],
             [label for label in records if label in handles], loc="outside lower center",
             ncol=min(len(handles), 6), frameon=False)
  note = f"(moving average of {smooth} points over the faint raw curve)" if smooth > 1 else ""
  if title or note:
    fig.suptitle(" ".join(t for t in (title, note) if t))

  out_png = pathlib.Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=out_png.name + ".", suffix=".tmp", dir=out_png.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png", dpi=110)
    os.chmod(tmp, 0o644)  # mkstemp's file is owner-only
    os.replace(tmp, out_png)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return [panel for panel, _ in drawn]
