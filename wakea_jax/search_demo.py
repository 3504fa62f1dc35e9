r"""The search RL learning demonstration (issue 15): no retrieval, RAG, an SFT searcher, and
the searcher after GRPO with the Search-R1 and R-Search protocols, on the same held-out 2-hop
questions (configs/search_demo.py says what each arm is).

  python -m wakea_jax.search_demo --config=configs/search_demo.py --workdir=/tmp/wakea_search

Stages, each in --workdir (re-running skips what is done, so an interrupted run continues):
  index/            the KB corpus and its MiniLM + ScaNN index (toolbox/multihop.py)
  data/             teacher dialogues of the four prompt formats (the Search-R1 and R-Search
                    teachers search that index for real) and the held-out prompt files
  tokenizer.model   a SentencePiece tokenizer over the bundled corpus and the task's text
  sft/              one SFT run on the mixed dialogues, from scratch
  search_r1_seedS/  GRPO from the SFT model, Search-R1 protocol, exact-match reward
  rsearch_seedS/    GRPO from the SFT model, R-Search query DAGs, the 50/25/25 reward
Every model is evaluated greedily on the held-out questions: accuracy (SQuAD exact match of
the `<answer>`), searches per answer, and for R-Search its three reward components. The table
goes to stdout, results.md and results.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from wakea_jax.data.tasks import multihop as task
from wakea_jax.data.tasks.multihop_kb import KBConfig
from wakea_jax.data.train_tokenizer import DEFAULT_USER_DEFINED_SYMBOLS, train_task_tokenizer
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl import search_rewards
from wakea_jax.toolbox import multihop

EXPORT = loader.RUN_EXPORT
PROTOCOL_NUMBERS = {"search_r1": 1, "rsearch": 2}   # the task's `protocol` option

# The arms: (key, label, prompt format). The table lists the SFT arms first, then the GRPO
# runs in the order they ran.
ARMS = (("direct", "(a) no retrieval", "direct"),
        ("rag", "(b) RAG, answer once", "rag"),
        ("sft_search_r1", "(c) SFT searcher, Search-R1", "search_r1"),
        ("grpo_search_r1", "(d) GRPO, Search-R1", "search_r1"),
        ("sft_rsearch", "SFT searcher, R-Search DAG", "rsearch"),
        ("grpo_rsearch", "(e) GRPO, R-Search DAG", "rsearch"))


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What the stages share: the index, the tokenizer and the data files."""

  index: str
  tokenizer: str
  sft_sources: tuple[tuple[str, float], ...]
  sft_eval: str                     # held-out Search-R1 teacher dialogues: the SFT eval loss
  eval_prompts: dict[str, str]      # prompt format -> prompt source
  seconds: float


def _train_worlds(config: ml_collections.ConfigDict, cache: pathlib.Path, index: str
                  ) -> list[tuple[KBConfig, str, str]]:
  """(KB, index directory, search mode) of every knowledge base the teacher dialogues come
  from: the evaluated KB (its training entities, searched like the rollouts: MiniLM + ScaNN)
  and `train_kbs - 1` more generated with other seeds (fresh names; searched by BM25 over
  their own document store, so no encoder runs for them)."""
  base = task.kb_config(**config.kb)
  worlds = [(base, index, "dense")]
  for seed in range(1, int(config.train_kbs)):
    kb = dataclasses.replace(base, seed=base.seed + seed)
    built = multihop.build_index(cache, config=kb, embedder="hash-64")
    worlds.append((kb, built.index, "bm25"))
  return worlds


def _teacher_files(config: ml_collections.ConfigDict, worlds: Sequence[tuple[KBConfig, str, str]],
                   data: pathlib.Path) -> dict[str, pathlib.Path]:
  """The SFT dialogues of each prompt format (training entities, every hop type), an equal
  share from each KB in `worlds`, written once."""
  teacher = config.teacher
  files = {fmt: data / f"sft_{fmt}.jsonl" for fmt in ("search_r1", "rsearch", "direct", "rag")}
  for fmt, path in files.items():
    if path.exists() or not teacher[fmt]:
      continue
    records: list[dict[str, Any]] = []
    stats = task.TeacherStats()
    for i, (kb, index, mode) in enumerate(worlds):
      n = int(teacher[fmt]) * (i + 1) // len(worlds) - int(teacher[fmt]) * i // len(worlds)
      seed = int(teacher.seed) + i
      if not n:
        continue
      if fmt in ("search_r1", "rsearch"):
        part, part_stats = multihop.teacher_records(n, seed, index=index, protocol=fmt,
                                                    k=config.search_k, mode=mode, config=kb)
        for field in dataclasses.fields(stats):
          setattr(stats, field.name, getattr(stats, field.name) + getattr(part_stats, field.name))
      elif fmt == "direct":
        part = [task.direct_dialogue(q) for q in task.select(n, seed, config=kb)]
      else:
        part = [{"messages": [*r["messages"], {"role": "assistant",
                                              "content": f"<answer>{r['answer']}</answer>"}]}
                for r in multihop.rag_prompts(n, seed, index=index, split=0, hop=0,
                                              k=config.rag_k, mode=mode, config=kb)]
      records += part
    if fmt in ("search_r1", "rsearch"):
      logging.info("%s teacher over %d KBs: %s", fmt, len(worlds), stats)
    sources.write_jsonl(records, path)
  return {fmt: path for fmt, path in files.items() if path.exists()}


