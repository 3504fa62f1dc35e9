"""Runs untrusted Python in a separate, resource-limited, isolated process.

Backends, best first (`SandboxConfig.backend="auto"` takes the first that works here):

  bwrap    bubblewrap (Debian package `bubblewrap`): new user, PID, network, IPC, UTS and
           cgroup namespaces; the code runs as uid/gid 65534 in its user namespace with every
           capability dropped, in a minimal root it cannot see past: read-only /usr and the
           Python installation, a private /proc and /dev, a private tmpfs /tmp and a tmpfs
           working directory of `workdir_mb`; the rest of `/` is read-only and empty. No host
           file, directory or UNIX socket is reachable (there is no path to one).
  unshare  util-linux `unshare -rn --pid --fork --mount-proc`: user, network, PID and mount
           namespaces; every host mount is remounted read-only inside (so files stay
           *readable*) and the working directory is a private tmpfs. Host UNIX sockets are
           reachable by path here: only the Python-level guard refuses AF_UNIX connections.
  none     no namespaces: resource limits and the Python-level guard only.

Enforced by the kernel on every backend (set by the child itself before the code runs, so
the trainer's multithreaded process is never forked with a `preexec_fn`):
  * CPU time: RLIMIT_CPU (SIGXCPU, then SIGKILL one second later); wall time: the parent
    kills the process group (and with a PID namespace everything in it dies with its init).
  * Memory: a cgroup memory limit on the whole process tree where the kernel delegates one
    (v1 `memory` or v2 `memory.max` under this process's cgroup), else RLIMIT_AS per process,
    i.e. at most `memory_mb` x `max_processes` in all (see `SandboxResult.memory_bound`).
  * Processes: a cgroup `pids.max` where delegated, else RLIMIT_NPROC, which the kernel
    ignores when the host user is root (the sandbox's uid maps to the caller's): then only the
    PID namespace, the Python guard and the wall-time kill bound a fork bomb
    (`SandboxResult.process_bound` says which held).
  * File size (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps; output past
    `output_bytes` per stream kills the child.
  * Environment: only PATH, LANG, HOME and TMPDIR; `python -I -S -B` (standard library only).

The Python-level guard (a preamble before the code; bypassable by native code, which is why
`ctypes` is refused, but not a security boundary) refuses writes and `chdir` outside the
working directory, process creation unless `allow_subprocesses` (patched in `os`, `posix` and
`_posixsubprocess`), and without a network namespace all sockets.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from wakea_jax.toolbox.router import Tool, ToolResult

BACKENDS = ("auto", "bwrap", "unshare", "none")


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
  workdir_mb: int = 64  # size of the private tmpfs working directory (namespaced backends)
  # The whole tree's processes (pids cgroup), else RLIMIT_NPROC, which counts every process
  # and thread of the host user in kernels that do not namespace it: leave room for them.
  max_processes: int = 64
  max_open_files: int = 64
  isolate_network: bool = True
  allow_subprocesses: bool = False
  backend: str = "auto"

  def __post_init__(self) -> None:
    if self.backend not in BACKENDS:
      raise ValueError(f"sandbox backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """Outcome of one `run_code` call: decoded output, exit status and which limit, if any, hit."""

  stdout: str
  stderr: str
  exit_code: int | None
  limit_hit: str | None  # "cpu", "wall", "memory", "output", "file_size", "processes" or None
  network_isolated: bool
  # True when nothing of the host was writable for the run (kernel-enforced).
  readonly_root: bool = False
  backend: str = "none"          # the backend that ran it
  process_bound: str = "rlimit"  # "cgroup" (pids.max) or "rlimit" (RLIMIT_NPROC)
  memory_bound: str = "rlimit"   # "cgroup" (whole tree) or "rlimit" (per process)

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
    "file_size": "file size limit exceeded", "processes": "process limit exceeded",
}

# Runs inside the child before the user's code. It waits for the parent's "go" (sent once the
# process tree is in its cgroup), sets its own limits, builds the mounts of the unshare
# backend, then installs the Python-level guard.
_PREAMBLE = r'''
import builtins, io, os, posix, resource, sys
if sys.stdin.buffer.read(3) != b"go\n":
  os._exit(125)
os.environ.pop("PWD", None)  # bwrap's --chdir sets it
_null = os.open("/dev/null", os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
_MIB = 1024 * 1024
for _limit, _value in ((resource.RLIMIT_CPU, (CPU_S, CPU_S + 1)),
                       (resource.RLIMIT_AS, (MEMORY_MB * _MIB,) * 2),
                       (resource.RLIMIT_FSIZE, (FILE_SIZE_MB * _MIB,) * 2),
                       (resource.RLIMIT_NPROC, (MAX_PROCESSES,) * 2),
                       (resource.RLIMIT_NOFILE, (MAX_OPEN_FILES,) * 2),
                       (resource.RLIMIT_CORE, (0, 0))):
  resource.setrlimit(_limit, _value)
_ROOT = os.path.realpath(os.getcwd())
with open(CODE_PATH, encoding="utf-8") as _f:
  _source = _f.read()
if BACKEND == "unshare":
  # We are PID 1 of fresh user + mount namespaces, with CAP_SYS_ADMIN over them only. Give the
  # code a private tmpfs as working directory and make every other mount read-only; then enter
  # a nested user namespace, which locks those read-only flags. Confined to this namespace.
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
elif BACKEND == "bwrap":
  sys.stderr.write(READONLY_MARKER + "\n")
  sys.stderr.flush()
with open("main.py", "w", encoding="utf-8") as _f:  # the code, for tracebacks' source lines
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
os.open = posix.open = _guarded_os_open
def _guard_paths(name, count):
  real = getattr(os, name)
  def guarded(*args, **kwargs):
    for path in args[:count]:
      if not _inside(path):
        _refuse(name, path)
    return real(*args, **kwargs)
  setattr(os, name, guarded)
  if hasattr(posix, name):
    setattr(posix, name, guarded)
for _name, _count in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1),
                      ("rename", 2), ("replace", 2), ("chmod", 1), ("chown", 1), ("symlink", 2),
                      ("link", 2), ("truncate", 1), ("utime", 1), ("chdir", 1)]:
  if hasattr(os, _name):
    _guard_paths(_name, _count)
sys.modules["ctypes"] = None  # ctypes would bypass every guard above
if not ALLOW_SUBPROCESSES:
  def _no_processes(*args, **kwargs):
    raise PermissionError("sandbox: starting processes is not allowed")
  for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe",
                "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp",
                "spawnvpe", "posix_spawn", "posix_spawnp"):
    for _module in (os, posix):
      if hasattr(_module, _name):
        setattr(_module, _name, _no_processes)
  import _posixsubprocess
  _posixsubprocess.fork_exec = _no_processes
import socket
def _no_network(*args, **kwargs):
  raise PermissionError("sandbox: network access is not allowed")
def _guard_socket(name):
  # UNIX sockets live at filesystem paths, which a network namespace does not cover.
  real = getattr(socket.socket, name)
  def guarded(self, *args, **kwargs):
    if self.family == socket.AF_UNIX or not NETWORK_ISOLATED:
      _no_network()
    return real(self, *args, **kwargs)
  setattr(socket.socket, name, guarded)
for _name in ("connect", "connect_ex", "sendto", "sendmsg", "bind"):
  _guard_socket(_name)
if not NETWORK_ISOLATED:
  socket.create_connection = socket.getaddrinfo = _no_network
del _name, _count
_globals = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
exec(compile(_source, "main.py", "exec"), _globals)
'''

# -r: user namespace (root inside, the caller's privileges outside); -n: empty network
# namespace; --pid --fork: the code runs as PID 1 of a new PID namespace, so all its
# descendants die with it; --kill-child: it dies if unshare is killed; --mount-proc: /proc
# shows only that namespace.
_UNSHARE_FLAGS = ("-rn", "--pid", "--fork", "--kill-child", "--mount-proc")

# First stderr line from the bootstrap when the read-only root is in force; removed from output.
_READONLY_MARKER = "\x00wakea-sandbox: read-only root"
_BOOT_FRAME = re.compile(r'  File "[^"]*_boot\.py", line \d+, in \S+\n(?:    .*\n)*')
_PYTHON = os.path.realpath(sys.executable)


def _bwrap_command(workdir: str, code_dir: str, config: SandboxConfig) -> list[str]:
  """The bwrap argv: a minimal read-only root with the interpreter, a tmpfs workdir."""
  mounts = ["--ro-bind", "/usr", "/usr"]
  for name in ("bin", "lib", "lib32", "lib64", "sbin"):
    path = f"/{name}"
    if os.path.islink(path):
      mounts += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      mounts += ["--ro-bind", path, path]
  for prefix in {sys.base_prefix, os.path.dirname(os.path.dirname(_PYTHON))}:
    if not prefix.startswith("/usr/"):
      mounts += ["--ro-bind", prefix, prefix]
  return [
      shutil.which("bwrap"), "--unshare-all", *([] if config.isolate_network else ["--share-net"]),
      "--die-with-parent", "--new-session", "--uid", "65534", "--gid", "65534",
      "--cap-drop", "ALL", *mounts, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
      "--ro-bind", code_dir, "/.wakea_code",
      "--size", str(config.workdir_mb * 1024 * 1024), "--tmpfs", workdir,
      "--remount-ro", "/", "--chdir", workdir, "--",
      _PYTHON, "-I", "-S", "-B", "/.wakea_code/_boot.py"]


@functools.cache
def _backend_works(backend: str) -> bool:
  """Whether `backend` can start a Python here (probed once per process)."""
  if backend == "none":
    return True
  tool = "bwrap" if backend == "bwrap" else "unshare"
  if shutil.which(tool) is None:
    return False
  with tempfile.TemporaryDirectory(prefix="wakea_sandbox_probe_") as tmp:
    with open(os.path.join(tmp, "_boot.py"), "w") as f:
      f.write("import sys\nsys.exit(0)\n")
    if backend == "bwrap":
      command = _bwrap_command(tmp, tmp, SandboxConfig(backend="bwrap"))
    else:
      command = [shutil.which("unshare"), *_UNSHARE_FLAGS, _PYTHON, "-I", "-S", "-c", "0"]
    try:
      probe = subprocess.run(command, capture_output=True, timeout=20,
                             env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError):
      return False
  return probe.returncode == 0


def choose_backend(config: SandboxConfig) -> str:
  """The backend `config` runs on here: its own, or with "auto" the best that works."""
  if config.backend != "auto":
    if not _backend_works(config.backend):
      raise RuntimeError(f"sandbox backend {config.backend!r} does not work on this host")
    return config.backend
  for backend in ("bwrap", "unshare"):
    if _backend_works(backend):
      return backend
  return "none"


def network_namespace_available() -> bool:
  """Whether a namespaced backend (bwrap or unshare) works here."""
  return choose_backend(SandboxConfig()) != "none"


# ------------------------------------------------------------------------------------------
# cgroups: process and memory bounds on the whole tree, where the kernel delegates them
# ------------------------------------------------------------------------------------------

def _own_cgroups() -> dict[str, str]:
  """{controller (v1) or "" (v2): this process's cgroup path}."""
  out = {}
  try:
    with open("/proc/self/cgroup") as f:
      for line in f:
        _, controllers, path = line.rstrip("\n").split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
          out[name] = path
  except OSError:
    pass
  return out


def _cgroup_mounts() -> dict[str, str]:
  """{controller (v1) or "" (v2): mount point}."""
  out = {}
  try:
    with open("/proc/self/mounts") as f:
      for line in f:
        _, point, fstype, options = line.split()[:4]
        if fstype == "cgroup2":
          out.setdefault("", point)
        elif fstype == "cgroup":
          for option in options.split(","):
            if option in ("pids", "memory"):
              out[option] = point
  except OSError:
    pass
  return out


def _process_tree(root_pid: int) -> list[int]:
  """`root_pid` and its descendants alive now (from /proc/<pid>/task/<tid>/children)."""
  pids = [root_pid]
  for pid in pids:
    try:
      for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
          pids += [int(p) for p in f.read().split()]
    except OSError:
      pass
  return pids


class _Cgroup:
  """A fresh child cgroup (pids and memory) holding one sandbox's processes, best effort."""

  def __init__(self, config: SandboxConfig) -> None:
    self.dirs: dict[str, str] = {}   # controller -> directory
    own, mounts = _own_cgroups(), _cgroup_mounts()
    name = f"wakea-sandbox-{uuid.uuid4().hex[:12]}"
    memory = config.memory_mb * 1024 * 1024
    # controller -> (files to write under cgroup v1, under v2)
    limits = {"pids": ({"pids.max": str(config.max_processes)},) * 2,
              "memory": ({"memory.limit_in_bytes": str(memory)},
                         {"memory.max": str(memory), "memory.swap.max": "0"})}
    for controller, (v1_files, v2_files) in limits.items():
      if controller in mounts and controller in own:
        base, files = os.path.join(mounts[controller], own[controller].lstrip("/")), v1_files
      elif "" in mounts:
        base, files = os.path.join(mounts[""], own.get("", "/").lstrip("/")), v2_files
      else:
        continue
      path = os.path.join(base, name)
      try:
        os.makedirs(path, exist_ok=True)
        for file, value in files.items():
          with open(os.path.join(path, file), "w") as f:
            f.write(value)
      except OSError:
        self._remove(path)
        continue
      self.dirs[controller] = path

  def add_tree(self, root_pid: int) -> None:
    """Moves `root_pid` and all its descendants into the cgroup."""
    pids = _process_tree(root_pid)
    for path in self.dirs.values():
      for pid in pids:
        try:
          with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
        except OSError:
          pass

  def hit(self, controller: str) -> bool:
    """Whether the controller's limit refused something during the run."""
    path = self.dirs.get(controller)
    if path is None:
      return False
    for file, key in (("memory.failcnt", None), ("pids.events", "max"),
                      ("memory.events", "oom_kill")):
      try:
        with open(os.path.join(path, file)) as f:
          text = f.read()
      except OSError:
        continue
      if key is None:
        return int(text.strip() or 0) > 0
      for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and int(value) > 0:
          return True
    return False

  def close(self) -> None:
    """Kills anything left in the cgroup and removes it."""
    for path in self.dirs.values():
      self._remove(path)

  @staticmethod
  def _remove(path: str) -> None:
    for _ in range(50):
      try:
        with open(os.path.join(path, "cgroup.procs")) as f:
          pids = [int(p) for p in f.read().split()]
      except OSError:
        pids = []
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
      try:
        os.rmdir(path)
        return
      except FileNotFoundError:
        return
      except OSError:
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------
# Running code
# ------------------------------------------------------------------------------------------

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
  backend = choose_backend(config)
  workdir = tempfile.mkdtemp(prefix="wakea_sandbox_")
  code_dir = tempfile.mkdtemp(prefix="wakea_sandbox_code_")
  try:
    isolated = config.isolate_network and backend != "none"
    with open(os.path.join(code_dir, "main.py"), "w", encoding="utf-8") as f:
      f.write(code)
    settings = dict(
        ALLOW_SUBPROCESSES=config.allow_subprocesses, NETWORK_ISOLATED=isolated,
        WORKDIR_MB=int(config.workdir_mb), READONLY_MARKER=_READONLY_MARKER, BACKEND=backend,
        CPU_S=int(config.cpu_s), MEMORY_MB=int(config.memory_mb),
        FILE_SIZE_MB=int(config.file_size_mb), MAX_PROCESSES=int(config.max_processes),
        MAX_OPEN_FILES=int(config.max_open_files),
        CODE_PATH=("/.wakea_code" if backend == "bwrap" else code_dir) + "/main.py")
    boot = "".join(f"{k} = {v!r}\n" for k, v in settings.items()) + _PREAMBLE
    with open(os.path.join(code_dir, "_boot.py"), "w", encoding="utf-8") as f:
      f.write(boot)
    os.chmod(code_dir, 0o755)
    for name in ("main.py", "_boot.py"):
      os.chmod(os.path.join(code_dir, name), 0o644)
    if backend == "bwrap":
      command = _bwrap_command(workdir, code_dir, config)
    else:
      command = [_PYTHON, "-I", "-S", "-B", os.path.join(code_dir, "_boot.py")]
      if backend == "unshare":
        command = [shutil.which("unshare"), *_UNSHARE_FLAGS] + command
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    if backend == "bwrap":   # bwrap passes the environment through; set it for the child
      env = {"PATH": "/usr/bin:/bin"}
      command[1:1] = ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG",
                      "C.UTF-8", "--setenv", "HOME", workdir, "--setenv", "TMPDIR", workdir]
    return _supervise(command, workdir, env, config, backend, isolated)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(code_dir, ignore_errors=True)


