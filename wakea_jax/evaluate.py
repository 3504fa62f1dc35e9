r"""Held-out evaluation binary: greedy accuracy and pass@k of a model on verifiable prompts.

  python -m wakea_jax.evaluate --config=configs/grpo.py:arithmetic \
      --checkpoint=/tmp/grpo/export/model [--config.data.eval_prompts=task:...] \
      [--config.eval.num_samples=16 --config.eval.pass_k='(1,4,16)'] [--output=result.json]

The prompts, rollout settings (tools, max_new_tokens), the correctness reward and the
sampling settings for pass@k come from the same config an RL run uses, so a number printed
here is the number the run's periodic evaluation reports. `--checkpoint` is a wakea_jax
model directory (an export) or a Hugging Face directory.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import nnx

from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import learner as learner_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.train import run as run_lib


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | pathlib.Path
             ) -> dict[str, Any]:
  """Evaluates the model in `checkpoint` on `config.data.eval_prompts`."""
  if not config.data.eval_prompts:
    raise ValueError("config.data.eval_prompts is empty: nothing to evaluate on")
  model = run_lib.load_pretrained(checkpoint)
  graphdef, params = nnx.split(model)
  tokenizer = (tokenizer_lib.load_tokenizer(config.tokenizer) if config.tokenizer
               else tokenizer_lib.default_tokenizer())
  stop_ids, pad_id = learner_lib.sampling_ids(tokenizer)
  result = eval_lib.evaluate_policy(
      graphdef, params, prompts_lib.load_prompts(config.data.eval_prompts),
      tokenizer=tokenizer, rollout=learner_lib.rollout_config_from(config),
      correct=learner_lib.correctness_fn(config), config=learner_lib.eval_config_from(config),
      router=learner_lib.router_from(config), stop_ids=stop_ids, pad_id=pad_id,
      seed=config.seed, model_config=model.config)
  result["checkpoint"] = str(checkpoint)
  result["prompts"] = config.data.eval_prompts
  return result


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from wakea_jax import logs

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "An RL config, e.g. configs/grpo.py:arithmetic.", lock_config=True)
  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (export or HF).")
  _OUTPUT = flags.DEFINE_string("output", None, "Also write the result as JSON here.")

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    result = evaluate(_CONFIG.value, _CHECKPOINT.value)
    text = json.dumps(result, indent=2)
    print(text)
    if _OUTPUT.value:
      pathlib.Path(_OUTPUT.value).write_text(text + "\n")

  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
