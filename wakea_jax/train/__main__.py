r"""Training binary.

  python -m wakea_jax.train --config=configs/sft.py:quickstart --workdir=/tmp/wakea_quickstart
  python -m wakea_jax.train --config=configs/grpo.py:arithmetic --workdir=/tmp/grpo \
      --config.init_from=/tmp/sft/export/model

`config.objective` picks the trainer (sft, dpo, grpo, ppo, srl; see wakea_jax/trainers.py).
Running the same command again resumes from the latest checkpoint in --workdir. This file
is the `python -m wakea_jax.train` entry because wakea_jax/train/ is a package; it is a
binary, above every layer (setup.cfg's import contract says so).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from wakea_jax import logs, trainers
from wakea_jax.parallel import distributed

FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/sft.py:quickstart.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  """Trains per --config in --workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  distributed.initialize()
  logs.quiet_other_processes(jax.process_index())  # one log, process 0's
  config = FLAGS.config
  try:
    trainer = trainers.trainer_for(config.get("objective", "sft"))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  trainer(config, FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
