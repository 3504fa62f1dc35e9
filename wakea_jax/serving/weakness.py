"""Weakness detection and targeted data: the registry's offline self-learning loop.

  evaluate per category (serving/tracking.py) -> find_weaknesses (below a threshold, or
  regressed against the parent version) -> targeted_data (more examples of exactly those
  categories, from the bundled task generators) -> follow_up_command (the same RL or SFT
  config, started from this version, trained on that file) -> register the result with
  parent = this version.

Targeted examples are drawn from the generator with the options the evaluation's prompts
were made with (a weak cell of `task:arithmetic?max_operand=99&tools=0` gets more
`max_operand=99&tools=0` questions), keeping only those whose label is the weak category
and difficulty: more of the same distribution, restricted to where the model is weak. Their
seeds start at TARGETED_SEED_BASE, far from the seeds configs use for held-out prompts
(hundreds), so the follow-up run does not train on the questions it will be evaluated on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from wakea_jax.data.tasks import PROMPT_TASKS, TASK_LABELS, TASKS
from wakea_jax.serving.registry import atomic_write_text
from wakea_jax.serving.results import eval_rows, row_key

TARGETED_SEED_BASE = 1_000_000
KINDS = ("prompts", "sft")   # RL prompt records (data.sources of an RL config) or SFT dialogues


@dataclasses.dataclass(frozen=True)
class Weakness:
  """An evaluation row that is below the threshold and/or regressed against the parent."""

  task: str
  category: str
  difficulty: str
  accuracy: float
  n: int
  reasons: tuple[str, ...]            # "below_threshold", "regressed"
  parent_accuracy: float | None = None
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> str:
    """"task/category/difficulty"."""
    return row_key(dataclasses.asdict(self))

  def describe(self, threshold: float, margin: float) -> str:
    """One line saying why this is a weakness."""
    why = []
    if "below_threshold" in self.reasons:
      why.append(f"accuracy {self.accuracy:.3f} < threshold {threshold:.3f}")
    if "regressed" in self.reasons:
      why.append(f"regressed from {self.parent_accuracy:.3f} by "
                 f"{self.parent_accuracy - self.accuracy:.3f} (> margin {margin:.3f})")
    return f"{self.key} (n={self.n}): " + "; ".join(why)


def find_weaknesses(version_results: Any, parent_results: Any = None, threshold: float = 0.5,
                    regression_margin: float = 0.05, *, min_n: int = 1) -> list[Weakness]:
  """Rows of `version_results` (a list of eval rows, or a recorded evaluation {"rows": ...})
  whose accuracy is below `threshold`, or below the parent's same row by more than
  `regression_margin`; rows with fewer than `min_n` examples are skipped (a cell of three
  prompts says little). Sorted weakest first."""
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  if regression_margin < 0:
    raise ValueError(f"regression_margin must be >= 0, got {regression_margin}")
  rows = eval_rows(version_results, "find_weaknesses: version results")
  parent = ({row_key(r): r for r in eval_rows(parent_results, "find_weaknesses: parent results")}
            if parent_results else {})
  out = []
  for row in rows:
    if row["n"] < min_n:
      continue
    reasons = []
    if row["accuracy"] < threshold:
      reasons.append("below_threshold")
    before = parent.get(row_key(row))
    if before is not None and before["accuracy"] - row["accuracy"] > regression_margin:
      reasons.append("regressed")
    if reasons:
      out.append(Weakness(task=row["task"], category=row["category"],
                          difficulty=row["difficulty"], accuracy=row["accuracy"], n=row["n"],
                          reasons=tuple(reasons),
                          parent_accuracy=None if before is None else before["accuracy"],
                          options=dict(row.get("options") or {})))
  return sorted(out, key=lambda w: (w.accuracy, w.key))


def _draw(weakness: Weakness, n: int, stream: int, kind: str, options: Mapping[str, Any],
          max_draws: int) -> list[dict[str, Any]]:
  """`n` records of the weak cell: generator output filtered by label, in chunks."""
  generators = PROMPT_TASKS if kind == "prompts" else TASKS
  task = weakness.task
  if task not in generators or task not in TASK_LABELS:
    labelled = sorted(set(generators) & set(TASK_LABELS))
    raise ValueError(f"weakness {weakness.key}: no labelled {kind} generator for task {task!r} "
                     f"(labelled tasks: {', '.join(labelled) or 'none'})")
  out: list[dict[str, Any]] = []
  chunk = max(64, 4 * n)
  # Each stream owns seeds [base + stream * 10_000, +10_000): no two batches share a chunk.
  for attempt in range(min(10_000, max(1, max_draws // chunk))):
    chunk_seed = TARGETED_SEED_BASE + stream * 10_000 + attempt
    records = generators[task](chunk, chunk_seed, **options)
    for record, label in zip(records, TASK_LABELS[task](chunk, chunk_seed, **options)):
      if label["category"] == weakness.category and weakness.difficulty in (
          "all", label["difficulty"]):
        out.append({**record, "task": task, **label})
        if len(out) == n:
          return out
  raise ValueError(f"weakness {weakness.key}: only {len(out)} of {n} examples in {max_draws} "
                   f"draws of {task} with options {dict(options)} (is that difficulty "
                   "reachable with these options?)")


def targeted_data(weaknesses: Sequence[Weakness], out_path: str | os.PathLike[str],
                  n_per_category: int = 64, seed: int = 0, *, kind: str = "prompts",
                  options: Mapping[str, Any] | None = None, max_draws: int = 100_000
                  ) -> dict[str, Any]:
  """Writes `n_per_category` records per weakness to `out_path` (JSONL, atomically): RL prompt
  records (`kind="prompts"`: {"messages", "answer"}) or SFT dialogues (`kind="sft"`:
  {"messages"}), each with its "task", "category" and "difficulty" (RL keeps them as prompt
  metadata, so evaluating on the file breaks down by category too; SFT ignores them).

  One batch per weakness: a weak category ("all" difficulties) and a weak cell of it each get
  theirs, so the cell is drawn more often. Generator options are the evaluation's
  (`Weakness.options`) unless `options` is given.
  Returns {"path", "kind", "records", "counts": {weakness key: n}}.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if n_per_category < 1:
    raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
  if not weaknesses:
    raise ValueError("no weaknesses given: nothing to target")
  records, counts = [], {}
  unique = {w.key: w for w in reversed(weaknesses)}   # one batch per cell, first kept
  for i, weakness in enumerate(w for w in weaknesses if unique.get(w.key) is w):
    chosen = dict(weakness.options if options is None else options)
    drawn = _draw(weakness, n_per_category, seed * 1000 + i, kind, chosen, max_draws)
    records += drawn
    counts[weakness.key] = len(drawn)
  path = pathlib.Path(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  return {"path": str(path), "kind": kind, "records": len(records), "counts": counts}


def follow_up_command(config: str, data_path: str | os.PathLike[str], *, init_from: str,
                      workdir: str, kind: str = "prompts", overrides: Sequence[str] = (),
                      python: str = sys.executable) -> list[str]:
  """The training command of the follow-up run: `config` (an RL config for prompts, an SFT
  one for dialogues, e.g. configs/grpo.py:arithmetic) started from `init_from` (the weak
  version's checkpoint) and trained on `data_path` only; `overrides` ("train.steps=50", ...)
  are appended as --config.KEY=VALUE."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  data_path = str(pathlib.Path(data_path).absolute())
  # RL configs take a spec string; SFT configs a tuple of (spec, weight) pairs, which
  # ml_collections parses from its Python literal.
  sources = data_path if kind == "prompts" else repr(((data_path, 1.0),))
  return [python, "-m", "wakea_jax.train", f"--config={config}", f"--workdir={workdir}",
          f"--config.init_from={init_from}", f"--config.data.sources={sources}",
          *(f"--config.{override}" for override in overrides)]


def start_follow_up(command: Sequence[str], **run_kwargs: Any) -> subprocess.CompletedProcess:
  """Runs the follow-up command to completion (raises CalledProcessError if it fails)."""
  return subprocess.run(list(command), check=True, **run_kwargs)


def shell_line(command: Sequence[str]) -> str:
  """The command quoted for a shell, to print."""
  return " ".join(shlex.quote(part) for part in command)
