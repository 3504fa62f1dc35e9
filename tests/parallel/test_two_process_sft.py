"""SFT as a real two-process JAX job (2 processes x 4 CPU devices, gloo collectives) against
the same run as 1 process x 8 devices, and a two-process run killed mid-way and resumed.

Every run is `python -m wakea_jax.train --config=configs/sft.py:test` in child processes
started by `cluster.py`, with the same settings: a (data, fsdp, tensor) = (2, 2, 2) mesh, so
that FSDP and tensor sharding span both processes, and data.shards=2, so that both process
counts read the same global batches (data/pipeline.py). What must hold:
  * the per-step losses (workdir/metrics.jsonl) and the exported parameters (process 0
    writes the export from parameters gathered across processes) of the two-process run
    equal the one-process run's within 1e-5;
  * a two-process run SIGKILLed after its step-2 checkpoint (one process killed, then the
    other, which would otherwise wait in a collective), restarted with the same command,
    resumes from its last checkpoint and ends with the same losses and parameters as the
    uninterrupted two-process run.
The runs are module-scoped fixtures shared by the assertions.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.parallel import cluster

pytestmark = pytest.mark.slow

STEPS = 8
TOLERANCE = 1e-5
RUN_TIMEOUT_S = 300

# Shrunk from configs/sft.py:test for speed; checkpoints every 2 steps for the kill test.
OVERRIDES = {
    "train.steps": STEPS, "train.checkpoint_every": 2, "train.log_every": 1,
    "train.eval_every": STEPS, "train.keep_checkpoints": 2,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    "data.shards": 2, "data.batch_size": 8, "data.eval_batch_size": 8, "data.eval_batches": 1,
    "data.seq_len": 64, "model.max_seq_len": 64,
    "model.embed_dim": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.head_dim": 16, "model.mlp_dim": 64,
    "export.enabled": True, "export.hf": False,
}


def _argv(workdir: pathlib.Path) -> list[str]:
  return (["-m", "wakea_jax.train", "--config=configs/sft.py:test", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def _run(workdir: pathlib.Path, num_processes: int) -> list[cluster.Result]:
  results = cluster.run(_argv(workdir), num_processes=num_processes,
                        devices_per_process=8 // num_processes, log_dir=workdir / "logs",
                        timeout=RUN_TIMEOUT_S)
  cluster.check(results)
  return results


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  """step -> loss, the last record per step winning (a resumed run re-logs its steps)."""
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out[record["step"]] = record["loss"]
  return out


def _exported_params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  """The exported model's parameters as NumPy, by dotted path."""
  from flax import nnx  # noqa: PLC0415 (keeps JAX out of the collection phase)

  from wakea_jax.checkpoints import export  # noqa: PLC0415
  model = export.load_model_dir(workdir / "export" / "model")
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def _max_diff(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64))))
             for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
  """The uninterrupted two-process and one-process runs."""
  root = tmp_path_factory.mktemp("sft_processes")
  out = {}
  for name, processes in (("two", 2), ("one", 1)):
    out[name] = root / name
    results = _run(out[name], processes)
    if processes == 2:  # process 1 logs warnings and errors only (logs.py)
      assert "metrics.py" not in results[1].output and "] [1] loss=" in results[0].output
  return out


def test_two_processes_train_like_one(runs):
  two, one = _losses(runs["two"]), _losses(runs["one"])
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  diff = max(abs(two[s] - one[s]) for s in one)
  print(f"max |loss diff| 2 vs 1 process: {diff:.3g}")
  assert diff < TOLERANCE, (two, one)
  params_diff = _max_diff(_exported_params(runs["two"]), _exported_params(runs["one"]))
  print(f"max |param diff| 2 vs 1 process: {params_diff:.3g}")
  assert params_diff < TOLERANCE
  # Process 0 alone writes the single-file outputs (one metrics file, one export).
  assert (runs["two"] / "export" / "model" / "model_config.json").exists()


