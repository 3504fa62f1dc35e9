"""Performance tracking: held-out accuracy broken down by task category and difficulty.

The evaluation is the RL evaluation's own (`rl.evaluation.sample_and_check`: the same
sampler, rollout settings, tools and correctness reward as `python -m wakea_jax.evaluate`),
run once over all prompts with greedy decoding; the per-prompt correctness is then grouped by
each prompt's label. So the overall accuracy here equals the evaluate binary's
`greedy_accuracy` on the same config, and the categories add up to it.

A prompt's label ({"task", "category", "difficulty"}) comes from, in order:
  * its own fields: a prompt record carrying "category" (and "difficulty", "task") keeps them
    in `PromptRecord.meta` (the targeted data `serving.weakness.targeted_data` writes does);
  * the bundled generator that made it: a `task:NAME?..` prompt's origin names its spec and
    index, and `data.tasks.TASK_LABELS[NAME]` labels the same records (arithmetic: the
    operator is the category, the larger operand's digits the difficulty);
  * otherwise {"category": "unlabelled", "difficulty": "all"}.

Rows are per (task, category, difficulty) cell plus one per (task, category) over all its
difficulties (difficulty "all"), so a weakness can be spotted at either grain. Single
process: unlike `python -m wakea_jax.evaluate` this does not split prompts across hosts.
"""

from __future__ import annotations

import collections
import functools
import pathlib
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from wakea_jax import config_lib
from wakea_jax.checkpoints import loader
from wakea_jax.data import chat, sources
from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.config import pooled_specs
from wakea_jax.data.tasks import PROMPT_TASKS, TASK_LABELS
from wakea_jax.data.tokenizer import chat_pad_id, tokenizer_from
from wakea_jax.rl import evaluation
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl.rewards import correctness_reward
from wakea_jax.rl.rollout import router_for
from wakea_jax.sampling.sampler import chat_sampler, check_vocab
from wakea_jax.sampling.tool_loop import run_tool_loop
from wakea_jax.toolbox.registry import default_router

UNLABELLED = {"task": "", "category": "unlabelled", "difficulty": "all"}


@functools.lru_cache(maxsize=32)
def _spec_labels(spec: str) -> tuple[tuple[dict[str, str], ...], dict[str, int]]:
  """(labels of every record of the task spec, its generator options)."""
  name, n, seed, options = sources.parse_task_spec(spec, tasks=PROMPT_TASKS)
  if name not in TASK_LABELS:
    return (), options
  return tuple({"task": name, **label} for label in TASK_LABELS[name](n, seed, **options)), options


def prompt_label(prompt: prompts_lib.PromptRecord) -> dict[str, Any]:
  """{"task", "category", "difficulty"} of one prompt (see the module docstring), plus the
  generator "options" when the prompt came from a task spec."""
  meta = prompt.meta or {}
  if "category" in meta:
    return {"task": str(meta.get("task", "")), "category": str(meta["category"]),
            "difficulty": str(meta.get("difficulty", "all")),
            **({"options": dict(meta["options"])} if isinstance(meta.get("options"), Mapping)
               else {})}
  spec, _, index = prompt.origin.rpartition("[")
  if spec.startswith(sources.TASK_PREFIX) and index.rstrip("]").isdigit():
    labels, options = _spec_labels(spec)
    i = int(index.rstrip("]"))
    if i < len(labels):
      return {**labels[i], "options": options}
  return dict(UNLABELLED)


def breakdown(correct: Sequence[float], labels: Sequence[Mapping[str, Any]]
              ) -> dict[str, Any]:
  """Per-prompt correctness [num_prompts] and labels -> {"overall": {accuracy, n}, "rows":
  [{task, category, difficulty, accuracy, n, options?}]}, rows sorted by their key."""
  if len(correct) != len(labels):
    raise ValueError(f"{len(correct)} correctness values for {len(labels)} labels")
  groups: dict[tuple[str, str, str], list[float]] = collections.defaultdict(list)
  options: dict[tuple[str, str, str], Any] = {}
  for value, label in zip(correct, labels):
    cell = (label["task"], label["category"], label["difficulty"])
    for key in {cell, (cell[0], cell[1], "all")}:
      groups[key].append(float(value))
      if "options" in label:
        options.setdefault(key, label["options"])   # the first spec's, if several
  rows = []
  for key in sorted(groups):
    values = groups[key]
    row = {"task": key[0], "category": key[1], "difficulty": key[2],
           "accuracy": float(np.mean(values)), "n": len(values)}
    if key in options:
      row["options"] = dict(options[key])
    rows.append(row)
  overall = {"accuracy": float(np.mean(correct)) if len(correct) else 0.0, "n": len(correct)}
  return {"overall": overall, "rows": rows}