def _eval_files(config: ml_collections.ConfigDict, index: str, data: pathlib.Path
                ) -> dict[str, str]:
  """Held-out 2-hop prompts of each format: the same questions in the same order."""
  n, seed = int(config.eval_questions), int(config.eval_seed)
  rag = data / "eval_rag.jsonl"
  if not rag.exists():
    sources.write_jsonl(multihop.rag_prompts(n, seed, index=index, split=1, hop=2,
                                             k=config.rag_k, config=task.kb_config(**config.kb)),
                        rag)
  return {**{fmt: _eval_spec(config, n, number) for fmt, number in
             (("direct", 0), *PROTOCOL_NUMBERS.items())}, "rag": str(rag)}


def _sft_eval_file(config: ml_collections.ConfigDict, index: str, data: pathlib.Path) -> str:
  """The SFT run's evaluation data: Search-R1 teacher dialogues for the held-out 2-hop
  questions the arms are scored on (entities no training dialogue names). Their loss falls
  only as far as the model copies unseen names from the question and the passages; a
  training file's loss also falls by memorising the training names, which is what the
  searcher did when names repeated (configs/search_demo.py)."""
  path = data / "sft_eval_search_r1.jsonl"
  if not path.exists():
    multihop.write_teacher_sft(path, int(config.eval_questions), int(config.eval_seed),
                               index=index, protocol="search_r1", split=1, hop=2,
                               k=config.search_k, config=task.kb_config(**config.kb))
  return str(path)


def _tokenizer(config: ml_collections.ConfigDict, files: Sequence[pathlib.Path],
               workdir: pathlib.Path) -> str:
  """Trains the task tokenizer on the bundled corpus plus every line of the teacher
  dialogues and the KB documents (deterministic: one thread, fixed input order)."""
  if not config.tokenizer_vocab:
    return ""

  def lines() -> Iterator[str]:
    yield from task.SYSTEMS.values()
    for path in files:
      with open(path, encoding="utf-8") as f:
        for row in f:
          record = json.loads(row)
          for message in record.get("messages", [record]):   # a dialogue or a KB document
            yield from message.get("content", message.get("text", "")).split("\n")

  # The space is a piece of its own, never merged into a word: a name then has the same
  # pieces after a space, a newline or a tag ("<search>Pojous", "<answer>Kraitrubri"), so
  # copying it is a token-for-token copy. With spaces merged (" Pojous" -> " P","oj","ous"
  # but "Pojous" -> "P","oj","ous") the SFT model had not learnt to copy unseen names after
  # 800 steps (0% on held-out questions). It costs ~34% more tokens per dialogue.
  return str(train_task_tokenizer(lines(), workdir / "tokenizer.model",
                                  int(config.tokenizer_vocab),
                                  corpus_path=workdir / "data" / "tokenizer_corpus.txt",
                                  user_defined_symbols=(*DEFAULT_USER_DEFINED_SYMBOLS, "\u2581")))


# The settings the files of `prepare` depend on: a workdir prepared with other values is
# refused rather than silently reused (the index is keyed by its own content hash).
PREPARED_FIELDS = ("kb", "train_kbs", "teacher", "search_k", "rag_k", "embedder",
                   "tokenizer_vocab", "eval_questions", "eval_seed")


