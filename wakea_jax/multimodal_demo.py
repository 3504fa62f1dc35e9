r"""A model that learns to see and hear: multimodal SFT, then GRPO, on generated tasks.

  python -m wakea_jax.multimodal_demo --config=configs/multimodal_demo.py --workdir=/tmp/mm_demo

Per modality (vision: data/tasks/shapes.py, coloured shapes; audio: data/tasks/tones.py,
beeps and tones) the task's train and held-out splits are generated into
WORKDIR/data/<task>/, then for each seed, in WORKDIR/<modality>_seed<S>/ (re-running resumes
or skips finished stages):
  sft/    a vision- (audio-) language model trained from scratch on the train split
          (configs/multimodal.py; tower, projector and decoder all train: no pretrained
          encoder is available offline, see the README for the recipe), stopped early
  grpo/   GRPO from sft/ on new prompts of the task (images / clips SFT did not see),
          exact-match reward on the one-word answer
Every model is scored by greedy accuracy on the same held-out prompts, beside chance
(uniform guessing among the answers each question offers) and the majority baseline. The
table goes to stdout, results.md and results.json; the GRPO curves to curves.png.
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

from wakea_jax import demo_app, plots, trainers
from wakea_jax.data import sources
from wakea_jax.data.tasks import shapes, tones
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.sampling.sampler import chat_sampler

TASKS = {"vision": shapes, "audio": tones}


def write_task(config: ml_collections.ConfigDict, modality: str, root: pathlib.Path
               ) -> dict[str, Any]:
  """The modality's task files under root/<task>/ (written once); their paths and baselines."""
  task = TASKS[modality]
  directory = root / task.__name__.rsplit(".", 1)[-1]
  files = {name: directory / f"{name}.jsonl" for name in ("train", "eval", "prompts",
                                                           "eval_prompts")}
  d = config.data
  if all(f.is_file() for f in files.values()):
    train, held_out = ([r for _, r in sources.jsonl_lines(files[k])] for k in ("train", "eval"))
  else:
    extra = {"size": d.image_size} if modality == "vision" else {}
    described = {"described": d.described} if modality == "vision" else {}
    train = task.write(directory, d.train[modality], d.seed, split=0, **extra, **described)
    held_out = task.write(directory, d.eval, d.seed, split=1, **extra)
    # GRPO's prompts are new draws (split 2): questions without the labels SFT had.
    fresh = task.write(directory, d.prompts, d.seed, split=2, **extra)
    sources.write_jsonl(train, files["train"])
    sources.write_jsonl(held_out, files["eval"])
    sources.write_jsonl(task.prompts(fresh), files["prompts"])
    sources.write_jsonl(task.prompts(held_out), files["eval_prompts"])
  return {"files": files, "chance": task.chance_accuracy(held_out),
          "majority": task.majority_accuracy(held_out, train)}


