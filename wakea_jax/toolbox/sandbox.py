"""Runs untrusted Python in a separate, resource-limited process.

What is enforced by the kernel (holds even against hostile code):
  * CPU time: RLIMIT_CPU (SIGXCPU, then SIGKILL one second later).
  * Wall time: the parent kills the whole process group at `wall_s`; when the network namespace
    is available the child also runs in its own PID namespace, so every descendant dies with it
    even if it called setsid().
  * Memory: RLIMIT_AS (address space, per process).
  * File size: RLIMIT_FSIZE bounds any single file written.
  * Processes: RLIMIT_NPROC, but NOTE the kernel ignores it for root (uid 0 outside a user
    namespace), which is the case in some containers; there only the preamble guard, the PID
    namespace and the wall-time kill bound a fork bomb.
  * Network: with `unshare -rn` (unprivileged user + network namespace) the child sees only a
    down loopback device, so no connection can leave it, not even to the host's 127.0.0.1.
    `network_isolated` in the result says whether this was in force. The same call gives it a
    PID namespace with its own /proc (`--mount-proc`), so it cannot see host processes or read
    their /proc/<pid>/environ.
  * Environment: the child gets only PATH, LANG, HOME and TMPDIR (HOME/TMPDIR = its temp dir);
    `-I` also makes Python ignore PYTHON* variables and the user site directory.
  * Output: at most `output_bytes` per stream are kept; past that the child is killed.
  * Files (namespaced mode, `readonly_root` in the result): the working directory is a private
    tmpfs of `workdir_mb`, every other mount is remounted read-only inside the sandbox's mount
    namespace, and a nested user namespace locks that, so writes anywhere else fail with EROFS.

What is only a Python-level guard (a preamble run before the code; bypassable by e.g. ctypes,
which is why `ctypes` import is also refused, but not a security boundary):
  * Writes outside the working directory (`open`, `os.open`, remove/rename/mkdir...): the only
    write protection when namespaces are unavailable.
  * Sockets, when no network namespace could be made.
  * fork/exec/subprocess (off unless `allow_subprocesses`).
Reads are NOT restricted: the code can read any file the host user can read (other processes'
/proc entries are hidden in namespaced mode). For hostile code at scale, also run the host as a
dedicated unprivileged user or inside a container/gVisor.

The child runs `python -I -S`: no site-packages, so only the standard library is importable.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from wakea_jax.toolbox.router import Tool, ToolResult


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
  """Limits for one `run_code` call; see the module docstring for how each is enforced.

  Times are in seconds, sizes in MiB except `output_bytes` (kept per stream).
  """

  cpu_s: int = 5
  wall_s: float = 10.0
  memory_mb: int = 512
  output_bytes: int = 64 * 1024
  file_size_mb: int = 16
  workdir_mb: int = 64  # size of the private tmpfs working directory (namespaced mode only)
  # RLIMIT_NPROC counts every process and thread of the user (per user namespace on newer
  # kernels), so it must leave room for the host's own threads; it is no-op for root.
  max_processes: int = 256
  max_open_files: int = 64
  isolate_network: bool = True
  allow_subprocesses: bool = False


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one `run_code` call: decoded output, exit status and which limit, if any, hit."""

  stdout: str
  stderr: str
  exit_code: int | None
  limit_hit: str | None  # "cpu", "wall", "memory", "output", "file_size" or None
  network_isolated: bool
  # True when every mount but the working directory was read-only (kernel-enforced) for the run.
  readonly_root: bool = False

  @property
  def ok(self) -> bool:
    """Whether the code exited with status 0 within every limit."""
    return self.exit_code == 0 and self.limit_hit is None

  def to_text(self) -> str:
    """The tool response: an `Error: ...` or `exit status 0` line, then stdout and stderr."""
    parts = []
    if self.limit_hit is not None:
      parts.append(f"Error: {_LIMIT_MESSAGES[self.limit_hit]}")
    elif self.exit_code != 0:
      parts.append(f"Error: process exited with status {self.exit_code}")
    else:
      parts.append("exit status 0")
    if self.stdout:
      parts.append(f"stdout:\n{self.stdout}")
    if self.stderr:
      parts.append(f"stderr:\n{self.stderr}")
    return "\n".join(parts)


