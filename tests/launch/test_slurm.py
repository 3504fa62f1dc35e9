"""The SLURM path for real: `launch/slurm_task.sh` as two local tasks of a fake SLURM job, and
how `wakea_jax.parallel.distributed` reads a SLURM environment."""

import json
import os
import random
import socket
import subprocess
import sys
import time

import jax
import pytest

from tests.parallel import cluster
from wakea_jax.parallel import distributed


def _slurm_job_id() -> int:
  """A job id whose coordinator port (61440 + id % 4096, as slurm_task.sh derives it) is free."""
  for _ in range(100):
    job_id = random.randrange(1, 10**6)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job_id % 4096))
      except OSError:
        continue
    return job_id
  raise RuntimeError("no free port in 61440-65535")


def test_sft_runs_as_two_slurm_tasks(tmp_path):
  """What `srun` does on two hosts, on one machine: same command, SLURM variables per task."""
  workdir, logs = tmp_path / "work", tmp_path / "logs"
  logs.mkdir()
  job_id = _slurm_job_id()
  command = ["bash", "launch/slurm_task.sh", sys.executable, "-m", "wakea_jax.train",
             "--config=configs/sft.py:test", f"--workdir={workdir}", "--config.mesh.data=-1",
             "--config.train.steps=2", "--config.train.eval_every=2",
             "--config.train.checkpoint_every=2"]
  procs = []
  start = time.monotonic()
  for task in range(2):
    slurm = dict(SLURM_JOB_ID=str(job_id), SLURM_NTASKS="2", SLURM_NNODES="2",
                 SLURM_PROCID=str(task), SLURM_LOCALID="0", SLURM_NODEID=str(task),
                 SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                 SLURM_STEP_NUM_NODES="2")
    # One process with no JAX_* variables: slurm_task.sh sets them from the SLURM ones.
    env = cluster.process_env(task, 1, 2, 0, extra=slurm)
    with open(logs / f"process_{task}.log", "w") as log:
      procs.append(subprocess.Popen(command, cwd=cluster.REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
  results = cluster.wait(procs, logs, timeout=300)
  print(f"two SLURM tasks took {time.monotonic() - start:.1f} s")
  cluster.check(results)
  for task, result in enumerate(results):
    assert f"jax.distributed: process {task} of 2, 2 local / 4 global devices" in result.output
  metrics = (workdir / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in metrics]
  assert steps == [1, 2]
  assert (workdir / "checkpoints" / "2").is_dir()


@pytest.fixture
def fake_jax_init(monkeypatch):
  """Records jax.distributed.initialize's arguments instead of starting a cluster."""
  calls = []
  for name in list(os.environ):
    if name.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                        "TPU_WORKER", "MEGASCALE", "JOB_COMPLETION_INDEX", "WAKEA_")):
      monkeypatch.delenv(name)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  return calls


def test_slurm_task_variables_switch_off_jax_detection(fake_jax_init, monkeypatch):
  # JAX's SLURM detection would set the visible GPUs to [SLURM_LOCALID]: one GPU per host.
  for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="1",
                          SLURM_LOCALID="0", SLURM_STEP_NODELIST="n1,n2",
                          JAX_COORDINATOR_ADDRESS="n1:61447", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID="1").items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize()
  assert fake_jax_init == [dict(coordinator_address="n1:61447", num_processes=2, process_id=1,
                                cluster_detection_method="deactivate")]


def test_one_task_slurm_job_is_single_process(fake_jax_init, monkeypatch):
  for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_PROCID="0",
                          SLURM_LOCALID="0", SLURM_STEP_NODELIST="n1").items():
    monkeypatch.setenv(name, value)
  assert not distributed.initialize()
  monkeypatch.delenv("SLURM_STEP_NODELIST")   # an salloc shell: no step
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert not distributed.initialize()
  assert fake_jax_init == []


def test_bare_srun_and_tpu_vms_use_jax_detection(fake_jax_init, monkeypatch):
  for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0",
                          SLURM_LOCALID="0", SLURM_STEP_NODELIST="n1,n2").items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize()
  for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_STEP_NODELIST"):
    monkeypatch.delenv(name)
  monkeypatch.setenv("WAKEA_DISTRIBUTED", "1")   # launch/tpu_pod.sh: TPU metadata
  assert distributed.initialize()
  assert fake_jax_init == 2 * [dict(coordinator_address=None, num_processes=None,
                                    process_id=None, cluster_detection_method=None)]