def _wait_for(path: pathlib.Path, procs: list[subprocess.Popen], timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError(f"{path} did not appear (process exit codes "
                           f"{[p.poll() for p in procs]})")
    time.sleep(0.05)


def test_killed_two_process_run_resumes_to_the_same_result(runs, tmp_path):
  workdir = tmp_path / "killed"
  logs = workdir / "logs"
  procs = cluster.start(_argv(workdir), num_processes=2, devices_per_process=4, log_dir=logs)
  try:
    # The step-2 checkpoint is complete once process 0 has written its manifest.
    _wait_for(workdir / "checkpoints" / "manifests" / "2.json", procs, RUN_TIMEOUT_S)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=30)
    try:  # process 0 fails or hangs in its next collective: a scheduler would kill it
      procs[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
      procs[0].send_signal(signal.SIGKILL)
      procs[0].wait(timeout=30)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert procs[1].returncode == -signal.SIGKILL, "the run finished before it was killed"
  assert not (workdir / "export").exists()
  killed_at = max(_losses(workdir))
  assert killed_at < STEPS
  # The newest step whose save finished (process 0 wrote its manifest) is where to resume;
  # a newer one without a manifest is only used when no verified step restores.
  verified = max(int(p.stem) for p in (workdir / "checkpoints" / "manifests").glob("*.json"))

  os.rename(logs, workdir / "logs_killed")
  results = _run(workdir, 2)
  resumed = [line for line in results[0].output.splitlines() if "resumed from step" in line]
  assert resumed, results[0].output[-3000:]
  step = int(resumed[0].split("resumed from step ")[1].split()[0])
  assert step == verified and 2 <= step <= killed_at, (step, verified, killed_at)
  straight, again = _losses(runs["two"]), _losses(workdir)
  assert sorted(again) == list(range(1, STEPS + 1))
  diff = max(abs(again[s] - straight[s]) for s in range(step + 1, STEPS + 1))
  print(f"resumed from step {step} (killed after step {killed_at}); max |loss diff| after "
        f"resume: {diff:.3g}")
  assert diff < TOLERANCE
  params_diff = _max_diff(_exported_params(workdir), _exported_params(runs["two"]))
  print(f"max |param diff| resumed vs uninterrupted: {params_diff:.3g}")
  assert params_diff < TOLERANCE


def test_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
  # The two-process run's step-6 checkpoint (arrays written by both processes, every data
  # shard's state gathered by process 0), resumed by one process with 8 devices.
  workdir = tmp_path / "moved"
  shutil.copytree(runs["two"], workdir, ignore=shutil.ignore_patterns("export", "logs"))
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  (workdir / "checkpoints" / "manifests" / f"{STEPS}.json").unlink()
  results = _run(workdir, 1)
  assert "resumed from step 6" in results[0].output
  straight, again = _losses(runs["two"]), _losses(workdir)
  diff = max(abs(again[s] - straight[s]) for s in (7, 8))
  params_diff = _max_diff(_exported_params(workdir), _exported_params(runs["two"]))
  print(f"2-process checkpoint resumed on 1 process: max |loss diff| {diff:.3g}, "
        f"max |param diff| {params_diff:.3g}")
  assert diff < TOLERANCE and params_diff < TOLERANCE


DPO_OVERRIDES = {
    "train.steps": 2, "train.log_every": 1, "train.checkpoint_every": 2,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.num_kv_heads": 2,
    "data.eval_sources": "()",  # no eval: the reference log-probs and 2 steps are the check
}


def test_two_process_dpo_equals_one_process(tmp_path):
  # Every process holds every pair and feeds its rows of the global [chosen; rejected]
  # batch; the reference log-probs are computed on the mesh (train/preference.py).
  losses = {}
  for processes in (2, 1):
    workdir = tmp_path / f"dpo{processes}"
    argv = (["-m", "wakea_jax.train", "--config=configs/dpo.py:test", f"--workdir={workdir}"]
            + [f"--config.{k}={v}" for k, v in DPO_OVERRIDES.items()])
    cluster.check(cluster.run(argv, num_processes=processes,
                              devices_per_process=8 // processes, log_dir=workdir / "logs",
                              timeout=RUN_TIMEOUT_S))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses[processes] = {(r["step"], k): r[k] for r in records for k in ("loss", "eval_loss")
                         if k in r}
  assert sorted(losses[2]) == sorted(losses[1]) == [(1, "loss"), (2, "loss")]
  diff = max(abs(losses[2][k] - losses[1][k]) for k in losses[1])
  print(f"DPO 2 vs 1 process: max |loss diff| {diff:.3g}")
  assert diff < TOLERANCE, losses