_LIMIT_MESSAGES = {
    "cpu": "CPU time limit exceeded", "wall": "wall-clock time limit exceeded",
    "memory": "memory limit exceeded", "output": "output size limit exceeded",
    "file_size": "file size limit exceeded",
}

# Runs inside the child before the user's code. Python-level guard only (see module docstring).
_PREAMBLE = r'''
import builtins, io, os, sys
_ROOT = os.path.realpath(os.getcwd())
with open("main.py", encoding="utf-8") as _f:
  _source = _f.read()
if NETWORK_ISOLATED:
  # We are PID 1 of fresh user + mount namespaces, with CAP_SYS_ADMIN over them only. Give the
  # code a private tmpfs as working directory and make every other mount read-only; then enter
  # a nested user namespace, which locks those read-only flags (the code keeps capabilities only
  # over the nested namespace and cannot remount them writable). Kernel-enforced, and confined
  # to this mount namespace: the host's mounts are untouched.
  import ctypes
  _libc = ctypes.CDLL(None, use_errno=True)
  _FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024,
            "nodiratime": 2048, "relatime": 1 << 21}
  def _mount(source, target, fstype, flags, data=None):
    if _libc.mount(source, os.fsencode(target), fstype, flags, data) != 0:
      raise OSError(ctypes.get_errno(), "mount failed", target)
  try:
    _mount(None, "/", None, 16384 | (1 << 18))  # MS_REC | MS_PRIVATE: nothing propagates out
    _mount(b"tmpfs", _ROOT, b"tmpfs", 2 | 4, f"size={WORKDIR_MB}m,mode=700".encode())
    os.chdir(_ROOT)  # onto the tmpfs now covering the directory
    _all_ro = True
    with open("/proc/self/mounts") as _f:
      _mounts = [line.split() for line in _f]
    for _fields in _mounts:
      _point = _fields[1].replace("\\040", " ")
      if _point == _ROOT or _fields[2] == "proc":  # the tmpfs, and this namespace's own /proc
        continue
      _keep = sum(_FLAGS.get(o, 0) for o in _fields[3].split(","))
      try:  # MS_REMOUNT | MS_BIND | MS_RDONLY, keeping the flags the kernel locks
        _mount(None, _point, None, 32 | 4096 | 1 | _keep)
      except OSError:
        _all_ro = _all_ro and "ro" in _fields[3].split(",")
    if _libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
      raise OSError(ctypes.get_errno(), "unshare failed")
    for _name, _text in (("setgroups", "deny"), ("uid_map", "0 0 1"), ("gid_map", "0 0 1")):
      with open(f"/proc/self/{_name}", "w") as _f:
        _f.write(_text)
    if _all_ro:
      sys.stderr.write(READONLY_MARKER + "\n")
      sys.stderr.flush()
  except OSError:
    pass
  del ctypes, _libc
  with open("main.py", "w", encoding="utf-8") as _f:  # for tracebacks' source lines
    _f.write(_source)
def _inside(path):
  if isinstance(path, int):
    return True  # an already-open descriptor
  p = os.path.realpath(os.fsdecode(path))
  return p == _ROOT or p.startswith(_ROOT + os.sep)
def _refuse(what, path):
  raise PermissionError(f"sandbox: {what} outside the working directory is not allowed: {path!r}")
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
  if any(c in mode for c in "wax+") and not _inside(file):
    _refuse("writing", file)
  return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *args, **kwargs):
  if flags & _WRITE_FLAGS and not _inside(path):
    _refuse("writing", path)
  return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open
def _guard_paths(name, count):
  real = getattr(os, name)
  def guarded(*args, **kwargs):
    for path in args[:count]:
      if not _inside(path):
        _refuse(name, path)
    return real(*args, **kwargs)
  setattr(os, name, guarded)
for _name, _count in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1),
                      ("rename", 2), ("replace", 2), ("chmod", 1), ("chown", 1), ("symlink", 2),
                      ("link", 2), ("truncate", 1), ("utime", 1)]:
  if hasattr(os, _name):
    _guard_paths(_name, _count)
sys.modules["ctypes"] = None  # ctypes would bypass every guard above
if not ALLOW_SUBPROCESSES:
  def _no_processes(*args, **kwargs):
    raise PermissionError("sandbox: starting processes is not allowed")
  for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe",
                "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                "spawnvpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
      setattr(os, _name, _no_processes)
  import _posixsubprocess
  _posixsubprocess.fork_exec = _no_processes
if not NETWORK_ISOLATED:
  import socket
  def _no_network(*args, **kwargs):
    raise PermissionError("sandbox: network access is not allowed")
  socket.socket.connect = socket.socket.connect_ex = socket.socket.bind = _no_network
  socket.socket.sendto = _no_network
  socket.create_connection = socket.getaddrinfo = _no_network
del _name, _count
_globals = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
exec(compile(_source, "main.py", "exec"), _globals)
'''


