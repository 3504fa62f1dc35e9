r"""Learning beyond on-policy samples: on-policy GRPO against LUFFY (arXiv 2504.14945) and
ExGRPO (arXiv 2510.02245) on a split the SFT model rarely solves.

  python -m wakea_jax.offpolicy_demo --config=configs/offpolicy_demo.py --workdir=/tmp/offpolicy

Stages, each in its own sub-directory of --workdir (re-running resumes / skips finished
stages):
  sft/             SFT from scratch (configs/sft.py:arithmetic), unless --config.sft_dir names
                   an existing one
  traces.jsonl     LUFFY's off-policy traces: the bundled expert's worked answers for the RL
                   training prompts
  ARM_seedS/       one RL run per arm and seed from the SFT model, every arm with the same
                   prompts, group size and rollouts per step:
                     grpo    on-policy GRPO
                     luffy   GRPO whose groups carry `offpolicy.per_group` expert traces
                     exgrpo  GRPO with ExGRPO's experience replay (config.experience)
                     hybrid  both
Every model is evaluated (greedy accuracy) on the same held-out splits; the table goes to
stdout, results.md and results.json, the curves to curves.png, with the off-policy and replay
statistics of each run (means over its steps, the buffer's last state).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wakea_jax import demo_app, plots, trainers
from wakea_jax.checkpoints import loader
from wakea_jax.data import sources
from wakea_jax.data.tasks import arithmetic

EXPORT = loader.RUN_EXPORT
ARMS = ("grpo", "luffy", "exgrpo", "hybrid")
LABELS = {"grpo": "GRPO (on-policy)", "luffy": "LUFFY", "exgrpo": "ExGRPO",
          "hybrid": "LUFFY + ExGRPO"}
# Means over a run's steps (metrics.jsonl) reported beside its accuracy.
MEAN_KEYS = ("reward_mean", "offpolicy_fraction", "importance_weight_mean",
             "importance_weight_min", "importance_weight_max", "experience/replay_ratio",
             "experience/offpolicy_fraction", "experience/importance_weight_mean")
# Substrings of the experience buffer's metrics, reported at the run's last step.
LAST_KEY_PARTS = ("experience/prompts_", "experience/trajectories", "experience/retired",
                  "experience/started")
PANELS = plots.DEFAULT_PANELS[:4] + (
    ("off-policy fraction", ("offpolicy_fraction",)),
    ("importance weight (mean)", ("importance_weight_mean",)),
    ("replayed groups / groups", ("experience/replay_ratio",)),
)


def write_traces(config: ml_collections.ConfigDict, path: pathlib.Path) -> int:
  """The expert's worked answers for the RL training prompts, as a LUFFY trace file. The
  settings they were made with are kept beside it (`*.settings.json`); a re-run with other
  config.traces settings is refused rather than silently reusing the old traces."""
  settings = {k: config.traces[k] for k in sorted(config.traces.keys())}
  settings_path = path.with_suffix(".settings.json")
  if path.exists() and settings_path.exists():
    old = json.loads(settings_path.read_text())
    changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if changed:
      raise ValueError(
          f"{path} was written with config.traces {old}, this run asks for {settings} "
          f"(differs in {', '.join(changed)}); use a new workdir (--config.sft_dir can share "
          "the SFT model)")
  if not path.exists():
    records = arithmetic.expert_traces(config.traces.n, config.traces.seed,
                                       max_operand=config.traces.max_operand,
                                       operands=config.traces.operands,
                                       split=config.traces.split,
                                       style=config.traces.style)
    sources.write_jsonl(records, path)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
  with open(path) as f:
    return sum(1 for _ in f)


def check_arms(arms: Sequence[str]) -> None:
  """Raises ValueError naming the first arm that is not one of ARMS."""
  for arm in arms:
    if arm not in ARMS:
      raise ValueError(f"config.arms: unknown arm {arm!r}; use one of {ARMS}")


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int, sft_model: pathlib.Path,
               traces: pathlib.Path) -> ml_collections.ConfigDict:
  """The RL config of one arm: config.grpo from the SFT model, with traces and/or replay."""
  check_arms([arm])
  stage = config.grpo.copy_and_resolve_references()
  stage.seed = seed
  stage.init_from = str(sft_model)
  if arm in ("luffy", "hybrid"):
    stage.offpolicy.traces = str(traces)
  if arm in ("exgrpo", "hybrid"):
    if "experience" not in stage:
      raise ValueError("this build's RL config has no experience section: ExGRPO is not wired")
    stage.experience.enabled = True
  return stage


def evaluate_splits(config: ml_collections.ConfigDict, model_dir: pathlib.Path
                    ) -> dict[str, float]:
  """Greedy accuracy of the model in `model_dir` on each of config.eval_splits."""
  out = {}
  for split, spec in config.eval_splits.items():
    stage = config.grpo.copy_and_resolve_references()
    stage.data.eval_sources = spec
    out[split] = trainers.evaluate_checkpoint(stage, model_dir)["greedy_accuracy"]
  return out


def run_stats(run_dir: pathlib.Path) -> dict[str, float]:
  """Means of MEAN_KEYS over the run's steps and the last value of its buffer metrics."""
  records = plots.read_metrics(run_dir)
  stats: dict[str, float] = {}
  for key in MEAN_KEYS:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)
              and math.isfinite(r[key])]
    if values:
      stats[key] = float(np.mean(values))
  for r in reversed(records):
    last = {k: float(v) for k, v in r.items()
            if any(p in k for p in LAST_KEY_PARTS) and isinstance(v, int | float)}
    if last:
      stats.update(last)
      break
  return stats


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns what results.json holds."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  check_arms(config.arms)   # fail before any training on a misspelt arm
  times = demo_app.StageTimes(workdir)
  results: dict[str, Any] = {"rows": [], "timing_s": times.seconds, "stats": {}}
  total_start = time.perf_counter()

  sft_dir = pathlib.Path(config.sft_dir) if config.sft_dir else workdir / "sft"
  if not config.sft_dir:
    times.run("sft", trainers.run, config.sft, sft_dir, run_dir=sft_dir)
  sft_model = sft_dir / EXPORT
  if not sft_model.is_dir():
    raise FileNotFoundError(f"{sft_model}: no exported SFT model "
                            f"(config.sft_dir={config.sft_dir!r})")
  results["rows"].append({"arm": "SFT", "seed": config.sft.seed,
                          **evaluate_splits(config, sft_model)})
  logging.info("SFT: %s", results["rows"][-1])

  traces = workdir / "traces.jsonl"
  results["traces"] = write_traces(config, traces)

  for arm in config.arms:
    for seed in config.seeds:
      name = f"{arm}_seed{seed}"
      stage = arm_config(config, arm, seed, sft_model, traces)
      times.run(name, trainers.run, stage, workdir / name, run_dir=workdir / name)
      row = {"arm": LABELS[arm], "seed": seed, **evaluate_splits(config, workdir / name / EXPORT)}
      results["rows"].append(row)
      results["stats"][name] = run_stats(workdir / name)
      logging.info("%s: %s %s", name, row, results["stats"][name])

  results["timing_s"]["total"] = time.perf_counter() - total_start
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results, list(config.eval_splits.keys()))
  (workdir / "results.md").write_text(table + "\n")
  print(table)
  curves = {f"{LABELS[arm]} seed {seed}": workdir / f"{arm}_seed{seed}"
            for arm in config.arms for seed in config.seeds}
  curves = {k: d for k, d in curves.items() if (d / "metrics.jsonl").is_file()}
  if curves:
    plots.plot_runs(curves, workdir / "curves.png", panels=PANELS, smooth=10,
                    title="GRPO, LUFFY and ExGRPO from one SFT model")
  return results