def held_out_accuracy(grpo: ml_collections.ConfigDict, model_dir: pathlib.Path,
                      workdir: pathlib.Path, samples: int = 0) -> dict[str, float]:
  """Greedy accuracy of the model at `model_dir` (a multimodal run's workdir) on grpo's eval
  prompts, overall ("all") and per question kind (the prompts' "category"), with the RL
  learner's own sampler, media rendering and correctness reward; with `samples`, also the
  accuracy of that many samples per prompt at the rollout temperature ("sampled")."""
  stage = grpo.copy_and_resolve_references()
  stage.init_from = str(model_dir)
  learner = trainers.make_learner(stage, workdir)
  greedy = chat_sampler(learner.rollout_model.graphdef, learner.model_config,
                        learner.tokenizer, temperature=0.0, stop_ids=learner.stop_ids,
                        pad_id=learner.pad_id)
  ok, _ = eval_lib.sample_and_check(
      greedy, learner.policy_params(), learner.eval_prompts, 1, tokenizer=learner.tokenizer,
      rollout=learner.rollout, correct=learner.correct, router=None, rng=jax.random.key(0),
      batch_prompts=learner.eval_config.batch_prompts, media=learner.media)
  ok = np.asarray(ok, np.float64).reshape(-1) >= 0.5
  kinds = np.asarray([str(p.meta.get("category", "")) for p in learner.eval_prompts])
  out = {"all": float(ok.mean())}
  for kind in dict.fromkeys(kinds.tolist()):
    out[kind] = float(ok[kinds == kind].mean())
  if samples:
    # Accuracy of samples at the rollout temperature: what the RL reward measures.
    sampler = chat_sampler(learner.rollout_model.graphdef, learner.model_config,
                           learner.tokenizer, temperature=learner.rollout.temperature,
                           stop_ids=learner.stop_ids, pad_id=learner.pad_id)
    drawn, _ = eval_lib.sample_and_check(
        sampler, learner.policy_params(), learner.eval_prompts, samples,
        tokenizer=learner.tokenizer, rollout=learner.rollout, correct=learner.correct,
        router=None, rng=jax.random.key(1), batch_prompts=learner.eval_config.batch_prompts,
        media=learner.media)
    out["sampled"] = float((np.asarray(drawn) >= 0.5).mean())
  return out


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns what results.json holds."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  times = demo_app.StageTimes(workdir)
  results: dict[str, Any] = {"rows": [], "timing_s": times.seconds}
  total_start = time.perf_counter()
  for modality in config.modalities:   # fail before any training on a misspelt one
    if modality not in TASKS:
      raise ValueError(f"config.modalities: unknown modality {modality!r}; use {sorted(TASKS)}")
  for modality in config.modalities:
    task = write_task(config, modality, workdir / "data")
    files = task["files"]
    for seed in config.seeds:
      name = f"{modality}_seed{seed}"
      run_dir = workdir / name
      sft = config.sft[modality].copy_and_resolve_references()
      sft.seed = seed
      sft.data.seed = seed
      sft.data.sources = str(files["train"])
      sft.data.eval_sources = str(files["eval"])
      times.run(f"{name}/sft", trainers.run, sft, run_dir / "sft", run_dir=run_dir / "sft")
      grpo = config.grpo[modality].copy_and_resolve_references()
      grpo.seed = seed
      grpo.data.sources = str(files["prompts"])
      grpo.data.eval_sources = str(files["eval_prompts"])
      samples = config.eval_samples
      sft_accuracy = times.run(f"{name}/eval_sft", held_out_accuracy, grpo, run_dir / "sft",
                               run_dir / "eval_sft", samples)
      grpo.init_from = str(run_dir / "sft")
      times.run(f"{name}/grpo", trainers.run, grpo, run_dir / "grpo", run_dir=run_dir / "grpo")
      grpo_accuracy = times.run(f"{name}/eval_grpo", held_out_accuracy, grpo, run_dir / "grpo",
                                run_dir / "eval_grpo", samples)
      row = {"modality": modality, "seed": seed, "chance": task["chance"],
             "majority": task["majority"], "sft": sft_accuracy.pop("all"),
             "grpo": grpo_accuracy.pop("all"),
             "sft_sampled": sft_accuracy.pop("sampled", float("nan")),
             "grpo_sampled": grpo_accuracy.pop("sampled", float("nan")),
             "sft_by_kind": sft_accuracy, "grpo_by_kind": grpo_accuracy}
      results["rows"].append(row)
      logging.info("%s: %s", name, row)
  results["timing_s"]["total"] = time.perf_counter() - total_start
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (workdir / "results.md").write_text(table + "\n")
  print(table)
  curves = {f"{m} seed {s}": workdir / f"{m}_seed{s}" / "grpo"
            for m in config.modalities for s in config.seeds}
  curves = {k: d for k, d in curves.items() if (d / "metrics.jsonl").is_file()}
  if curves:
    plots.plot_runs(curves, workdir / "curves.png", smooth=5,
                    title="GRPO on generated shapes (vision) and tones (audio)")
  return results


def format_table(results: dict[str, Any]) -> str:
  """Held-out greedy accuracy per modality and seed, the means, and the wall times."""
  lines = ["| modality | seed | chance | majority | SFT greedy | GRPO greedy | GRPO - SFT "
           "| SFT sampled | GRPO sampled |",
           "|---|---|---|---|---|---|---|---|---|"]
  pct = lambda x: f"{100 * x:.1f}%"
  keys = ("chance", "majority", "sft", "grpo", "sft_sampled", "grpo_sampled")

  def cells(r: dict[str, float]) -> str:
    return (f"{pct(r['chance'])} | {pct(r['majority'])} | {pct(r['sft'])} | "
            f"{pct(r['grpo'])} | {100 * (r['grpo'] - r['sft']):+.1f} | "
            f"{pct(r['sft_sampled'])} | {pct(r['grpo_sampled'])} |")

  for r in results["rows"]:
    lines.append(f"| {r['modality']} | {r['seed']} | {cells(r)}")
  for modality in dict.fromkeys(r["modality"] for r in results["rows"]):
    mine = [r for r in results["rows"] if r["modality"] == modality]
    mean = {k: float(np.mean([r.get(k, float("nan")) for r in mine])) for k in keys}
    lines.append(f"| **{modality} mean** | {len(mine)} seeds | {cells(mean)}")
  lines += ["", "Per question kind (SFT -> GRPO, held-out greedy accuracy):"]
  for r in results["rows"]:
    kinds = ", ".join(f"{k} {pct(v)} -> {pct(r['grpo_by_kind'].get(k, float('nan')))}"
                      for k, v in r["sft_by_kind"].items())
    lines.append(f"- {r['modality']} seed {r['seed']}: {kinds}")
  lines.append("\nwall time (s): " + ", ".join(f"{k} {v:.0f}"
                                               for k, v in results["timing_s"].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  demo_app.run_demo(run, "configs/multimodal_demo.py")
