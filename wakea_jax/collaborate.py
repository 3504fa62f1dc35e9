r"""The three-model collaboration binary: verified expert trajectories with provenance.

  python -m wakea_jax.collaborate --config=configs/collaborate.py --workdir=/tmp/wakea_collab
  python -m wakea_jax.collaborate --config=configs/collaborate.py:openai+judge \
      --config.teacher.url=http://127.0.0.1:8000/v1 --config.judge.url=... --workdir=DIR

Writes --workdir/trajectories.jsonl (accepted), rejected.jsonl and summary.json (see
rl/collaboration.py); a re-run skips the problems already accepted there. The summary is
also printed.
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
from wakea_jax.rl import collaboration
from wakea_jax.rl.judge import LLMJudge

FLAGS = flags.FLAGS


def settings(config: ml_collections.ConfigDict) -> collaboration.CollaborationConfig:
  """config.collaboration (and config.seed) as the library's frozen dataclass."""
  return config_lib.collaboration_config(config)


def judge_from(config: ml_collections.ConfigDict) -> LLMJudge | None:
  """The judge of config.judge, or None when its url is empty."""
  judge = config_lib.judge_config(config)
  return LLMJudge(judge) if judge is not None else None


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Generates, verifies and writes the trajectories -> the summary (summary.json)."""
  teacher = {k: v for k, v in config.teacher.to_dict().items()
             if not (k == "api_key_env" and not v)}
  collab, problems = collaboration.build(settings(config), teacher=teacher,
                                         judge=judge_from(config))
  return collab.run(problems, workdir)


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", "configs/collaborate.py", "The collaboration config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the trajectories and the summary go.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  """Runs the collaboration and prints its summary."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  print(json.dumps(run(FLAGS.config, FLAGS.workdir), indent=2, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
