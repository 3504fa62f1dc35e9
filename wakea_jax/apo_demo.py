r"""The APO learning demonstration (issue 17): does the prompt search raise a fixed model's
accuracy over its starting prompt, on held-out prompts too?

  python -m wakea_jax.apo_demo --config=configs/apo_demo.py --workdir=/tmp/wakea_apo

Stages, each in its own sub-directory of --workdir (a re-run skips finished ones):
  sft/         the target: SFT from scratch on arithmetic dialogues whose system prompts hold
               a random mix of instructions, the answers following them (`dialogues`): with
               "Put the final answer in <answer></answer> tags." the answer is tagged, with
               "Show your work step by step." the work is shown, other sentences change
               nothing. The model is fixed after this stage.
  apo_seedS/   APO (python -m wakea_jax.apo) from a generic start prompt, one search per
               seed, with the rule-based proposer and the reward that counts only a tagged,
               exact answer
The start and best prompts are scored on the dev prompts and on held-out prompts no stage
has seen; the table goes to stdout, results.md and results.json.

What it shows and what it does not: the target follows two instructions of the rule
proposer's library because it was trained on them (a small model follows no instruction it
has not seen), so the demonstration checks the search, not the proposer's insight: starting
from a prompt under which every answer fails, the failures' categories must lead the search
to the instructions that help, and the scoring must keep them and reject the ones that do
nothing or hurt.
"""

from __future__ import annotations

import json
import pathlib
import random
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging

from wakea_jax import apo, demo_app, trainers
from wakea_jax.checkpoints import loader
from wakea_jax.data import sources
from wakea_jax.data.tasks import arithmetic
from wakea_jax.rl.apo_proposers import RULES

EXPORT = loader.RUN_EXPORT

TAGS = RULES["missing_answer_tags"][0]
WORK = RULES["wrong_answer"][0]
# Sentences the target sees in its system prompts that change nothing.
NEUTRAL = ("You are a helpful assistant.", "You are a friendly math tutor.",
           "Answer the user's question.", "Be accurate.", "Reply in English.")


def dialogues(n: int, seed: int, *, max_operand: int = 99, instructed: float = 0.5
              ) -> list[dict[str, Any]]:
  """SFT dialogues {"messages": [system?, user, assistant]}: each of TAGS and WORK is in the
  system prompt with probability `instructed`, with 0-2 NEUTRAL sentences, shuffled (no
  system message when none is drawn); the answer shows the work (arithmetic.worked_answer)
  under WORK and wraps the result in <answer> tags under TAGS."""
  rng = random.Random(f"apo-demo-{seed}-{max_operand}")
  out = []
  for _ in range(n):
    a, op, b = arithmetic.expression(rng, max_operand)
    result = arithmetic.evaluate(f"{a}{op}{b}")
    expr = f"{a} {op} {b}" if rng.random() < 0.5 else f"{a}{op}{b}"
    # Spoken operators in a quarter of the questions, as the bundled arithmetic prompts.
    spoken = (f"{a} {rng.choice(arithmetic._WORDS[op])} {b}" if rng.random() < 0.25
              else expr)
    question = rng.choice(arithmetic._QUESTIONS).format(q=spoken)
    tags, work = rng.random() < instructed, rng.random() < instructed
    sentences = [s for s, on in ((TAGS, tags), (WORK, work)) if on]
    sentences += rng.sample(NEUTRAL, rng.randint(0, 2))
    rng.shuffle(sentences)
    messages = [{"role": "system", "content": " ".join(sentences)}] if sentences else []
    if work:
      answer = arithmetic.worked_answer(a, op, b)   # "... = 132. The answer is 132."
      if tags:
        answer = answer[:answer.rindex(" The answer is")] + f" <answer>{result}</answer>"
    else:
      answer = f"<answer>{result}</answer>" if tags else f"The answer is {result}."
    messages += [{"role": "user", "content": question},
                 {"role": "assistant", "content": answer}]
    out.append({"messages": messages})
  return out


def _sft(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """Trains the target (skipped when its export exists) -> the model directory."""
  out = workdir / "sft"
  if (out / EXPORT).exists():
    return out / EXPORT
  files = {}
  for name, n, seed in (("train", config.data.train_examples, 0),
                        ("eval", config.data.eval_examples, 1)):
    files[name] = workdir / f"sft_{name}.jsonl"
    sources.write_jsonl(dialogues(n, seed, max_operand=config.data.max_operand,
                                  instructed=config.data.instructed), files[name])
  sft = config.sft.copy_and_resolve_references()
  with sft.unlocked():
    sft.data.sources = ((str(files["train"]), 1.0),)
    sft.data.eval_sources = ((str(files["eval"]), 1.0),)
  trainers.run(sft, out)
  return out / EXPORT


def results_table(rows: Sequence[dict[str, Any]]) -> str:
  """The markdown table of results.md."""
  lines = ["| seed | prompt | dev accuracy | held-out accuracy |", "|---|---|---|---|"]
  for row in rows:
    for which in ("start", "best"):
      text = row[f"{which}_prompt"].replace("|", "\\|")
      lines.append(f"| {row['seed']} | {which}: {text} | {row['dev'][which]:.1%} | "
                   f"{row['held_out'][which]:.1%} |")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs (or resumes) every stage in `workdir`; returns what results.json holds."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  model = _sft(config, workdir)
  timing = {"sft": time.perf_counter() - start}
  rows = []
  for seed in config.seeds:
    search = config.apo.copy_and_resolve_references()
    with search.unlocked():
      search.seed = seed
      search.target.checkpoint = str(model)
    began = time.perf_counter()
    summary = apo.run(search, workdir / f"apo_seed{seed}")
    timing[f"apo_seed{seed}"] = time.perf_counter() - began
    rows.append({"seed": seed, **{k: summary[k] for k in (
        "start_prompt", "best_prompt", "dev", "held_out", "candidates", "counts")}})
    logging.info("APO seed %d: dev %.3f -> %.3f, held-out %.3f -> %.3f", seed,
                 summary["dev"]["start"], summary["dev"]["best"],
                 summary["held_out"]["start"], summary["held_out"]["best"])
  timing["total"] = time.perf_counter() - start
  results = {"rows": rows, "timing_s": timing, "target": str(model)}
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (workdir / "results.md").write_text(results_table(rows))
  return results


def _run_and_print(config: ml_collections.ConfigDict, workdir: str) -> None:
  results = run(config, workdir)
  print(results_table(results["rows"]))
  print(json.dumps(results["timing_s"], indent=2))


if __name__ == "__main__":
  demo_app.run_demo(_run_and_print, "configs/apo_demo.py")
