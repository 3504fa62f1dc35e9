"""The command line every learning demonstration shares (`python -m wakea_jax.<name>_demo`).

`run_demo(run, default_config)` defines `--config` (an ml_collections config file, default
`default_config`, overridable with `--config.a.b=value`) and the required `--workdir`,
quietens the libraries' logs and calls `run(config, workdir)`: each demonstration is an
importable `run` plus this one line under `if __name__ == "__main__"`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from wakea_jax import logs


def run_demo(run: Callable[[Any, str], Any], default_config: str) -> None:
  """Parses the flags and runs `run(config, workdir)` as an absl app."""
  config_flags.DEFINE_config_file("config", default_config, "The demonstration config.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where every stage writes.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_library_logs()
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)


__all__ = ["run_demo"]
