"""Every launcher under --dry_run prints what it would run, and runs nothing."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
SFT = ["--config=configs/sft.py:quickstart", "--workdir=gs://bucket/runs/sft",
       "--config.data.sources=(('task:arithmetic?n=10', 1.0),)"]


def launch(argv: list[str], **env: str) -> list[str]:
  """Runs a launcher with a clean environment plus `env`; returns its output lines."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "JAX_", "TPU_", "DRY_RUN", "SETUP", "PROJECT"))}
  out = subprocess.run(argv, cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                       check=True, timeout=60)
  return out.stdout.splitlines()


def test_tpu_pod_dry_run_copies_installs_and_runs_on_every_worker():
  lines = launch(["launch/tpu_pod.sh", "--dry_run", *SFT], TPU_NAME="pod", ZONE="us-east5-a",
                 PROJECT="proj")
  commands = [shlex.split(line) for line in lines]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [c[:4] for c in commands] == [["git", "-C", str(REPO), "archive"], gcloud,
                                       ["rm", "-f", commands[0][-2]], gcloud, gcloud]
  assert commands[1][4] == "scp" and commands[3][4] == commands[4][4] == "ssh"
  for c in commands[1], commands[3], commands[4]:
    assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(c)
  assert "pip install -q -e ./wakea_jax" in commands[3][-1]
  train = commands[4][-1].removeprefix("--command=")
  assert train.startswith("cd wakea_jax && WAKEA_DISTRIBUTED=1 python3 -m wakea_jax.train ")
  # The remote shell gets back exactly the arguments given here.
  assert shlex.split(train)[-3:] == SFT


def test_tpu_pod_dry_run_without_setup_runs_one_command():
  lines = launch(["launch/tpu_pod.sh", *SFT], TPU_NAME="pod", ZONE="z", SETUP="0", DRY_RUN="1",
                 MODULE="wakea_jax.evaluate")
  assert len(lines) == 1 and "--worker=all" in lines[0]
  assert "python3 -m wakea_jax.evaluate" in lines[0]


def test_tpu_pod_needs_a_name_and_zone():
  with pytest.raises(subprocess.CalledProcessError) as e:
    launch(["launch/tpu_pod.sh", "--dry_run", *SFT], ZONE="z")
  assert "TPU_NAME" in e.value.stderr


def test_slurm_sbatch_dry_run_is_one_srun_of_the_task_wrapper():
  script = (REPO / "launch/slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in script
  lines = launch(["bash", "launch/slurm.sbatch", "--dry_run", *SFT])
  assert len(lines) == 1
  command = shlex.split(lines[0])
  assert command[:6] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         "launch/slurm_task.sh", "python", "-m"]
  assert command[6:] == ["wakea_jax.train", *SFT]


@pytest.mark.parametrize("nodelist, head", [
    ("node7", "node7"), ("node7,gpu2", "node7"), ("node[003-010,12],gpu1", "node003"),
    ("gpu-a[5,7-9]", "gpu-a5")])
def test_slurm_task_maps_slurm_variables_to_jax_ones(nodelist, head):
  lines = launch(["launch/slurm_task.sh", "--dry_run", "python", "-m", "wakea_jax.train", *SFT],
                 SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_PROCID="3",
                 SLURM_STEP_NODELIST=nodelist, PATH="/usr/bin:/bin")   # no scontrol
  port = 61440 + 4242 % 4096
  assert lines[0] == (f"JAX_COORDINATOR_ADDRESS={head}:{port} JAX_NUM_PROCESSES=4 "
                      "JAX_PROCESS_ID=3")
  assert shlex.split(lines[1]) == ["python", "-m", "wakea_jax.train", *SFT]


def test_slurm_task_port_override_and_missing_job():
  lines = launch(["launch/slurm_task.sh", "--dry_run", "true"], SLURM_JOB_ID="1",
                 SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_JOB_NODELIST="h1",
                 JAX_COORDINATOR_PORT="1234")
  assert lines[0].startswith("JAX_COORDINATOR_ADDRESS=h1:1234 ")
  with pytest.raises(subprocess.CalledProcessError) as e:
    launch(["launch/slurm_task.sh", "--dry_run", "true"])
  assert "not inside a SLURM job" in e.value.stderr


def test_kubernetes_manifest_is_an_indexed_job_with_a_headless_service():
  lines = launch([sys.executable, "launch/k8s/launch.py", "--name=sft", "--image=reg/wakea:1",
                  "--hosts=4", "--gpus_per_host=8", "--dry_run", "--",
                  "python", "-m", "wakea_jax.train", *SFT])
  assert lines[-1].startswith("# would run: kubectl apply -f -")
  service, job = yaml.safe_load_all("\n".join(lines))
  assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
  assert service["spec"]["selector"] == {"job-name": "sft"}
  assert job["kind"] == "Job"
  spec = job["spec"]
  assert spec["completionMode"] == "Indexed"
  assert spec["completions"] == spec["parallelism"] == 4
  pod = spec["template"]["spec"]
  assert pod["subdomain"] == service["metadata"]["name"] == "sft"
  assert spec["template"]["metadata"]["labels"] == {"job-name": "sft"}
  (container,) = pod["containers"]
  assert container["image"] == "reg/wakea:1"
  assert container["command"] == ["python", "-m", "wakea_jax.train", *SFT]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  env = {e["name"]: e["value"] for e in container["env"]}
  # Pod 0's stable name under the headless Service; the process id is JOB_COMPLETION_INDEX,
  # which Kubernetes sets itself and wakea_jax.parallel.distributed reads.
  port = service["spec"]["ports"][0]["port"]
  assert env == {"JAX_COORDINATOR_ADDRESS": f"sft-0.sft:{port}", "JAX_NUM_PROCESSES": "4"}


def test_kubernetes_rejects_a_bad_name():
  with pytest.raises(subprocess.CalledProcessError) as e:
    launch([sys.executable, "launch/k8s/launch.py", "--name=My_Job", "--image=i", "--hosts=2",
            "--dry_run", "--", "true"])
  assert "DNS label" in e.value.stderr


def test_local_dry_run_prints_one_command_per_process():
  lines = launch(["launch/local.sh", "--dry_run", *SFT], NUM_PROCESSES="3",
                 DEVICES_PER_PROCESS="2", LOG_DIR="/tmp/logs", JAX_COORDINATOR_PORT="5000",
                 PYTHON="python3")
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:6] == ["env", "JAX_COORDINATOR_ADDRESS=127.0.0.1:5000", "JAX_NUM_PROCESSES=3",
                         f"JAX_PROCESS_ID={i}", "JAX_PLATFORMS=cpu",
                         "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert words[6:-4] == ["python3", "-m", "wakea_jax.train", *SFT]
    assert words[-4:] == [">", f"/tmp/logs/process_{i}.log", "2>&1", "&"]
