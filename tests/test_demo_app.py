"""demo_app.StageTimes: a demonstration's re-run reports the time its stages took to train,
not the time it took to find them finished."""

import json
import operator
import os
import pathlib
import time

import pytest

from wakea_jax import demo_app


def test_a_skipped_stage_keeps_the_time_of_the_run_that_trained_it(tmp_path):
  run_dir = tmp_path / "sft"

  def stage(train: bool) -> str:   # a trainer: appends to metrics.jsonl only when it trains
    if train:
      run_dir.mkdir(exist_ok=True)
      with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1}\n')
      time.sleep(0.05)
    return "out"

  first = demo_app.StageTimes(tmp_path)
  assert first.run("sft", stage, True, run_dir=run_dir) == "out"
  first.run("eval", time.sleep, 0.02)
  assert first.seconds["sft"] >= 0.05 and first.seconds["eval"] >= 0.02
  (tmp_path / "results.json").write_text(json.dumps({"timing_s": first.seconds}))

  again = demo_app.StageTimes(tmp_path)
  again.run("sft", stage, False, run_dir=run_dir)   # found finished: the old time stays
  again.run("eval", lambda: None)                     # no run directory: timed anew
  assert again.seconds["sft"] == first.seconds["sft"]
  assert again.seconds["eval"] < 0.02
  resumed = demo_app.StageTimes(tmp_path)             # trained further: its own time
  resumed.run("sft", stage, True, run_dir=run_dir)
  assert resumed.seconds["sft"] != first.seconds["sft"]
  (tmp_path / "results.json").write_text("not json")  # unreadable: every stage timed anew
  assert demo_app.StageTimes(tmp_path).previous == {}


def test_cpu_shares_split_the_cpus_into_contiguous_shares():
  assert demo_app.cpu_shares(2, [0, 1]) == [[0], [1]]
  assert demo_app.cpu_shares(2, [0, 1, 2]) == [[0, 1], [2]]
  assert demo_app.cpu_shares(4, [3, 5]) == [[3], [5]]      # no more shares than CPUs
  assert demo_app.cpu_shares(1, [0, 1, 2, 3]) == [[0, 1, 2, 3]]


def test_run_jobs_runs_each_job_in_a_worker_process_on_its_share_of_the_cpus(tmp_path):
  jobs = [(0,), (0,), (0,)]
  out = demo_app.run_jobs(os.sched_getaffinity, jobs, workers=2, log_dir=tmp_path)
  shares = [set(s) for s in demo_app.cpu_shares(2)]
  assert len(out) == 3 and all(s in shares for s in out)
  if len(shares) == 2:          # two at a time: both shares were used
    assert {frozenset(s) for s in out} == {frozenset(s) for s in shares}
  pids = demo_app.run_jobs(os.getpid, [(), ()], workers=2, log_dir=tmp_path)
  assert os.getpid() not in pids and len(set(pids)) == 2
  # One worker (or one job): in this process.
  assert demo_app.run_jobs(os.getpid, [(), ()], workers=1, log_dir=tmp_path) == [os.getpid()] * 2
  assert demo_app.run_jobs(operator.add, [(1, 2), (3, 4)], workers=2, log_dir=tmp_path) == [3, 7]
  assert not list(tmp_path.glob("*.pkl*"))     # job and result files are cleaned up


def test_a_failing_worker_is_reported_with_its_job_and_log(tmp_path):
  with pytest.raises(RuntimeError, match=r"(?s)job b \(_operator.truediv\) exited with status 1"
                                         r".*b\.log.*ZeroDivisionError"):
    demo_app.run_jobs(operator.truediv, [(1, 2), (1, 0)], workers=2, log_dir=tmp_path,
                      names=["a", "b"])
  with pytest.raises(ValueError, match="not a module-level function"):
    demo_app.run_jobs(lambda: 0, [(), ()], workers=2, log_dir=tmp_path)
  with pytest.raises(ValueError, match="3 names for 2 jobs"):
    demo_app.run_jobs(operator.add, [(1, 2), (3, 4)], workers=2, log_dir=tmp_path,
                      names=["a", "b", "c"])


def _workers_running(log_dir) -> list[int]:
  """Processes whose command line names a job file under `log_dir`."""
  pids = []
  for proc in pathlib.Path("/proc").iterdir():
    try:
      cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
      continue
    if proc.name.isdigit() and str(log_dir) in cmdline:
      pids.append(int(proc.name))
  return pids


def test_no_worker_outlives_a_failure_of_the_parent(tmp_path):
  # The second job cannot be pickled: run_jobs fails while the first (a 60 s sleep) runs.
  start = time.monotonic()
  with pytest.raises(Exception, match="lambda|pickle"):
    demo_app.run_jobs(time.sleep, [(60,), (lambda: 0,)], workers=2, log_dir=tmp_path)
  assert time.monotonic() - start < 30
  deadline = time.monotonic() + 2.0     # a just-started process can take a moment to show
  while time.monotonic() < deadline:
    assert not _workers_running(tmp_path)
    time.sleep(0.1)
