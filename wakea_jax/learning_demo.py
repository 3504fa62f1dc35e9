r"""The learning demonstration: does RL make the model measurably better?

  python -m wakea_jax.learning_demo --config=configs/learning_demo.py --workdir=/tmp/wakea_learning

Stages, each in its own sub-directory of --workdir (re-running resumes / skips finished
stages, so an interrupted demonstration continues):
  sft/         SFT from scratch on bundled arithmetic dialogues, stopped at partial accuracy
  grpo_seedS/  GRPO from the SFT model, exact-answer reward, one run per seed
  ppo/         PPO (value head, GAE) from the SFT model
  dpo/         DPO on (correct, wrong) pairs sampled from the SFT model
Every model is evaluated on the same held-out prompts (greedy accuracy, pass@k), and DPO
also on held-out preference pairs. The table goes to stdout, results.md and results.json.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wakea_jax import config_lib, demo_app, plots, trainers
from wakea_jax.checkpoints import loader
from wakea_jax.data import preferences as preference_data
from wakea_jax.data import sources
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.rl import answers
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.sampling.sampler import chat_sampler
from wakea_jax.train import preference as preference_lib

EXPORT = loader.RUN_EXPORT


def _evaluate(rl_config: ml_collections.ConfigDict, model_dir: pathlib.Path) -> dict[str, Any]:
  """Greedy accuracy and pass@k of the model in `model_dir` on the RL config's eval prompts."""
  result = trainers.evaluate_checkpoint(rl_config, model_dir)
  return {k: v for k, v in result.items() if k not in ("examples", "checkpoint", "prompts")}


def preference_accuracy(dpo_config: ml_collections.ConfigDict, model_dir: pathlib.Path,
                        pairs_file: pathlib.Path) -> float:
  """Fraction of the pairs in `pairs_file` whose chosen response the model in `model_dir`
  gives a higher log-probability than the rejected one."""
  model = loader.load_model(model_dir)
  graphdef, params = nnx.split(model)
  dataset = preference_data.load_dataset([str(pairs_file)], tokenizer_from(dpo_config.tokenizer),
                                         seq_len=dpo_config.data.seq_len)
  return preference_lib.preference_accuracy(
      graphdef, params, dataset.batches(dpo_config.data.eval_batch_size))


