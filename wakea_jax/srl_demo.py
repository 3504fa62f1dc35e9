r"""The SRL learning demonstration (issue 16): does step-wise supervision from expert
trajectories (SRL, arXiv 2510.25992) make outcome RL work where it otherwise starves?

  python -m wakea_jax.srl_demo --config=configs/srl_demo.py --workdir=/tmp/wakea_srl

Stages, each in its own sub-directory of --workdir (a re-run skips or resumes finished ones):
  base/            SFT from scratch on easy equations (levels 1-3), hard ones at
                   `base_hard_percent` of its data
  sft/             base + SFT on the small expert set of hard equations (levels 4-6)
  rlvr_seedS/      base + GRPO with the exact-answer reward on hard equations
  srl_seedS/       base + SRL on the expert set's step-wise prompts
  srl_rlvr_seedS/  the SRL model + the same GRPO, KL-anchored to it
Every model is scored greedily on the same held-out hard equations: accuracy, and the fraction
of solutions whose every step is a valid transformation (equations.first_error). The table
goes to stdout, results.md and results.json; the RL curves to curves.png.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wakea_jax import config_lib, demo_app, plots, trainers
from wakea_jax.checkpoints import loader
from wakea_jax.data import sources
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data import trajectories as trajectories_lib
from wakea_jax.data.tasks import equations
from wakea_jax.data.train_tokenizer import train_task_tokenizer
from wakea_jax.rl import collaboration
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl.judge import LLMJudge

EXPORT = loader.RUN_EXPORT

# (key, label) of the table's rows, in order.
STAGES = (("base", "base"), ("sft", "SFT on the expert set"),
          ("rlvr", "RLVR alone (GRPO, outcome reward)"), ("srl", "SRL alone"),
          ("srl_rlvr", "SRL -> RLVR"))


def specs(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The task specs every stage reads: disjoint seeds, and held-out problems from split 1
  (a hash split of the equation text no training source can contain)."""
  hard = f"min_level={int(config.hard_min_level)}"

  def held_out(n: int) -> str:   # the first n held-out problems (each spec a prefix of a larger)
    return f"task:equations?n={n}&seed={int(config.eval_seed)}&split=1&{hard}"

  # The RL stages' evaluations during training (the curves; the table scores every final
  # model on all of "eval") read at most the first 256, which at 1,024 would otherwise cost
  # ~70 s each on one core.
  curves = min(256, int(config.eval_problems))
  return {
      "base": f"task:equations?n=20000&seed=0&split=0&max_level={int(config.easy_max_level)}",
      # Hard problems with their solutions for the base's data at `base_hard_percent`: a seed
      # of their own, so none is in the expert set or among the RL prompts by construction
      # (an equation may still recur by chance: the pool of level-4 equations is finite).
      "base_hard": f"task:equations?n=4000&seed=5&split=0&{hard}",
      # The collaboration's problems (its teacher's verified solutions are the expert set).
      "expert": f"task:equations?n={int(config.expert_problems)}"
                f"&seed={int(config.collaborate.seed)}&split=0&{hard}",
      "rl_prompts": f"task:equations?n=4000&seed=2&split=0&{hard}",
      "eval": held_out(int(config.eval_problems)),
      "rl_eval": held_out(curves),
      # SRL's periodic evaluation (mean step similarity): fewer problems, ~5 prompts each.
      "srl_eval": held_out(max(1, curves // 4)),
  }


def base_sources(config: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
  """The base model's data mixture: easy problems, and hard ones at `base_hard_percent`."""
  percent = float(config.base_hard_percent)
  if not 0 <= percent < 100:
    raise ValueError(f"srl_demo: base_hard_percent must be in [0, 100), got {percent}")
  s = specs(config)
  if not percent:
    return ((s["base"], 1.0),)
  return ((s["base"], 1.0 - percent / 100), (s["base_hard"], percent / 100))


def task_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> str:
  """Trains the task tokenizer once (bundled corpus + the training problems' solution
  text; never the held-out problems); "" with tokenizer_vocab 0 (the bundled tokenizer)."""
  if not config.tokenizer_vocab:
    return ""

  def lines() -> Iterator[str]:
    yield equations.SYSTEM
    for spec in [src for src, _ in base_sources(config)] + [specs(config)["expert"]]:
      _, n, seed, options = _parsed(spec)
      for record in equations.generate(min(n, int(config.tokenizer_problems)), seed, **options):
        for message in record["messages"]:
          yield from message["content"].split("\n")

  return str(train_task_tokenizer(lines(), workdir / "tokenizer.model",
                                  int(config.tokenizer_vocab),
                                  corpus_path=workdir / "tokenizer_corpus.txt"))


def _parsed(spec: str) -> tuple[str, int, int, dict[str, int]]:
  return sources.parse_task_spec(spec, tasks={"equations": equations.prompts})


def evaluate(rl_config: ml_collections.ConfigDict, model_dir: pathlib.Path, prompts_spec: str,
             tokenizer_path: str, batch_prompts: int = 64) -> dict[str, Any]:
  """Greedy held-out figures of the model in `model_dir`, computed in the RL stages' dtype
  (`rl_config.model.dtype`, whatever the model was trained in): accuracy (the exact answer),
  the fraction of solutions whose every step is valid and whose answer follows from them
  (`equations.first_error` is None), the fraction with an <answer>, and steps per solution,
  `batch_prompts` questions per sampler call."""
  start = time.perf_counter()
  prompts = prompts_lib.load_prompts(prompts_spec)
  out = eval_lib.greedy_rollouts(model_dir, prompts,
                                 rollout=config_lib.section(rl_config, "rollout"),
                                 tokenizer_path=tokenizer_path, dtype=rl_config.model.dtype,
                                 batch_prompts=batch_prompts)
  samples = out.samples()
  correct = np.asarray(rewards_lib.correctness_reward("math")(samples)) > 0.5
  valid, steps, answered = [], [], []
  for prompt, text in zip(prompts, out.texts):
    valid.append(equations.first_error(prompt.messages[-1]["content"], text) is None)
    steps.append(len(equations.parse_steps(text)))
    answered.append("<answer>" in text and "</answer>" in text)
  return {"accuracy": float(correct.mean()), "valid_solutions": float(np.mean(valid)),
          "answered": float(np.mean(answered)), "steps": float(np.mean(steps)),
          "questions": len(samples), "seconds": time.perf_counter() - start,
          "example": out.texts[0] if out.texts else ""}


def expert_set(config: ml_collections.ConfigDict, out: pathlib.Path
               ) -> tuple[dict[str, Any], pathlib.Path, pathlib.Path]:
  """The expert trajectories of the demonstration: the three-model collaboration
  (rl/collaboration.py: context retriever, teacher, verifier; configs/collaborate.py) on
  `expert_problems` hard training problems -> (its summary, the verified trajectories file,
  the same trajectories as SFT dialogues). A re-run skips the problems already accepted."""
  collab_config = config.collaborate.copy_and_resolve_references()
  collab_config.collaboration.num_problems = int(config.expert_problems)
  collab_config.collaboration.problem_options = ml_collections.ConfigDict(dict(
      split=0, level=0, min_level=int(config.hard_min_level)))
  judge = config_lib.judge_config(collab_config)
  teacher = {k: v for k, v in collab_config.teacher.to_dict().items()
             if not (k == "api_key_env" and not v)}
  collab, problems = collaboration.build(config_lib.collaboration_config(collab_config),
                                         teacher=teacher,
                                         judge=LLMJudge(judge) if judge is not None else None)
  summary = collab.run(problems, out)
  accepted = out / collaboration.TRAJECTORIES
  dialogues = out / "sft_dialogues.jsonl"
  sources.write_jsonl([{"messages": [
      {"role": "system", "content": equations.SYSTEM},
      {"role": "user", "content": t.problem},
      {"role": "assistant", "content": trajectories_lib.solution_text(t)}]}
      for t in trajectories_lib.load_trajectories(str(accepted))], dialogues)
  return summary, accepted, dialogues


def base_stage(config: ml_collections.ConfigDict, tokenizer: str) -> ml_collections.ConfigDict:
  """The base's run config: its data, and `model.vocab_size` 0 resolved to the size of
  `tokenizer` (the task tokenizer's path, "" for the bundled one): no embedding rows or
  logits that no token takes."""
  base = _stage(config.base, None, tokenizer, int(config.base.seed))
  base.data.sources = base_sources(config)
  base.data.eval_sources = ((specs(config)["base"].replace("seed=0", "seed=99"), 1.0),)
  if not base.model.vocab_size:
    base.model.vocab_size = tokenizer_lib.tokenizer_from(tokenizer).vocab_size
  return base


def _stage(stage: ml_collections.ConfigDict, init_from: pathlib.Path | None, tokenizer: str,
           seed: int) -> ml_collections.ConfigDict:
  stage = stage.copy_and_resolve_references()
  stage.seed = seed
  stage.tokenizer = tokenizer
  if init_from is not None:
    stage.init_from = str(init_from)
  return stage


def _scored(config: ml_collections.ConfigDict, key: str, seed: int, model_dir: pathlib.Path,
            tokenizer: str) -> dict[str, Any]:
  """The table row of stage `key`'s model: `evaluate` on the held-out problems, logged."""
  row = evaluate(config.rlvr, model_dir, specs(config)["eval"], tokenizer,
                 int(config.score_batch_prompts))
  logging.info("%s seed %d: %s", key, seed, {k: v for k, v in row.items() if k != "example"})
  return {"stage": key, "seed": seed, **row}


def _train(times: demo_app.StageTimes, workdir: pathlib.Path, key: str,
           stage: ml_collections.ConfigDict) -> pathlib.Path:
  """Trains `stage` in `workdir`/`key` (or finds it done), timed as `key` -> its export."""
  out = workdir / key
  times.run(key, trainers.run, stage, out, run_dir=out)
  return out / EXPORT


def seed_chain(config: ml_collections.ConfigDict, workdir: pathlib.Path, seed: int,
               tokenizer: str, expert: pathlib.Path, base_model: pathlib.Path
               ) -> dict[str, Any]:
  """One seed's RL stages from the base: RLVR alone, SRL alone and SRL -> RLVR, each trained
  (or found done) in `workdir` and scored -> {"rows", "timing_s", "runs"}."""
  s = specs(config)
  times = demo_app.StageTimes(workdir)
  rows: list[dict[str, Any]] = []
  runs: dict[str, pathlib.Path] = {}

  def train_and_score(key: str, stage: ml_collections.ConfigDict, label: str) -> pathlib.Path:
    model = _train(times, workdir, f"{key}_seed{seed}", stage)
    rows.append(_scored(config, key, seed, model, tokenizer))
    runs[f"{label} seed {seed}"] = workdir / f"{key}_seed{seed}"
    return model

  def rlvr_from(init: pathlib.Path) -> ml_collections.ConfigDict:
    stage = _stage(config.rlvr, init, tokenizer, seed)
    stage.data.sources, stage.data.eval_sources = s["rl_prompts"], s["rl_eval"]
    return stage

  train_and_score("rlvr", rlvr_from(base_model), "RLVR")

  srl = _stage(config.srl, base_model, tokenizer, seed)
  srl.srl.trajectories = str(expert)
  srl.srl.eval_trajectories = s["srl_eval"]
  srl_model = train_and_score("srl", srl, "SRL")

  train_and_score("srl_rlvr", rlvr_from(srl_model), "SRL->RLVR")
  return {"rows": rows, "timing_s": times.seconds, "runs": runs}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns the results written to results.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  total_start = time.perf_counter()
  s = specs(config)
  tokenizer = task_tokenizer(config, workdir)
  times = demo_app.StageTimes(workdir)
  results: dict[str, Any] = {"rows": [], "timing_s": times.seconds, "specs": s}

  def score(key: str, seed: int, model_dir: pathlib.Path) -> None:
    results["rows"].append(_scored(config, key, seed, model_dir, tokenizer))

  base = base_stage(config, tokenizer)
  base_model = _train(times, workdir, "base", base)
  score("base", base.seed, base_model)

  summary, expert, dialogues = times.run("collaborate", expert_set, config, workdir / "expert")
  results["collaboration"] = summary
  logging.info("collaboration: %s", summary)

  sft = _stage(config.sft, base_model, tokenizer, int(config.sft.seed))
  sft.model.vocab_size = base.model.vocab_size   # the base's model (config.sft.model is it)
  sft.data.sources = ((str(dialogues), 1.0),)
  sft.data.eval_sources = ((str(dialogues), 1.0),)
  score("sft", sft.seed, _train(times, workdir, "sft", sft))

  # Each seed's RLVR, SRL and SRL -> RLVR, the seeds in `workers` processes at once.
  seeds = [int(seed) for seed in config.seeds]
  chains = demo_app.run_jobs(seed_chain, [(config, workdir, seed, tokenizer, expert, base_model)
                                          for seed in seeds],
                             workers=int(config.workers), log_dir=workdir / "logs",
                             names=[f"seed{seed}" for seed in seeds])
  runs: dict[str, pathlib.Path] = {}
  for chain in chains:
    results["rows"].extend(chain["rows"])
    results["timing_s"].update(chain["timing_s"])
    runs.update(chain["runs"])

  results["timing_s"]["total"] = time.perf_counter() - total_start
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (workdir / "results.md").write_text(table + "\n")
  runs = {k: d for k, d in runs.items() if (d / "metrics.jsonl").is_file()}
  if runs:
    plots.plot_runs(runs, workdir / "curves.png", smooth=5,
                    title="SRL -> RLVR on held-out hard equations (SRL's accuracy panel: step "
                          "similarity)")
  print(table)
  return results


def _mean(rows: Sequence[dict[str, Any]], stage: str, key: str = "accuracy") -> float:
  values = [r[key] for r in rows if r["stage"] == stage]
  return float(np.mean(values)) if values else float("nan")


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table, the comparisons the issue targets, and wall times."""
  rows = results["rows"]
  labels = dict(STAGES)
  lines = ["| stage | seed | held-out accuracy | valid solutions | answered | steps |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {labels[r['stage']]} | {r['seed']} | {100 * r['accuracy']:.1f}% | "
                 f"{100 * r['valid_solutions']:.1f}% | {100 * r['answered']:.0f}% | "
                 f"{r['steps']:.2f} |")
  m = {key: _mean(rows, key) for key, _ in STAGES}
  lines.append("")
  lines.append("means over seeds: " + ", ".join(f"{key} {100 * v:.1f}%" for key, v in m.items()))
  checks = (("SRL -> RLVR > RLVR alone", m["srl_rlvr"] > m["rlvr"]),
            ("SRL -> RLVR > SRL alone", m["srl_rlvr"] > m["srl"]),
            ("SRL > SFT", m["srl"] > m["sft"]))
  lines.append("targets: " + "; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in checks))
  lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                             for k, v in results["timing_s"].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  demo_app.run_demo(run, "configs/srl_demo.py")