# -r: user namespace (root inside, nobody's privileges outside); -n: empty network namespace;
# --pid --fork: the code runs as PID 1 of a new PID namespace, so all its descendants die with
# it; --kill-child: it dies if unshare is killed; --mount-proc: /proc shows only that namespace.
_NAMESPACE_FLAGS = ("-rn", "--pid", "--fork", "--kill-child", "--mount-proc")


# First stderr line from the bootstrap when the read-only root is in force; removed from output.
_READONLY_MARKER = "\x00wakea-sandbox: read-only root"
_BOOT_FRAME = re.compile(r'  File "[^"]*_boot\.py", line \d+, in \S+\n(?:    .*\n)*')


@functools.cache
def network_namespace_available() -> bool:
  """Whether `unshare -rn --pid --fork --mount-proc` works here (needs user namespaces)."""
  unshare = shutil.which("unshare")
  if unshare is None:
    return False
  try:
    probe = subprocess.run(
        [unshare, *_NAMESPACE_FLAGS, sys.executable, "-I", "-S", "-c", "0"],
        capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0


def _set_limits(config: SandboxConfig) -> None:
  """Runs in the child between fork and exec."""
  mib = 1024 * 1024
  # Soft CPU limit sends SIGXCPU; the hard limit one second later is SIGKILL.
  resource.setrlimit(resource.RLIMIT_CPU, (config.cpu_s, config.cpu_s + 1))
  resource.setrlimit(resource.RLIMIT_AS, (config.memory_mb * mib,) * 2)
  resource.setrlimit(resource.RLIMIT_FSIZE, (config.file_size_mb * mib,) * 2)
  resource.setrlimit(resource.RLIMIT_NPROC, (config.max_processes,) * 2)
  resource.setrlimit(resource.RLIMIT_NOFILE, (config.max_open_files,) * 2)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _reader(stream, limit: int, sink: bytearray, overflow: threading.Event, on_overflow) -> None:
  while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
    room = limit - len(sink)
    sink.extend(chunk[:max(room, 0)])
    if len(chunk) > room:
      overflow.set()
      on_overflow()
      return


def run_code(code: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
  """Runs `code` as a script in a fresh temp directory (deleted afterwards)."""
  workdir = tempfile.mkdtemp(prefix="wakea_sandbox_")
  try:
    isolated = config.isolate_network and network_namespace_available()
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
      f.write(code)
    boot = (f"ALLOW_SUBPROCESSES = {config.allow_subprocesses!r}\n"
            f"NETWORK_ISOLATED = {isolated!r}\nWORKDIR_MB = {int(config.workdir_mb)}\n"
            f"READONLY_MARKER = {_READONLY_MARKER!r}\n" + _PREAMBLE)
    with open(os.path.join(workdir, "_boot.py"), "w", encoding="utf-8") as f:
      f.write(boot)
    command = [sys.executable, "-I", "-S", "-B", "_boot.py"]
    if isolated:
      command = [shutil.which("unshare"), *_NAMESPACE_FLAGS] + command
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    return _supervise(command, workdir, env, config, isolated)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def _supervise(command: list[str], workdir: str, env: dict[str, str], config: SandboxConfig,
               isolated: bool) -> SandboxResult:
  proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True, preexec_fn=lambda: _set_limits(config))

  def kill() -> None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  out, err = bytearray(), bytearray()
  overflow = threading.Event()
  readers = [threading.Thread(target=_reader, args=(s, config.output_bytes, b, overflow, kill),
                              daemon=True) for s, b in ((proc.stdout, out), (proc.stderr, err))]
  for t in readers:
    t.start()
  # Reap with wait4 rather than Popen.wait to get the rusage of the child and everything it
  # reaped: under `unshare --fork` a SIGXCPU death is reported as a plain exit status 1, so the
  # CPU time consumed is the reliable sign that the CPU limit was hit.
  timed_out = False
  start = time.monotonic()
  deadline = start + config.wall_s
  status, usage = None, None
  while status is None:
    pid, wait_status, rusage = os.wait4(proc.pid, os.WNOHANG)
    if pid == proc.pid:
      status, usage = wait_status, rusage
    elif time.monotonic() >= deadline:
      timed_out = True
      kill()
      _, status, usage = os.wait4(proc.pid, 0)
    else:
      time.sleep(0.01)
  proc.returncode = os.waitstatus_to_exitcode(status)
  kill()  # reaps stragglers left in the group after a normal exit
  cpu_used = usage.ru_utime + usage.ru_stime
  for t in readers:
    t.join(timeout=max(1.0, config.wall_s - (time.monotonic() - start)))
  proc.stdout.close()
  proc.stderr.close()
  stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
  # unshare reports a signalled child with this line (it cannot re-raise the signal); the
  # limit classification below already says what happened.
  stderr = "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith("unshare: sigprocmask"))
  # The bootstrap frame is noise to the model: tracebacks should start at its own code.
  stderr = _BOOT_FRAME.sub("", stderr)
  readonly_root = stderr.startswith(_READONLY_MARKER + "\n")
  if readonly_root:
    stderr = stderr[len(_READONLY_MARKER) + 1:]
  code = proc.returncode
  limit = None
  if overflow.is_set():
    limit = "output"
  elif timed_out:
    limit = "wall"
  elif code in (-signal.SIGXCPU, -signal.SIGKILL) or cpu_used >= config.cpu_s - 0.05:
    limit = "cpu"
  elif code == -signal.SIGXFSZ or "File too large" in stderr:
    limit = "file_size"
  elif "MemoryError" in stderr:
    limit = "memory"
  if limit == "output":
    stdout += "\n[output truncated]" if len(out) >= config.output_bytes else ""
    stderr += "\n[output truncated]" if len(err) >= config.output_bytes else ""
  return SandboxResult(stdout, stderr, code, limit, isolated, readonly_root)


def _as_tool_result(result: SandboxResult) -> ToolResult:
  text = result.to_text()
  return ToolResult(text, ok=result.ok, error=None if result.ok else text.split("\n", 1)[0][7:])


def make_tool(config: SandboxConfig = SandboxConfig()) -> Tool:
  """The `python` tool: runs the `code` argument with `run_code` under `config`."""
  return Tool(
      name="python",
      description=("Run a Python 3 script (standard library only) in an isolated sandbox with no "
                   f"network, {config.cpu_s} s CPU, {config.memory_mb} MB memory; returns its "
                   "stdout, stderr and exit status. Print the values you need."),
      parameters={"type": "object", "required": ["code"],
                  "properties": {"code": {"type": "string", "description": "Python source"}}},
      run=lambda arguments: _as_tool_result(run_code(arguments["code"], config)),
  )
