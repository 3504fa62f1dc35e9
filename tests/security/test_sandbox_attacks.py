"""Security acceptance tests for the code sandbox, the original attack list (the probe's
escapes are in test_sandbox_escapes.py): every attack ends in a clear error result
within its limits, and the host is unharmed. Limits are small so the suite stays fast."""

import os
import re
import socket
import subprocess
import sys

import pytest

from wakea_jax.toolbox import Router, sandbox
from wakea_jax.toolbox.sandbox import SandboxConfig, run_code

FAST = SandboxConfig(cpu_s=1, wall_s=5.0, memory_mb=256, output_bytes=4096)
NAMESPACES = sandbox.network_namespace_available()


def _host_can_spawn() -> bool:
  return subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True,
                        text=True, timeout=30).stdout.strip() == "7"


def test_runs_code_in_a_temp_dir_that_is_deleted():
  result = run_code("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('ok')\n"
                    "print(open('scratch.txt').read())", FAST)
  assert result.ok, result
  workdir, content = result.stdout.split()
  assert content == "ok"
  assert os.path.basename(workdir).startswith("wakea_sandbox_")
  assert not os.path.exists(workdir)
  assert result.to_text().startswith("exit status 0")


def test_exception_is_reported():
  result = run_code("raise ValueError('bad input')", FAST)
  assert result.exit_code == 1 and result.limit_hit is None
  assert "ValueError: bad input" in result.stderr
  assert "_boot.py" not in result.stderr  # tracebacks start at the user's code
  assert 'File "main.py", line 1' in result.stderr
  assert result.to_text().startswith("Error: process exited with status 1")


def test_infinite_loop_hits_cpu_limit():
  result = run_code("while True:\n  pass", FAST)
  assert result.limit_hit == "cpu"
  assert result.to_text().startswith("Error: CPU time limit exceeded")


def test_sleep_hits_wall_limit():
  result = run_code("import time\ntime.sleep(60)", SandboxConfig(wall_s=1.0))
  assert result.limit_hit == "wall"
  assert "wall-clock time limit exceeded" in result.to_text()


def test_fork_bomb_is_stopped_and_host_unharmed():
  result = run_code("import os\nwhile True:\n  os.fork()", FAST)
  assert not result.ok
  assert "starting processes is not allowed" in result.stderr
  result = run_code("import subprocess\nsubprocess.run(['true'])", FAST)
  assert "starting processes is not allowed" in result.stderr
  assert _host_can_spawn()


@pytest.mark.skipif(not NAMESPACES, reason="needs user + PID namespaces")
def test_detached_descendants_die_with_the_sandbox():
  # Even with subprocesses allowed, a child that leaves the process group (setsid) is killed
  # because the whole PID namespace dies with its init.
  marker = "37.51"
  code = (f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
          "print('spawned')")
  result = run_code(code, SandboxConfig(cpu_s=1, wall_s=5.0, allow_subprocesses=True))
  assert result.stdout.strip() == "spawned", result
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert marker.encode() not in f.read(), f"sandboxed sleep survived as pid {pid}"
    except OSError:
      pass


def test_memory_bomb_hits_memory_limit():
  result = run_code("x = [0] * 10**9", FAST)
  assert result.limit_hit == "memory"
  assert result.to_text().startswith("Error: memory limit exceeded")
  assert _host_can_spawn()


def test_write_outside_workdir_is_refused(tmp_path):
  target = tmp_path / "escaped.txt"
  for code in (f"open({str(target)!r}, 'w').write('x')",
               f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
               f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')",
               f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
               f"import os\nos.mkdir({str(tmp_path / 'd')!r})"):
    result = run_code(code, FAST)
    assert not result.ok
    assert "outside the working directory is not allowed" in result.stderr, (code, result)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not NAMESPACES, reason="needs user + mount namespaces")
def test_kernel_blocks_writes_that_bypass_the_python_guard(tmp_path):
  # io.FileIO is not patched by the preamble; the read-only mounts stop it anyway.
  target = tmp_path / "escaped.txt"
  result = run_code(f"import io\nio.FileIO({str(target)!r}, 'w')", FAST)
  assert result.readonly_root
  # Under bwrap the host path does not even exist in the sandbox's root.
  assert re.search("Read-only file system|No such file or directory", result.stderr), result
  assert not target.exists()
  result = run_code("import io\nio.FileIO('/usr/escaped.txt', 'w')", FAST)
  assert "Read-only file system" in result.stderr, result


def test_file_size_limit():
  result = run_code("open('big', 'wb').write(b'x' * (3 * 2**20))",
                    SandboxConfig(file_size_mb=1, cpu_s=2))
  assert result.limit_hit == "file_size"


NETWORK_CODE = """
import socket
for address in [("127.0.0.1", {port}), ("10.255.255.1", 80)]:
  try:
    socket.create_connection(address, timeout=1).close()
    print("CONNECTED", address)
  except OSError as e:
    print("blocked", address, type(e).__name__)
"""


@pytest.mark.parametrize("isolate", [True, False])
def test_network_is_blocked(isolate):
  # A real listener on the host's loopback: the sandbox must not reach it.
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    code = NETWORK_CODE.format(port=server.getsockname()[1])
    result = run_code(code, SandboxConfig(cpu_s=2, wall_s=10.0, isolate_network=isolate))
  assert "CONNECTED" not in result.stdout
  assert result.stdout.count("blocked") == 2, result
  assert result.network_isolated == (isolate and NAMESPACES)


def test_parent_secrets_are_not_visible(monkeypatch):
  monkeypatch.setenv("WAKEA_SECRET", "x")
  code = ("import os\nprint(sorted(os.environ))\nprint(os.environ.get('WAKEA_SECRET'))\n"
          "found = False\n"
          "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
          "  try:\n"
          "    found |= b'WAKEA_SECRET' in open(f'/proc/{pid}/environ', 'rb').read()\n"
          "  except OSError:\n"
          "    pass\n"
          "print('found' if found else 'hidden')")
  result = run_code(code, FAST)
  assert result.ok, result
  names, secret, proc = result.stdout.splitlines()
  assert names == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
  assert secret == "None"
  if NAMESPACES:
    assert proc == "hidden"


def test_output_flood_is_truncated():
  result = run_code("while True:\n  print('x' * 1000)", FAST)
  assert result.limit_hit == "output"
  assert len(result.stdout) <= FAST.output_bytes + 100
  assert result.to_text().startswith("Error: output size limit exceeded")


def test_ctypes_is_refused():
  result = run_code("import ctypes", FAST)
  assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_tool_through_router():
  router = Router([sandbox.make_tool(FAST)])
  assert router.call("python", {"code": "print(6 * 7)"}).text == "exit status 0\nstdout:\n42\n"
  result = router.call("python", {"code": "while True: pass"})
  assert not result.ok and result.text.startswith("Error: CPU time limit exceeded")
  assert result.error == "CPU time limit exceeded"
