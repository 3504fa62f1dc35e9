r"""APO binary: beam search over a fixed model's system prompt (rl/apo.py, arXiv 2305.03495).

  python -m wakea_jax.apo --config=configs/apo.py --workdir=/tmp/wakea_apo \
      --config.target.checkpoint=/tmp/sft/export/model
  python -m wakea_jax.apo --config=configs/apo.py:openai --workdir=DIR \
      --config.target.checkpoint=... --config.proposer.url=http://127.0.0.1:8000/v1

Writes to --workdir:
  best_prompt.txt  the best system prompt (an RL run takes it with the printed override,
                   --config.rl.system_prompt="$(cat DIR/best_prompt.txt)")
  scores.jsonl     every candidate: id, round, parent, prompt, dev score, correct, note
  table.md         the same as a table, best first, and the start and best prompts' held-out
                   scores
  summary.json     start / best prompt and scores, the beam per round, counts, timing
The summary is also printed.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from wakea_jax import config_lib, logs
from wakea_jax.rl import apo as apo_lib
from wakea_jax.rl import apo_proposers
from wakea_jax.rl import prompts as prompts_lib

FLAGS = flags.FLAGS


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", "<br>")


def table(result: apo_lib.SearchResult, held_out: dict[str, float] | None = None) -> str:
  """The score table (markdown): every candidate, best first."""
  lines = ["| rank | id | round | parent | dev score | correct | prompt | edit |",
           "|---|---|---|---|---|---|---|---|"]
  for i, c in enumerate(apo_lib.rank(result.candidates), 1):
    parent = "-" if c.parent is None else f"#{c.parent}"
    lines.append(f"| {i} | #{c.id} | {c.round} | {parent} | {c.score:.3f} | "
                 f"{c.correct}/{c.num_examples} | {_cell(c.prompt)} | {_cell(c.note)} |")
  if held_out:
    lines += ["", f"Held-out score: start prompt {held_out['start']:.3f}, best prompt "
                  f"{held_out['best']:.3f} ({held_out['examples']} examples)."]
  return "\n".join(lines) + "\n"


def _proposer_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: v for k, v in config.proposer.to_dict().items()
          if not (k == "api_key_env" and not v)}


def _prompts(spec: Any, field: str) -> list[prompts_lib.PromptRecord]:
  if not spec:
    raise ValueError(f"config.data.{field} is empty: give prompt records (a file or "
                     "task:NAME?n=..&seed=..)")
  try:
    return prompts_lib.load_prompts(spec)
  except ValueError as e:
    raise ValueError(f"config.data.{field}: {e}") from None


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Searches, scores the start and best prompts on the held-out set, writes the files ->
  the summary (summary.json)."""
  start_time = time.perf_counter()
  settings = config_lib.apo_config(config)
  proposer = apo_proposers.build_proposer(_proposer_spec(config),
                                          temperature=settings.temperature,
                                          max_tokens=settings.max_tokens)
  if not config.target.checkpoint:
    raise ValueError("config.target.checkpoint is empty: the model whose prompt is optimised")
  dev = _prompts(config.data.dev, "dev")
  held_out = _prompts(config.data.held_out, "held_out") if config.data.held_out else []
  rollout = config_lib.section(config, "rollout")
  scorer = apo_lib.TargetScorer(
      config.target.checkpoint, dev, reward=config.reward.to_dict(), rollout=rollout,
      tokenizer=config.target.tokenizer, batch_size=config.target.batch_size,
      seed=config.seed)
  result = apo_lib.search(scorer, proposer, settings)
  start, best = result.start, result.best
  held: dict[str, Any] | None = None
  if held_out:
    other = scorer.with_records(held_out)
    s, b = other([start.prompt, best.prompt])
    held = {"start": s.mean, "best": b.mean, "examples": len(held_out)}

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "best_prompt.txt").write_text(best.prompt + "\n")
  with open(workdir / "scores.jsonl", "w") as f:
    for c in result.candidates:
      f.write(json.dumps(c.row()) + "\n")
  (workdir / "table.md").write_text(table(result, held))
  best_file = (workdir / "best_prompt.txt").resolve()
  summary = {
      "start_prompt": start.prompt, "best_prompt": best.prompt, "best_id": best.id,
      "dev": {"start": start.score, "best": best.score, "examples": len(dev)},
      "held_out": held,
      "candidates": len(result.candidates),
      "beams": [list(b) for b in result.beams],
      "counts": {**result.counts, **getattr(proposer, "errors", {})},
      "proposer": {"kind": proposer.name, "model": proposer.model},
      "target": config.target.checkpoint,
      "seconds": {**result.seconds, "total": time.perf_counter() - start_time},
      # The RL run's system prompt (config.rl.system_prompt) from this search.
      "rl_override": f'--config.rl.system_prompt="$(cat {shlex.quote(str(best_file))})"',
  }
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "configs/apo.py", "The APO config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where best_prompt.txt, the scores and the summary go.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  """Runs the search and prints its summary."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  print(json.dumps(run(FLAGS.config, FLAGS.workdir), indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