def evaluate_by_category(graphdef: nnx.GraphDef, params: nnx.State,
                         prompts: Sequence[prompts_lib.PromptRecord], *, tokenizer: Any,
                         rollout: Any, correct: evaluation.CorrectFn, router: Any = None,
                         stop_ids: tuple[int, ...] = (), pad_id: int = 0, seed: int = 0,
                         model_config: Any = None, batch_prompts: int = 64) -> dict[str, Any]:
  """Greedy correctness of every prompt (the RL evaluation's sampler and reward), broken down
  by label: `breakdown`'s result."""
  sampler = chat_sampler(graphdef, model_config, tokenizer, temperature=0.0, stop_ids=stop_ids,
                         pad_id=pad_id)
  ok, _ = evaluation.sample_and_check(
      sampler, params, prompts, 1, tokenizer=tokenizer, rollout=rollout, correct=correct,
      router=router, rng=jax.random.key(seed), batch_prompts=batch_prompts)
  return breakdown(ok[:, 0].tolist(), [prompt_label(p) for p in prompts])


def evaluate_checkpoint_by_category(config: ml_collections.ConfigDict,
                                    checkpoint: str | pathlib.Path) -> dict[str, Any]:
  """`evaluate_by_category` of the model at `checkpoint` on an RL config's eval prompts,
  rollout settings and correctness reward (as `trainers.evaluate_checkpoint` reads them)."""
  data = config_lib.section(config, "data")
  if not data.eval_sources:
    raise ValueError("config.data.eval_sources is empty: nothing to evaluate on")
  specs = pooled_specs(data.eval_sources, "eval_sources")
  prompts = prompts_lib.load_prompts(specs)
  rollout = config_lib.section(config, "rollout")
  eval_config = config_lib.section(config, "eval")
  model = loader.load_model(checkpoint)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(config.get("tokenizer", "") or loader.tokenizer_path(checkpoint))
  check_vocab(tokenizer, model.config, model_source=f"the checkpoint {checkpoint}")
  result = evaluate_by_category(
      graphdef, params, prompts, tokenizer=tokenizer, rollout=rollout,
      correct=correctness_reward(eval_config.correct_reward), router=router_for(rollout),
      stop_ids=chat_stop_ids(tokenizer), pad_id=chat_pad_id(tokenizer),
      seed=config.get("seed", 0), model_config=model.config,
      batch_prompts=eval_config.batch_prompts)
  return {**result, "checkpoint": str(checkpoint), "sources": specs,
          "correct_reward": eval_config.correct_reward}


def _peak_memory_mb() -> tuple[float, str]:
  """(peak memory in MB, what it measures): the device's peak bytes in use where the backend
  reports it (GPU, TPU), else this process's peak resident set (CPU: the model lives there)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def measure_sampling(checkpoint: str | pathlib.Path, prompts: Sequence[str], *,
                     max_new_tokens: int = 32, tokenizer_path: str = "", seed: int = 0
                     ) -> dict[str, Any]:
  """Serving figures of the model at `checkpoint` measured without a server, for comparing
  versions on one machine: every prompt sampled alone (batch 1, greedy, no tools), twice,
  the first pass compiling and the second timed; p50 / p95 of the per-request latency,
  generated tokens per second over the timed pass, and peak memory (`_peak_memory_mb`).
  The server's load test (tools/bench_serve.py) measures the figures under concurrency;
  record whichever the role's selection should weigh (the "method" field says which)."""
  if not prompts:
    raise ValueError("measure_sampling: no prompts given")
  model = loader.load_model(checkpoint)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
  sampler = chat_sampler(graphdef, model.config, tokenizer, temperature=0.0,
                         model_source=f"the checkpoint {checkpoint}")
  router = default_router(enabled=())
  ids = [chat.render([{"role": "user", "content": p}], tokenizer,
                     add_generation_prompt=True).input_ids.tolist() for p in prompts]
  latencies, generated = [], 0
  for timed in (False, True):
    for i, prompt_ids in enumerate(ids):
      start = time.perf_counter()
      out = run_tool_loop(sampler, params, [prompt_ids], tokenizer=tokenizer, router=router,
                          rng=jax.random.key(seed + i), max_new_tokens=max_new_tokens,
                          max_tool_calls=0)
      if timed:
        latencies.append(time.perf_counter() - start)
        generated += len(out.tokens[0])
  peak, what = _peak_memory_mb()
  ms = np.asarray(latencies) * 1000
  return {"p50_latency_ms": float(np.percentile(ms, 50)),
          "p95_latency_ms": float(np.percentile(ms, 95)),
          "tokens_per_s": generated / float(np.sum(latencies)), "peak_memory_mb": peak,
          "requests": len(latencies), "max_new_tokens": max_new_tokens,
          "method": f"sequential batch-1 greedy sampling, no server; memory: {what}",
          "machine": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"}