def _check_manifest(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Writes workdir/prepared.json on first use; raises if it names other settings."""
  wanted = {k: config[k].to_dict() if isinstance(config[k], ml_collections.ConfigDict)
            else config[k] for k in PREPARED_FIELDS}
  wanted = json.loads(json.dumps(wanted))   # tuples -> lists, as read back
  path = workdir / "prepared.json"
  if path.exists():
    found = json.loads(path.read_text())
    changed = sorted(k for k in PREPARED_FIELDS if found.get(k) != wanted[k])
    if changed:
      raise ValueError(f"{workdir} holds data, a tokenizer and runs prepared with other "
                       f"settings ({', '.join(changed)}: {path} has "
                       f"{ {k: found.get(k) for k in changed} }); use a new --workdir")
    return
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Prepared:
  """Builds (or reuses) the index, the data files and the tokenizer in `workdir`."""
  start = time.perf_counter()
  _check_manifest(config, workdir)
  built = multihop.build_index(workdir / "index", embedder=config.embedder,
                               config=task.kb_config(**config.kb))
  data = workdir / "data"
  data.mkdir(parents=True, exist_ok=True)
  worlds = _train_worlds(config, workdir / "index", built.index)
  files = _teacher_files(config, worlds, data)
  tokenizer = _tokenizer(config, [*files.values(), pathlib.Path(built.corpus)], workdir)
  weights = {fmt: float(config.teacher[fmt]) for fmt in files}
  total = sum(weights.values())
  return Prepared(index=built.index, tokenizer=tokenizer,
                  sft_sources=tuple((str(files[f]), weights[f] / total) for f in files),
                  sft_eval=_sft_eval_file(config, built.index, data),
                  eval_prompts=_eval_files(config, built.index, data),
                  seconds=time.perf_counter() - start)


def evaluate(rl_config: ml_collections.ConfigDict, model_dir: pathlib.Path, prompts_spec: str,
             *, protocol: str, index: str, tokenizer_path: str, seed: int = 0
             ) -> dict[str, Any]:
  """Greedy held-out figures of the model in `model_dir` on `prompts_spec`, sampled with
  `protocol` ("" answers at once): accuracy (exact match), searches per answer, model
  tokens per answer and, for R-Search, the three reward components."""
  start = time.perf_counter()
  rl_config = rl_config.copy_and_resolve_references()
  rl_config.rollout.update(protocol=protocol, index=index if protocol else "")
  rollout = config_lib.section(rl_config, "rollout")
  out = eval_lib.greedy_rollouts(model_dir, prompts_lib.load_prompts(prompts_spec),
                                 rollout=rollout, tokenizer_path=tokenizer_path, seed=seed)
  samples = out.samples()
  correct = np.asarray(rewards_lib.correctness_reward("search_r1_em")(samples)) > 0.5
  result: dict[str, Any] = {
      "accuracy": float(correct.mean()),
      "searches_per_answer": float(np.mean([s.num_tool_calls for s in samples])),
      "model_tokens": float(np.mean([s.num_tokens for s in samples])),
      "answered": float(np.mean([search_rewards.final_answer(s) is not None
                                 for s in samples])),
      "questions": len(samples)}
  if protocol:
    result["search_k"] = rollout.search_k
  if protocol == "rsearch":
    for name, fn in (("dag_validity", search_rewards.dag_validity_reward()),
                     ("dag_format", search_rewards.dag_format_reward()),
                     ("answer_accuracy", search_rewards.answer_accuracy_reward())):
      result[name] = float(np.mean(fn(samples)))
  result["seconds"] = time.perf_counter() - start
  result["example"] = out.texts[0] if out.texts else ""
  return result


def _eval_spec(config: ml_collections.ConfigDict, n: int, protocol: int) -> str:
  """The held-out 2-hop prompts of the evaluated KB: the first `n` of one fixed order."""
  return (f"task:multihop?n={n}&seed={int(config.eval_seed)}&split=1&hop=2"
          + task.kb_spec_options(config.kb) + f"&protocol={protocol}")


def _sampled_as_taught(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict
                       ) -> ml_collections.ConfigDict:
  """`stage` (a GRPO stage config) with the demonstration's `search_k`: every search returns
  as many passages as the teacher's did, in the GRPO rollouts and in every arm's evaluation
  (the rollout config's own default is 3, and 3 passages overrun the Search-R1 stage's
  96-token `search_tokens`)."""
  stage = stage.copy_and_resolve_references()
  stage.rollout.search_k = config.search_k
  return stage


def _rl_stage(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict,
              sft_dir: pathlib.Path, prepared: Prepared, seed: int
              ) -> ml_collections.ConfigDict:
  """The GRPO stage from the SFT model, with the demonstration's tokenizer, index, KB and
  search_k (set here, after command-line overrides, so `--config.kb.*` reaches the RL
  prompts too); its periodic evaluation, on the first `eval_during_rl` held-out questions,
  draws the curves' accuracy (the table's figures come from `evaluate` afterwards)."""
  stage = _sampled_as_taught(config, stage)
  stage.seed = seed
  stage.init_from = str(sft_dir / EXPORT)
  stage.tokenizer = prepared.tokenizer
  stage.rollout.index = prepared.index
  number = PROTOCOL_NUMBERS[stage.rollout.protocol]
  stage.data.sources = (f"task:multihop?n=4000&seed=11&split=0&hop=2&protocol={number}"
                        + task.kb_spec_options(config.kb))
  stage.data.eval_sources = _eval_spec(
      config, min(int(config.eval_questions), int(config.eval_during_rl)), number)
  return stage


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns what results.json holds."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  total_start = time.perf_counter()
  prepared = prepare(config, workdir)
  times = demo_app.StageTimes(workdir)
  times.seconds["prepare"] = prepared.seconds
  results: dict[str, Any] = {"rows": [], "timing_s": times.seconds}

  sft = config.sft.copy_and_resolve_references()
  sft.tokenizer = prepared.tokenizer
  sft.data.sources = prepared.sft_sources
  sft.data.eval_sources = ((prepared.sft_eval, 1.0),)
  sft_dir = workdir / "sft"
  times.run("sft", trainers.run, sft, sft_dir, run_dir=sft_dir)
  sft_model = sft_dir / EXPORT

  def score(key: str, label: str, fmt: str, model_dir: pathlib.Path, seed: int,
            rl: ml_collections.ConfigDict) -> None:
    protocol = fmt if fmt in ("search_r1", "rsearch") else ""
    row = evaluate(rl, model_dir, prepared.eval_prompts[fmt], protocol=protocol,
                   index=prepared.index, tokenizer_path=prepared.tokenizer)
    results["rows"].append({"arm": key, "label": label, "seed": seed, **row})
    logging.info("%s seed %d: %s", label, seed, {k: v for k, v in row.items()
                                                 if k != "example"})

  # The SFT arms sample like the GRPO stage of their protocol (the others like Search-R1's).
  for key, label, fmt in ARMS:
    if key.startswith("grpo_") or (fmt == "rsearch" and not config.run_rsearch):
      continue
    score(key, label, fmt, sft_model, config.sft.seed, _sampled_as_taught(
        config, config.grpo_rsearch if fmt == "rsearch" else config.grpo_search_r1))

  runs = {}
  stages = [("search_r1", config.grpo_search_r1, config.seeds)]
  if config.run_rsearch:
    stages.append(("rsearch", config.grpo_rsearch, config.rsearch_seeds))
  for protocol, stage, seeds in stages:
    for seed in seeds:
      rl = _rl_stage(config, stage, sft_dir, prepared, seed)
      out = workdir / f"{protocol}_seed{seed}"
      times.run(out.name, trainers.run, rl, out, run_dir=out)
      runs[f"GRPO {protocol} seed {seed}"] = out
      key, label, _ = next(a for a in ARMS if a[0] == f"grpo_{protocol}")
      score(key, label, protocol, out / EXPORT, seed, rl)
  results["timing_s"]["total"] = time.perf_counter() - total_start
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  table = format_table(results)
  (workdir / "results.md").write_text(table + "\n")
  _plot(runs, workdir / "curves.png")
  print(table)
  return results


def _plot(runs: dict[str, pathlib.Path], out: pathlib.Path) -> None:
  """The GRPO runs' curves (reward, KL, completion length, loss) to `out`."""
  runs = {label: path for label, path in runs.items() if (path / "metrics.jsonl").exists()}
  if runs:
    plots.plot_runs(runs, out, title="search RL: GRPO from the SFT searcher (held-out "
                                     "accuracy: first questions; table: all)", smooth=5)


