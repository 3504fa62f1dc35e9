r"""Greedy scoring benchmark: `rl.evaluation.greedy_rollouts` in calls of several sizes.

  python tools/bench_scoring.py --model=WORKDIR/base/export/model \
      --tokenizer=WORKDIR/tokenizer.model [--prompts=SPEC --batch_prompts=16,64,1024]

What the SRL demonstration does with each of its models: one greedy completion per held-out
question (default: its 1,024 hard equations, `srl_demo.specs`, with the demo's RLVR rollout
settings, 192 new tokens). The reference, measured in the same run, is one call of every
prompt (what `greedy_rollouts` did before it took `batch_prompts`); every call size must give
the same completions. Each size runs twice and the second (compiled) run is timed. Prints
lscpu's model name: CPU figures differ by machine.
"""

from __future__ import annotations

import time

from absl import app, flags
from machine import cpu_model

_MODEL = flags.DEFINE_string("model", None, "Model directory (an export's model/).",
                             required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer (default: the model's).")
_PROMPTS = flags.DEFINE_string("prompts", "", "Prompt spec (default: the SRL demo's held-out "
                               "hard equations).")
_SIZES = flags.DEFINE_list("batch_prompts", ["16", "64"], "Prompts per sampler call.")


def main(argv):
  del argv
  import dataclasses
  import pathlib

  import numpy as np

  from wakea_jax import config_files, config_lib, srl_demo
  from wakea_jax.rl import evaluation
  from wakea_jax.rl import prompts as prompts_lib

  config = config_files.get_config(
      str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "srl_demo.py"))
  prompts = prompts_lib.load_prompts(_PROMPTS.value or srl_demo.specs(config)["eval"])
  rollout = dataclasses.replace(config_lib.section(config.rlvr, "rollout"), group_size=1)
  print(f"cpu: {cpu_model()}; {len(prompts)} prompts, max_new_tokens {rollout.max_new_tokens}")
  reference = None
  for size in [len(prompts)] + [int(s) for s in _SIZES.value]:
    for _ in range(2):
      start = time.perf_counter()
      out = evaluation.greedy_rollouts(_MODEL.value, prompts, rollout=rollout,
                                       tokenizer_path=_TOKENIZER.value, batch_prompts=size,
                                       dtype=config.rlvr.model.dtype)
      seconds = time.perf_counter() - start
    lengths = [len(c) for c in out.completion_ids]
    label = "one call (the reference)" if reference is None else f"calls of {size}"
    if reference is None:
      reference = (out.completion_ids, seconds)
      same = ""
    else:
      equal = sum(a == b for a, b in zip(out.completion_ids, reference[0]))
      same = (f", {reference[1] / seconds:.2f}x the reference, same completions "
              f"{equal}/{len(lengths)}")
    print(f"{label:26s} {seconds:7.2f} s, mean length {np.mean(lengths):.1f}, "
          f"longest {max(lengths)}{same}")


if __name__ == "__main__":
  app.run(main)
