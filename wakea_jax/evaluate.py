r"""Held-out evaluation binary: greedy accuracy and pass@k of a model on verifiable prompts.

  python -m wakea_jax.evaluate --config=configs/grpo.py:arithmetic \
      --checkpoint=/tmp/grpo/export/model [--config.data.eval_sources=task:...] \
      [--config.eval.num_samples=16 --config.eval.pass_k='(1,4,16)'] [--output=result.json]

The prompts, rollout settings (tools, max_new_tokens), the correctness reward and the
sampling settings for pass@k come from the same config an RL run uses, so a number printed
here is the number the run's periodic evaluation reports. `--checkpoint` is a wakea_jax
model directory (an export), a run workdir or a Hugging Face directory.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from wakea_jax import config_lib, logs
from wakea_jax.data.config import pooled_specs
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import prompts as prompts_lib

FLAGS = flags.FLAGS


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | pathlib.Path
             ) -> dict[str, Any]:
  """Evaluates the model in `checkpoint` on `config.data.eval_sources`."""
  data = config_lib.section(config, "data")
  if not data.eval_sources:
    raise ValueError("config.data.eval_sources is empty: nothing to evaluate on")
  prompts = prompts_lib.load_prompts(pooled_specs(data.eval_sources, "eval_sources"))
  result = eval_lib.evaluate_checkpoint(
      checkpoint, prompts, rollout=config_lib.section(config, "rollout"),
      config=config_lib.section(config, "eval"), tokenizer_path=config.get("tokenizer", ""),
      seed=config.get("seed", 0))
  result["checkpoint"] = str(checkpoint)
  result["prompts"] = [spec for spec, _ in data.eval_sources]
  return result


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "An RL config, e.g. configs/grpo.py:arithmetic.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Model directory (export, run workdir or HF).")
  flags.DEFINE_string("output", None, "Also write the result as JSON here.")
  flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv: Sequence[str]) -> None:
  """Prints (and optionally writes) the evaluation of --checkpoint."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  result = evaluate(FLAGS.config, FLAGS.checkpoint)
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.output:
    pathlib.Path(FLAGS.output).write_text(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
