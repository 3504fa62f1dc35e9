"""GRPO as a real two-process job (2 processes x 4 CPU devices, gloo, coordinator on
127.0.0.1) against the same run as 1 process x 8 devices: the same per-step losses,
rewards and evaluation, and the same final parameters, within 1e-5.

The mesh is (data 2, fsdp 2, tensor 2), so parameters are sharded across the two processes
(FSDP and tensor parallelism), the sampler's batch and KV cache are split between them, and
each process samples, rewards and scores its own half of the prompts.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from tests.parallel import cluster
from wakea_jax.checkpoints import loader

pytestmark = pytest.mark.slow

ARGS = ["tests/parallel/rl_child.py", "--config=tests/parallel/rl_config.py",
        "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.export.enabled=true", "--config.data.shards=2",
        # kl on: the reference policy is scored on the mesh too
        "--config.loss.kl_beta=0.05"]
# Figures that are host-local timings or throughput, not results.
_TIMING = ("time/", "tokens_per_s", "steps_per_s", "eta", "tflops", "mfu", "seconds")


def _train(workdir: pathlib.Path, processes: int) -> list[dict]:
  results = cluster.run([*ARGS, f"--workdir={workdir}"], num_processes=processes,
                        devices_per_process=8 // processes, log_dir=workdir / "logs",
                        timeout=900)
  cluster.check(results)
  if processes > 1:
    assert all("process 1 of 2" in r.output or "process 0 of 2" in r.output
               for r in results), "the processes did not form one job"
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("rl")
  two = _train(root / "two", 2)
  one = _train(root / "one", 1)
  return root, one, two


def _results(rows: list[dict]) -> dict[tuple[int, str], float]:
  out = {}
  for row in rows:
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and not any(t in k for t in _TIMING):
        out[(row["step"], k)] = float(v)
  return out


def test_two_processes_log_what_one_process_logs(runs):
  _, one, two = runs
  a, b = _results(one), _results(two)
  assert a.keys() == b.keys()
  assert {k for _, k in a} >= {"loss", "reward_mean", "logprob_gap_mean",
                               "eval_greedy_accuracy", "response_length"}
  for key in a:
    assert b[key] == pytest.approx(a[key], abs=1e-5), key
  assert a[(1, "reward_std")] > 0 and a[(1, "grad_norm")] > 1e-4   # a real update


def test_two_processes_train_the_same_parameters(runs):
  root, _, _ = runs
  params = []
  for name in ("one", "two"):
    model = loader.load_model(root / name / "export" / "model")
    params.append(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert len(params[0]) == len(params[1])
  worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
              for x, y in zip(*params))
  assert worst < 1e-5


def test_two_process_evaluation_of_the_export_matches_the_run(runs):
  """`python -m wakea_jax.evaluate` as two processes on the exported model reports what the
  run's own final evaluation logged (same prompts, seed and sampler settings)."""
  root, _, two = runs
  out = root / "eval.json"
  results = cluster.run(["-m", "wakea_jax.evaluate", "--config=tests/parallel/rl_config.py",
                         "--config.mesh.data=2", "--config.mesh.fsdp=2",
                         "--config.mesh.tensor=2", f"--checkpoint={root / 'two/export/model'}",
                         f"--output={out}"],
                        num_processes=2, devices_per_process=4, log_dir=root / "eval_logs",
                        timeout=600)
  cluster.check(results)
  result = json.loads(out.read_text())
  logged = {k: v for row in two if row["step"] == 2 for k, v in row.items()}
  for key in ("greedy_accuracy", "sample_accuracy", "pass@1", "pass@2"):
    assert result[key] == pytest.approx(logged[f"eval_{key}"], abs=1e-6), key
