"""Functions that never return, run by worker processes in the security tests (imported by
module name "tests.security.slow_functions" with the repository root on the path)."""


def spin(*args):
  """Holds the GIL forever (what a thread timeout cannot stop)."""
  del args
  while True:
    pass


def spin_tool(arguments):
  """An isolated tool body that never returns."""
  del arguments
  while True:
    pass