def make_pairs(config: ml_collections.ConfigDict, model_dir: pathlib.Path, prompts_spec: str,
               seed: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """(correct, wrong) completion pairs of the model in `model_dir`, one per prompt that has
  both among `samples_per_prompt` samples."""
  model = loader.load_model(model_dir)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(config.grpo.tokenizer)
  sampler = chat_sampler(graphdef, model.config, tokenizer, model_source=f"the model {model_dir}",
                         temperature=config.pairs.temperature)
  prompts = prompts_lib.load_prompts(prompts_spec)
  g = config.pairs.samples_per_prompt
  correct, texts = eval_lib.sample_and_check(
      sampler, params, prompts, g, tokenizer=tokenizer,
      rollout=config_lib.section(config.grpo, "rollout"),
      correct=rewards_lib.correctness_reward(config.grpo.eval.correct_reward), router=None,
      rng=jax.random.key(seed))
  pairs = []
  for i, prompt in enumerate(prompts):
    good = [texts[i * g + j] for j in range(g) if correct[i, j] > 0.5]
    bad = [texts[i * g + j] for j in range(g) if not correct[i, j] > 0.5]
    if good and bad:
      pairs.append({"messages": list(prompt.messages),
                    "chosen": answers.final_response(good[0]),
                    "rejected": answers.final_response(bad[0])})
  stats = {"prompts": float(len(prompts)), "pairs": float(len(pairs))}
  return pairs, stats


def _rl_stage(stage: ml_collections.ConfigDict, sft_model: pathlib.Path, seed: int
              ) -> ml_collections.ConfigDict:
  """The stage's config from the SFT model; its periodic evaluation is off because every
  stage is evaluated once, identically, after training (`_evaluate`)."""
  stage = stage.copy_and_resolve_references()
  stage.seed = seed
  stage.init_from = str(sft_model)
  stage.data.eval_sources = ""
  return stage


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns the results written to results.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  times = demo_app.StageTimes(workdir)
  results: dict[str, Any] = {"rows": [], "timing_s": times.seconds}
  total_start = time.perf_counter()

  sft_dir = workdir / "sft"
  times.run("sft", trainers.run, config.sft, sft_dir, run_dir=sft_dir)
  sft_model = sft_dir / EXPORT
  base = _evaluate(config.grpo, sft_model)
  results["rows"].append({"stage": "SFT", "seed": config.sft.seed, **base})
  logging.info("SFT: %s", base)

  for seed in config.grpo_seeds:
    grpo = _rl_stage(config.grpo, sft_model, seed)
    out = workdir / f"grpo_seed{seed}"
    times.run(f"grpo_seed{seed}", trainers.run, grpo, out, run_dir=out)
    row = _evaluate(config.grpo, out / EXPORT)
    results["rows"].append({"stage": "GRPO", "seed": seed, **row})
    logging.info("GRPO seed %d: %s", seed, row)

  if config.run_ppo:
    ppo = _rl_stage(config.ppo, sft_model, config.ppo.seed)
    out = workdir / "ppo"
    times.run("ppo", trainers.run, ppo, out, run_dir=out)
    row = _evaluate(config.ppo, out / EXPORT)
    results["rows"].append({"stage": "PPO", "seed": ppo.seed, **row})

  if config.run_dpo:
    results["dpo"] = _run_dpo(config, workdir, sft_model, results, times)

  results["timing_s"]["total"] = time.perf_counter() - total_start
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (workdir / "results.md").write_text(table + "\n")
  print(table)
  curves = {f"GRPO seed {s}": workdir / f"grpo_seed{s}" for s in config.grpo_seeds}
  curves.update({name: workdir / name.lower() for name, on in (("PPO", config.run_ppo),
                                                                 ("DPO", config.run_dpo)) if on})
  curves = {k: d for k, d in curves.items() if (d / "metrics.jsonl").is_file()}
  if curves:
    plots.plot_runs(curves, workdir / "curves.png", title="The learning demonstration", smooth=10)
  return results


def _run_dpo(config: ml_collections.ConfigDict, workdir: pathlib.Path, sft_model: pathlib.Path,
             results: dict[str, Any], times: demo_app.StageTimes) -> dict[str, Any]:
  start = time.perf_counter()
  pair_dir = workdir / "pairs"
  pair_dir.mkdir(parents=True, exist_ok=True)
  files = {}
  for split, spec, seed in (("train", config.pairs.train_prompts, 0),
                            ("eval", config.grpo.data.eval_sources, 1)):
    path = pair_dir / f"{split}.jsonl"
    if not path.exists():
      pairs, stats = make_pairs(config, sft_model, spec, seed)
      sources.write_jsonl(pairs, path)
      logging.info("%s pairs: %s", split, stats)
    files[split] = path
  times.seconds["dpo_pairs"] = time.perf_counter() - start
  counts = {split: sum(1 for _ in open(path)) for split, path in files.items()}
  if not all(counts.values()):
    logging.warning("DPO skipped: the SFT model gave no (right, wrong) pair on some split "
                    "(%s pairs); it needs partial accuracy", counts)
    return {"skipped": f"no pairs: {counts}"}
  dpo = config.dpo.copy_and_resolve_references()
  dpo.init_from = str(sft_model)
  dpo.data.sources = ((str(files["train"]), 1.0),)
  dpo.data.eval_sources = ((str(files["eval"]), 1.0),)
  out = workdir / "dpo"
  before = preference_accuracy(dpo, sft_model, files["eval"])
  last = times.run("dpo", trainers.run, dpo, out, run_dir=out)
  after = preference_accuracy(dpo, out / EXPORT, files["eval"])
  row = _evaluate(config.grpo, out / EXPORT)
  results["rows"].append({"stage": "DPO", "seed": dpo.seed, **row})
  # eval_accuracy of the run: the DPO reward accuracy on the held-out pairs (implicit reward
  # margin > 0 against the SFT reference; every margin is 0 before training).
  return {"preference_accuracy_before": before, "preference_accuracy_after": after,
          "reward_accuracy_after": last.get("eval_accuracy", float("nan")),
          "train_pairs": counts["train"], "eval_pairs": counts["eval"]}


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table plus the gain, DPO and wall-time lines."""
  rows = results["rows"]
  keys = [k for k in ("greedy_accuracy", "pass@1", "pass@8") if k in rows[0]]
  lines = ["| stage | seed | " + " | ".join(keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['seed']} | " +
                 " | ".join(f"{100 * r[k]:.1f}%" for k in keys) + " |")
  grpo = [r["greedy_accuracy"] for r in rows if r["stage"] == "GRPO"]
  sft = next(r["greedy_accuracy"] for r in rows if r["stage"] == "SFT")
  if grpo:
    lines.append("")
    lines.append(f"GRPO greedy accuracy gain over SFT, mean of {len(grpo)} seeds: "
                 f"{100 * (np.mean(grpo) - sft):+.1f} points")
  if "dpo" in results and "skipped" in results["dpo"]:
    lines.append(f"DPO skipped: {results['dpo']['skipped']}")
  elif "dpo" in results:
    d = results["dpo"]
    lines.append(f"DPO held-out preference accuracy: {100 * d['preference_accuracy_before']:.1f}%"
                 f" -> {100 * d['preference_accuracy_after']:.1f}% (log p(chosen) > "
                 f"log p(rejected); {d['eval_pairs']} pairs, trained on {d['train_pairs']}); "
                 f"DPO reward accuracy {100 * d['reward_accuracy_after']:.1f}%")
  lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                             for k, v in results["timing_s"].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  demo_app.run_demo(run, "configs/learning_demo.py")
