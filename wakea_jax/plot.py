r"""Plotting binary: learning curves of one or more runs to a PNG.

  python -m wakea_jax.plot --runs="GRPO seed 0=/tmp/demo/grpo_seed0,PPO=/tmp/demo/ppo" \
      --out=/tmp/demo/curves.png
  python -m wakea_jax.plot --runs=/tmp/wakea_grpo --out=curves.png --smooth=10

--runs is a comma-separated list of LABEL=PATH (or a bare PATH, labelled by its directory
name); PATH is a run's workdir (its metrics.jsonl is read) or a metrics.jsonl file. The
panels are plots.DEFAULT_PANELS: reward, held-out accuracy, KL, completion length, loss and
held-out loss, each left out when no run logged it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from wakea_jax import logs, plots

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_list("runs", None, "LABEL=PATH,... (PATH: a run directory or a metrics.jsonl).")
  flags.DEFINE_string("out", None, "The PNG to write.")
  flags.DEFINE_string("title", "", "Figure title.")
  flags.DEFINE_integer("smooth", 1, "Moving-average window in logged points (1: raw curves).")


def parse_runs(specs: Sequence[str]) -> dict[str, pathlib.Path]:
  """{label: path} from LABEL=PATH items; a bare PATH is labelled by its run directory's name."""
  runs = {}
  for spec in specs:
    label, sep, raw = spec.partition("=")
    if not sep:
      raw, label = spec, pathlib.Path(spec).resolve().name
      if label == plots.METRICS_FILE:
        label = pathlib.Path(spec).resolve().parent.name
    label, raw = label.strip(), raw.strip()
    if not label or not raw:
      raise ValueError(f"--runs item {spec!r}: expected LABEL=PATH")
    path = pathlib.Path(raw)
    if label in runs:
      raise ValueError(f"--runs: label {label!r} given twice")
    if not plots.metrics_path(path).is_file():
      raise FileNotFoundError(f"--runs item {spec!r}: no {plots.metrics_path(path)}")
    runs[label] = path
  return runs


def main(argv: Sequence[str]) -> None:
  """Plots the runs and prints the panels drawn."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.runs or not FLAGS.out:
    raise app.UsageError("--runs and --out are required")
  logs.quiet_library_logs()
  panels = plots.plot_runs(parse_runs([s for s in FLAGS.runs if s.strip()]), FLAGS.out,
                           title=FLAGS.title or None, smooth=FLAGS.smooth)
  print(f"{FLAGS.out}: " + ", ".join(title for title, _ in panels))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
