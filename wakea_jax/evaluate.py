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

import jax
from absl import app, flags
from ml_collections import config_flags

from wakea_jax import logs, trainers
from wakea_jax.parallel import distributed

FLAGS = flags.FLAGS


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
  distributed.initialize()   # every host runs this command; each evaluates its share
  logs.quiet_other_processes(jax.process_index())
  result = trainers.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint)
  if jax.process_index() != 0:
    return
  text = json.dumps(result, indent=2)
  print(text)
  if FLAGS.output:
    pathlib.Path(FLAGS.output).write_text(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
