"""Log hygiene for the binaries: keep our lines, drop libraries' per-operation INFO chatter.

orbax logs a dozen INFO lines per checkpoint (renames, throughput, thread hand-offs) through
absl; they bury the training progress. Warnings and errors from every library still pass.

Multi-host: every process runs the same program, so every INFO line (metrics, data stats,
checkpoints) would appear once per process; `quiet_other_processes` keeps processes other
than 0 to warnings and errors.
"""

from __future__ import annotations

import logging

_NOISY = ("/orbax/", "/grain/", "/jax/_src/")


class _DropLibraryInfo(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(part in record.pathname for part in _NOISY)


def quiet_library_logs() -> None:
  """Installs the filter on the absl handler and the root logger's handlers (idempotent)."""
  from absl import logging as absl_logging  # noqa: PLC0415
  handlers = [absl_logging.get_absl_handler(), *logging.getLogger().handlers]
  for handler in handlers:
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
      handler.addFilter(_DropLibraryInfo())


def quiet_other_processes(process_index: int) -> None:
  """On processes other than 0: absl and Python logging at WARNING (errors still pass)."""
  if process_index == 0:
    return
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