def _supervise(command: list[str], workdir: str, env: dict[str, str], config: SandboxConfig,
               backend: str, isolated: bool) -> SandboxResult:
  cgroup = _Cgroup(config)
  try:
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    return _watch(proc, cgroup, config, backend, isolated)
  finally:
    cgroup.close()


def _wait_for_boot(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
  """Waits until the tree under `proc` holds the Python that will read "go": after that the
  launcher forks nothing more, so moving the tree into the cgroup cannot miss a process."""
  deadline = time.monotonic() + timeout_s
  python = _PYTHON.encode()
  while time.monotonic() < deadline and proc.poll() is None:
    for pid in _process_tree(proc.pid):
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          argv = f.read().split(b"\0")
      except OSError:
        continue
      if argv[0] == python and any(a.endswith(b"_boot.py") for a in argv):
        return
    time.sleep(0.002)


def _watch(proc: subprocess.Popen, cgroup: _Cgroup, config: SandboxConfig, backend: str,
           isolated: bool) -> SandboxResult:
  def kill() -> None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  if cgroup.dirs:
    cgroup.add_tree(proc.pid)   # at once: what it forks from now on is born inside
    _wait_for_boot(proc)
    cgroup.add_tree(proc.pid)   # and anything it forked before that
  try:
    proc.stdin.write(b"go\n")
    proc.stdin.close()
  except OSError:
    pass
  out, err = bytearray(), bytearray()
  overflow = threading.Event()
  readers = [threading.Thread(target=_reader, args=(s, config.output_bytes, b, overflow, kill),
                              daemon=True) for s, b in ((proc.stdout, out), (proc.stderr, err))]
  for t in readers:
    t.start()
  # Reap with wait4 rather than Popen.wait to get the rusage of the child and everything it
  # reaped: under a PID namespace a SIGXCPU death is reported as a plain exit status, so the
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
  # bwrap reports a child killed by signal s as exit status 128 + s.
  signalled = {-code if code is not None and code < 0 else
               code - 128 if code is not None and code > 128 else None}
  limit = None
  if overflow.is_set():
    limit = "output"
  elif timed_out:
    limit = "wall"
  elif cgroup.hit("memory") or "MemoryError" in stderr:
    limit = "memory"
  elif signalled & {signal.SIGXCPU, signal.SIGKILL} or cpu_used >= config.cpu_s - 0.05:
    limit = "cpu"
  elif signal.SIGXFSZ in signalled or "File too large" in stderr:
    limit = "file_size"
  elif cgroup.hit("pids") or "Resource temporarily unavailable" in stderr:
    limit = "processes"
  if limit == "output":
    stdout += "\n[output truncated]" if len(out) >= config.output_bytes else ""
    stderr += "\n[output truncated]" if len(err) >= config.output_bytes else ""
  return SandboxResult(stdout, stderr, code, limit, isolated, readonly_root, backend,
                       "cgroup" if "pids" in cgroup.dirs else "rlimit",
                       "cgroup" if "memory" in cgroup.dirs else "rlimit")


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