def format_table(results: dict[str, Any], splits: Sequence[str]) -> str:
  """Accuracy per arm and seed on every split, the per-arm means, the run statistics and the
  wall times, as Markdown."""
  rows = results["rows"]
  lines = ["| arm | seed | " + " | ".join(f"{s} (greedy)" for s in splits) + " |",
           "|---|---|" + "---|" * len(splits)]
  for r in rows:
    lines.append(f"| {r['arm']} | {r['seed']} | "
                 + " | ".join(f"{100 * r[s]:.1f}%" for s in splits) + " |")
  lines += ["", "| arm | seeds | " + " | ".join(f"{s} mean" for s in splits) + " |",
            "|---|---|" + "---|" * len(splits)]
  for arm in dict.fromkeys(r["arm"] for r in rows):
    mine = [r for r in rows if r["arm"] == arm]
    lines.append(f"| {arm} | {len(mine)} | "
                 + " | ".join(f"{100 * np.mean([r[s] for r in mine]):.1f}%" for s in splits)
                 + " |")
  if results.get("stats"):
    lines.append("")
    for name, stats in results["stats"].items():
      lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
  lines.append(f"\ntraces: {results.get('traces', 0)}; wall time (s): "
               + ", ".join(f"{k} {v:.0f}" for k, v in results["timing_s"].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  demo_app.run_demo(run, "configs/offpolicy_demo.py")
