"""The code sandbox against the escapes an adversarial probe found: host root, host files and
UNIX sockets, process-creation bypasses, unbounded forks and per-process memory, and forking
the trainer to start it. Backend-specific guarantees are asserted where that backend runs."""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import warnings

import pytest

from wakea_jax.toolbox import sandbox
from wakea_jax.toolbox.sandbox import SandboxConfig, run_code

FAST = SandboxConfig(cpu_s=2, wall_s=8.0, memory_mb=256, output_bytes=8192)
BACKEND = sandbox.choose_backend(FAST)
BWRAP = BACKEND == "bwrap"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _probe_cgroup():
  return run_code("print(1)", FAST)


CGROUP = _probe_cgroup()


def test_the_backend_and_bounds_in_force_are_reported():
  result = run_code("print('ok')", FAST)
  assert result.ok and result.backend == BACKEND
  assert result.process_bound in ("cgroup", "rlimit")
  assert result.memory_bound in ("cgroup", "rlimit")


@pytest.mark.skipif(not BWRAP, reason="bubblewrap backend only")
def test_the_code_is_not_root_and_sees_no_host_files():
  code = ("import os\nprint(os.getuid(), os.getgid())\n"
          f"for p in ['/etc/shadow', '/etc/passwd', {str(REPO)!r}, '/root/.bashrc', '/home',\n"
          "          '/var/run', '/run', '/proc/1/root/etc']:\n"
          "  print(p, os.path.exists(p))\n")
  result = run_code(code, FAST)
  assert result.ok, result
  lines = result.stdout.splitlines()
  assert lines[0] == "65534 65534"
  assert all(line.endswith("False") for line in lines[1:]), lines
  assert result.readonly_root


@pytest.mark.skipif(not BWRAP, reason="bubblewrap backend only")
def test_host_unix_sockets_are_unreachable_even_without_the_python_guard(tmp_path):
  """A listener at a host path: the raw `_socket` type (not patched by the guard) cannot
  reach it because the path does not exist in the sandbox's root."""
  path = str(tmp_path / "host.sock")
  server = socket.socket(socket.AF_UNIX)
  server.bind(path)
  server.listen(1)
  got = []
  threading.Thread(target=lambda: got.append(server.accept()), daemon=True).start()
  code = ("import _socket\n"
          "s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
          f"try:\n  s.connect({path!r})\n  print('CONNECTED')\n"
          "except OSError as e:\n  print('blocked', e.strerror)\n")
  result = run_code(code, FAST)
  server.close()
  assert "CONNECTED" not in result.stdout and "blocked" in result.stdout, result
  assert not got


def test_the_guard_refuses_unix_sockets_on_every_backend(tmp_path):
  code = ("import socket\ns = socket.socket(socket.AF_UNIX)\n"
          f"s.connect({str(tmp_path / 'x.sock')!r})\n")
  result = run_code(code, FAST)
  assert "network access is not allowed" in result.stderr, result


@pytest.mark.parametrize("call", [
    "import posix\nposix.system('true')",
    "import posix\nposix.posix_spawn('/bin/true', ['true'], {})",
    "import posix\nposix.fork()",
    "import os\nos.posix_spawnp('true', ['true'], {})",
    "import _posixsubprocess\n_posixsubprocess.fork_exec()",
])
def test_process_creation_through_posix_is_refused(call):
  result = run_code(call, FAST)
  assert not result.ok and "starting processes is not allowed" in result.stderr, result


def test_a_fork_bomb_is_bounded_even_with_subprocesses_allowed():
  config = SandboxConfig(cpu_s=3, wall_s=6.0, memory_mb=256, max_processes=16,
                         allow_subprocesses=True)
  code = ("import os, time\nn = 0\nwhile True:\n  try:\n    os.fork()\n    n += 1\n"
          "  except OSError as e:\n    print('refused after', n, e.strerror, flush=True)\n"
          "    time.sleep(10)\n")
  result = run_code(code, config)
  assert not result.ok
  if result.process_bound == "cgroup":
    assert "refused after" in result.stdout, result
    assert result.limit_hit in ("processes", "wall", "cpu")
  assert subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True,
                        text=True, timeout=30).stdout.strip() == "7"


@pytest.mark.skipif(CGROUP.memory_bound != "cgroup", reason="needs a delegated memory cgroup")
def test_memory_is_bounded_on_the_whole_process_tree():
  """Three children of 150 MB each stay under the 256 MB per-process limit; together they
  pass the tree's 256 MB."""
  config = SandboxConfig(cpu_s=5, wall_s=10.0, memory_mb=256, allow_subprocesses=True)
  code = ("import os, time\n"
          "for _ in range(3):\n"
          "  if os.fork() == 0:\n"
          "    data = bytearray(150 * 2**20)\n"
          "    for i in range(0, len(data), 4096):\n"
          "      data[i] = 1\n"
          "    time.sleep(5)\n"
          "    os._exit(0)\n"
          "for _ in range(3):\n"
          "  print(os.wait(), flush=True)\n")
  result = run_code(code, config)
  assert result.limit_hit == "memory", result


def test_tmp_is_private_and_the_workdir_disappears(tmp_path):
  # io.FileIO is not patched by the Python guard: the kernel decides.
  first = run_code("import io, os\nio.FileIO('/tmp/wakea_marker', 'w').write(b'x')\n"
                   "print(os.getcwd())", FAST)
  second = run_code("import os\nprint(os.path.exists('/tmp/wakea_marker'))", FAST)
  if first.backend == "bwrap":
    assert first.ok, first
    assert second.stdout.strip() == "False"
    assert not os.path.exists("/tmp/wakea_marker")
  workdir = first.stdout.strip().splitlines()[-1] if first.ok else None
  assert workdir is None or not os.path.exists(workdir)


def test_starting_a_sandbox_does_not_fork_the_trainer():
  """No preexec_fn: the child is exec'd without forking this (multithreaded, JAX) process,
  so JAX's "os.fork() ... will likely lead to a deadlock" warning never fires."""
  import jax  # noqa: F401  (the warning comes from JAX's at-fork hook)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert run_code("print(1)", FAST).ok
  assert not [w for w in caught if "os.fork()" in str(w.message)]