def _mean(rows: Sequence[dict[str, Any]], arm: str, key: str = "accuracy") -> float:
  values = [r[key] for r in rows if r["arm"] == arm and key in r]
  return float(np.mean(values)) if values else float("nan")


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table plus the gains and wall times."""
  rows = results["rows"]
  # Search calls: a Search-R1 `<search>` is one query; an R-Search block runs its DAG's nodes.
  lines = ["| arm | seed | held-out 2-hop accuracy | search calls / answer | answered | "
           "DAG validity | DAG format | answer F1 |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    extra = " | ".join(f"{r[k]:.2f}" if k in r else "" for k in
                       ("dag_validity", "dag_format", "answer_accuracy"))
    lines.append(f"| {r['label']} | {r['seed']} | {100 * r['accuracy']:.1f}% | "
                 f"{r['searches_per_answer']:.2f} | {100 * r['answered']:.0f}% | {extra} |")
  d, b, c = (_mean(rows, a) for a in ("grpo_search_r1", "rag", "sft_search_r1"))
  lines.append("")
  if not np.isnan(d):
    lines.append(f"(d) GRPO Search-R1 (mean of seeds) vs (b) RAG: {100 * (d - b):+.1f} points; "
                 f"vs (c) SFT searcher: {100 * (d - c):+.1f} points")
  e, e0 = _mean(rows, "grpo_rsearch"), _mean(rows, "sft_rsearch")
  if not np.isnan(e):
    lines.append(f"(e) GRPO R-Search (mean of seeds) vs its SFT start: {100 * (e - e0):+.1f} "
                 "points")
  lines.append("wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                             for k, v in results["timing_s"].items()))
  return "\n".join(lines)


if __name__ == "__main__":
  demo_app.run_demo(run, "configs/search_demo.py")
