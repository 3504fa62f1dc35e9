"""The command line every learning demonstration shares (`python -m wakea_jax.<name>_demo`).

`run_demo(run, default_config)` defines `--config` (an ml_collections config file, default
`default_config`, overridable with `--config.a.b=value`) and the required `--workdir`,
quietens the libraries' logs and calls `run(config, workdir)`: each demonstration is an
importable `run` plus this one line under `if __name__ == "__main__"`.

`StageTimes` times the stages of a demonstration for its results.json, across re-runs.

`run_jobs(fn, jobs, workers=N)` runs independent jobs (a demonstration's seeds) in N worker
processes at once, each pinned to its share of this process's CPUs with XLA's CPU threads
limited to that share; `python -m wakea_jax.demo_app JOB` is the worker. Why: the models of
the demonstrations (~1M parameters) do not keep two cores busy. One RL step of the SRL
demonstration's shapes took 3.04 s alone on 2 cores and 4.4 s each with two running at once
on a core each (Intel Xeon): 1.38x the throughput.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import time
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


class StageTimes:
  """Wall seconds of a demonstration's stages (its results.json "timing_s"), kept across
  re-runs: a stage that a re-run skips keeps the seconds measured by the run that did it,
  read from `workdir`/results.json, so the table reports training time, not the skip.

  A stage counts as skipped when its run directory's metrics.jsonl is the same file (size and
  modification time) after the stage as before: every trainer appends to it when it trains,
  and a finished run is returned as it is. Stages without a run directory are timed anew.
  """

  def __init__(self, workdir: str | os.PathLike[str]) -> None:
    path = pathlib.Path(workdir) / "results.json"
    self.previous: dict[str, float] = {}
    if path.exists():
      try:
        self.previous = dict(json.loads(path.read_text()).get("timing_s", {}))
      except (ValueError, AttributeError):   # unreadable: every stage is timed anew
        self.previous = {}
    self.seconds: dict[str, float] = {}

  def run(self, name: str, fn: Callable[..., Any], *args: Any,
          run_dir: str | os.PathLike[str] | None = None) -> Any:
    """`fn(*args)`, timed into `seconds[name]`; with `run_dir`, a skip keeps the old time."""
    metrics = None if run_dir is None else pathlib.Path(run_dir) / "metrics.jsonl"
    before = _stamp(metrics)
    start = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - start
    if before is not None and _stamp(metrics) == before and name in self.previous:
      seconds = float(self.previous[name])
    self.seconds[name] = seconds
    return out


def _stamp(path: pathlib.Path | None) -> tuple[int, int] | None:
  if path is None or not path.exists():
    return None
  stat = path.stat()
  return stat.st_size, stat.st_mtime_ns


# XLA flags of a worker given one CPU: Eigen's thread pool off (it would oversubscribe it).
_ONE_CPU_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_JOB_ENV = "WAKEA_JOB_CPUS"


def _result_file(job_file: pathlib.Path) -> pathlib.Path:
  """Where a worker pickles the result of `job_file` (written whole, then renamed)."""
  return job_file.with_name(job_file.name + ".out")


def cpu_shares(workers: int, cpus: Sequence[int] | None = None) -> list[list[int]]:
  """This process's CPUs (or `cpus`) split into `workers` contiguous shares, the first ones
  one larger when they do not divide evenly; fewer shares when there are fewer CPUs."""
  cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
  n = max(1, min(int(workers), len(cpus)))
  size, extra = divmod(len(cpus), n)
  shares, start = [], 0
  for i in range(n):
    end = start + size + (1 if i < extra else 0)
    shares.append(cpus[start:end])
    start = end
  return shares


def _reference(fn: Callable[..., Any]) -> tuple[str, str]:
  """(module, qualified name) by which a worker imports `fn`; a function of a script run as
  `python -m pkg.mod` is found under pkg.mod, not __main__."""
  module = fn.__module__
  if module == "__main__":
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None or not spec.name:
      raise ValueError(f"run_jobs: {fn.__qualname__} is defined in a script, which a worker "
                       "cannot import; define it in a module")
    module = spec.name
  if "<" in fn.__qualname__:
    raise ValueError(f"run_jobs: {module}.{fn.__qualname__} is not a module-level function")
  return module, fn.__qualname__


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], *, workers: int,
             log_dir: str | os.PathLike[str], names: Sequence[str] | None = None
             ) -> list[Any]:
  """[fn(*job) for job in jobs], run in `workers` processes at once (in this process, one
  after another, when workers <= 1 or there is one job).

  `fn` must be a module-level function; jobs and results travel by pickle. Each worker gets a
  share of this process's CPUs (`cpu_shares`) and writes its log to `log_dir`/NAME.log. A
  worker that fails raises RuntimeError naming the job, its exit status and its log's end,
  after the other running workers finish.
  """
  names = list(names) if names is not None else [f"job{i}" for i in range(len(jobs))]
  if len(names) != len(jobs):
    raise ValueError(f"run_jobs: {len(names)} names for {len(jobs)} jobs")
  if workers <= 1 or len(jobs) <= 1:
    return [fn(*job) for job in jobs]
  module, qualname = _reference(fn)
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  shares = cpu_shares(workers)
  results: dict[int, Any] = {}
  failures: list[str] = []
  pending = list(range(len(jobs)))
  # job -> (process, its CPU share, its job file, its open log)
  running: dict[int, tuple[subprocess.Popen, int, pathlib.Path, Any]] = {}
  free = list(range(len(shares)))
  try:
    while pending or running:
      while pending and free and not failures:
        i, share = pending.pop(0), free.pop(0)
        job_file = log_dir / f"{names[i]}.job.pkl"
        job_file.write_bytes(pickle.dumps({"module": module, "qualname": qualname,
                                           "args": tuple(jobs[i])}))
        env = dict(os.environ)
        cpus = shares[share]
        env[_JOB_ENV] = ",".join(map(str, cpus))
        if len(cpus) == 1:
          env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_ONE_CPU_FLAGS}".strip()
        log = (log_dir / f"{names[i]}.log").open("w")
        process = subprocess.Popen([sys.executable, "-m", "wakea_jax.demo_app", str(job_file)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        running[i] = (process, share, job_file, log)
      for i, (process, share, job_file, log) in list(running.items()):
        if process.poll() is None:
          continue
        log.close()
        del running[i]
        free.append(share)
        out = _result_file(job_file)
        if process.returncode == 0 and out.is_file():
          results[i] = pickle.loads(out.read_bytes())
          out.unlink()
          job_file.unlink()
        else:
          log_file = pathlib.Path(log.name)
          tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
          failures.append(f"job {names[i]} ({module}.{qualname}) exited with status "
                          f"{process.returncode}; the end of {log_file}:\n{tail}")
      if failures and not running:
        raise RuntimeError("\n\n".join(failures))
      time.sleep(0.2)
  except BaseException:   # an interrupt, or this process failing: no worker outlives it
    for process, _, _, log in running.values():
      process.kill()
      process.wait()
      log.close()
    raise
  return [results[i] for i in range(len(jobs))]


def _worker(job_file: str) -> None:
  """A `run_jobs` worker: pins itself to its CPUs, runs the job, pickles the result."""
  cpus = os.environ.get(_JOB_ENV)
  if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  logs.quiet_library_logs()
  job = pickle.loads(pathlib.Path(job_file).read_bytes())
  fn = importlib.import_module(job["module"])
  for part in job["qualname"].split("."):
    fn = getattr(fn, part)
  result = fn(*job["args"])
  out = _result_file(pathlib.Path(job_file))
  tmp = out.with_suffix(".tmp")
  tmp.write_bytes(pickle.dumps(result))
  tmp.replace(out)


__all__ = ["StageTimes", "cpu_shares", "run_demo", "run_jobs"]


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python -m wakea_jax.demo_app JOB_FILE (a run_jobs worker)")
  _worker(sys.argv[1])
