"""Running host functions in separate, killable Python processes with a hard deadline.

A call that holds the GIL (`round(1, -10**8)`, a sympy `simplify`, arithmetic on a
million-digit integer) cannot be stopped by a thread timeout: the thread runs on and the
caller's budget is a fiction. `IsolatedPool.call("module:function", args, timeout_s=...)`
runs an allow-listed function in a worker process and SIGKILLs the worker when the deadline
passes; the caller gets `TimeoutError` and the next call starts a fresh worker.

- Workers are started with `subprocess` (exec of a new interpreter), never by forking the
  caller: the trainer is a multithreaded JAX process, and a forked copy of it can deadlock.
- Requests and results are JSON lines on the worker's stdin/stdout: nothing is unpickled.
- Only functions named in the pool's allow-list can be called, each worker caps its own
  address space (`memory_bytes`), and its stderr is discarded.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

# The package root, so that a worker imports this checkout's wakea_jax even uninstalled.
_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
  """The function raised in the worker, or the worker died (`died`); the message says which."""

  def __init__(self, message: str, *, died: bool = False) -> None:
    super().__init__(message)
    self.died = died


class _Worker:
  """One worker process and its pipes."""

  def __init__(self, allowed: Sequence[str], memory_bytes: int) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _ROOT,
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    self.process = subprocess.Popen(
        [sys.executable, "-s", "-m", "wakea_jax.toolbox.isolation", json.dumps(list(allowed)),
         str(memory_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        close_fds=True, start_new_session=True)
    self._buffer = b""

  def call(self, fn: str, args: Sequence[Any], timeout_s: float | None) -> Any:
    """Sends one request and waits for its answer until the deadline (None: forever)."""
    request = json.dumps({"fn": fn, "args": list(args)}) + "\n"
    self.process.stdin.write(request.encode())
    self.process.stdin.flush()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = self.process.stdout.fileno()
    while b"\n" not in self._buffer:
      remaining = None if deadline is None else deadline - time.monotonic()
      if remaining is not None and remaining <= 0:
        raise TimeoutError
      ready, _, _ = select.select([out], [], [], remaining)
      if not ready:
        raise TimeoutError
      chunk = os.read(out, 1 << 16)
      if not chunk:
        raise WorkerError(f"worker exited during {fn}", died=True)
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    reply = json.loads(line)
    if not reply["ok"]:
      raise WorkerError(f"{reply['type']}: {reply['message']}")
    return reply["value"]

  def kill(self) -> None:
    """Kills the worker (and anything it started) and reaps it."""
    try:
      os.killpg(self.process.pid, 9)
    except (ProcessLookupError, PermissionError):
      pass
    self.process.wait()


class IsolatedPool:
  """Up to `size` worker processes running the functions named in `allowed`.

  Thread-safe: concurrent calls use different workers (and wait when all are busy).
  Workers start on first use and live until `close` (or until they overrun a deadline).
  """

  def __init__(self, allowed: Iterable[str], *, size: int = 2,
               memory_bytes: int = 2 << 30) -> None:
    self.allowed = tuple(sorted(set(allowed)))
    if size < 1:
      raise ValueError(f"size must be >= 1, got {size}")
    self.memory_bytes = memory_bytes
    self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
    for _ in range(size):
      self._idle.put(None)   # a slot whose worker has not started yet
    self._lock = threading.Lock()
    self._workers: set[_Worker] = set()

  def call(self, fn: str, *args: Any, timeout_s: float | None = None) -> Any:
    """`fn(*args)` in a worker; JSON-serialisable arguments and result.

    Raises TimeoutError past `timeout_s` (the worker is killed), WorkerError when the
    function raised or the worker died, and ValueError for a function not allowed.
    """
    if fn not in self.allowed:
      raise ValueError(f"{fn!r} is not an allowed function ({', '.join(self.allowed)})")
    worker = self._idle.get()
    keep = True
    try:
      if worker is None:
        worker = _Worker(self.allowed, self.memory_bytes)
        with self._lock:
          self._workers.add(worker)
      return worker.call(fn, args, timeout_s)
    except WorkerError as e:
      keep = not e.died   # the function raised: the worker is fine
      raise
    except BaseException:   # a timeout, a broken pipe: the worker's state is unknown
      keep = False
      raise
    finally:
      if not keep and worker is not None:
        self._discard(worker)
        worker = None
      self._idle.put(worker)

  def _discard(self, worker: _Worker) -> None:
    worker.kill()
    with self._lock:
      self._workers.discard(worker)

  def close(self) -> None:
    """Kills every worker."""
    with self._lock:
      workers = list(self._workers)
      self._workers.clear()
    for worker in workers:
      worker.kill()

  def __del__(self) -> None:
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


def _serve(allowed: Sequence[str], memory_bytes: int) -> None:
  """The worker's loop: one JSON request per stdin line, one JSON reply per stdout line."""
  import importlib
  import resource

  resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  functions = {}
  for name in allowed:
    module, _, attr = name.partition(":")
    functions[name] = getattr(importlib.import_module(module), attr)
  out = sys.stdout
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply = {"ok": True, "value": functions[request["fn"]](*request["args"])}
      text = json.dumps(reply)
    except BaseException as e:  # noqa: BLE001  (every failure goes back as text)
      text = json.dumps({"ok": False, "type": type(e).__name__, "message": str(e)[:500]})
    out.write(text + "\n")
    out.flush()


if __name__ == "__main__":
  _serve(json.loads(sys.argv[1]), int(sys.argv[2]))
