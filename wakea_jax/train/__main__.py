r"""Training binary.

  python -m wakea_jax.train --config=configs/sft.py:quickstart --workdir=/tmp/wakea_quickstart
  python -m wakea_jax.train --config=configs/grpo.py:arithmetic --workdir=/tmp/grpo \
      --config.init_from=/tmp/sft/export/model

`config.objective` picks the trainer (sft, dpo, grpo, ppo). Running the same command again
resumes from the latest checkpoint in --workdir. (`wakea_jax/train/` is a package, so this
file is the `python -m wakea_jax.train` entry; flags are defined only when it runs as the
binary, so importing `runner_for` defines none.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

# config.objective -> "module:function" of the `run(config, workdir)` that trains it.
# Imported lazily so that one objective's dependencies never load for another.
OBJECTIVES = {
    "sft": "wakea_jax.train.run:run",
    "dpo": "wakea_jax.train.preference:run",
    "grpo": "wakea_jax.rl.learner:run",
    "ppo": "wakea_jax.rl.learner:run",
}


def runner_for(objective: str) -> Callable[..., Any]:
  if objective not in OBJECTIVES:
    raise ValueError(f"config.objective={objective!r} is not one of {sorted(OBJECTIVES)}")
  module, name = OBJECTIVES[objective].split(":")
  return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  from wakea_jax import logs
  from wakea_jax.parallel import distributed

  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/sft.py:quickstart.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required")
    logs.quiet_library_logs()
    distributed.initialize()
    config = _CONFIG.value
    try:
      runner = runner_for(config.get("objective", "sft"))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    runner(config, _WORKDIR.value)

  flags.mark_flags_as_required(["config"])
  app.run(main)
