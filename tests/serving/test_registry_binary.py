"""`python -m wakea_jax.registry` on a temporary registry with two fake versions."""

import json
import os
import subprocess
import sys

import pytest

from wakea_jax import registry as binary
from wakea_jax.serving.registry import Registry, RegistryError

ROWS = [{"task": "arithmetic", "category": "addition", "difficulty": "medium", "accuracy": a,
         "n": 20, "options": {"max_operand": 99, "tools": 0}} for a in (0.9, 0.4)]


def cli(registry, *args, check=True):
  env = dict(os.environ, WAKEA_REGISTRY=str(registry))
  out = subprocess.run([sys.executable, "-m", "wakea_jax.registry", *args], env=env,
                       capture_output=True, text=True, timeout=300)
  if check and out.returncode:
    raise AssertionError(f"{args}: rc {out.returncode}\n{out.stdout}\n{out.stderr}")
  return out


def checkpoint(path, marker):
  path.mkdir()
  (path / marker).write_text("{}")
  return str(path)


def test_subcommands_in_a_subprocess(tmp_path):
  reg_dir = tmp_path / "reg"
  ck1, ck2 = checkpoint(tmp_path / "ck1", "config.json"), checkpoint(tmp_path / "ck2",
                                                                    "model_config.json")
  assert cli(reg_dir, "register", "--name=tiny", f"--checkpoint={ck1}", "--objective=sft",
             "--data_sources=task:arithmetic?n=10,extra.jsonl").stdout == "registered tiny:1\n"
  assert cli(reg_dir, "register", "--name=tiny", f"--checkpoint={ck2}", "--parent=tiny:1",
             "--objective=grpo", "--config=configs/grpo.py:test").stdout == "registered tiny:2\n"
  # Figures as the server's bench would record them; evaluations as `evaluate` would.
  reg = Registry(reg_dir)
  reg.record_eval("tiny", 1, [dict(ROWS[0])])
  reg.record_eval("tiny", 2, [dict(ROWS[1])])
  figures = tmp_path / "bench.json"
  figures.write_text(json.dumps({"p50_latency_ms": 40.0, "p95_latency_ms": 90.0,
                                 "tokens_per_s": 300.0, "peak_memory_mb": 800.0}))
  assert cli(reg_dir, "record-serving", "tiny:2", f"--figures={figures}").stdout == (
      "tiny:2: serving figures recorded\n")
  reg.record_serving("tiny", 1, {"p95_latency_ms": 150.0, "tokens_per_s": 200.0,
                                 "peak_memory_mb": 600.0})
  assert cli(reg_dir, "promote", "tiny:1").stdout == "tiny@production -> 1\n"
  assert cli(reg_dir, "promote", "tiny:2").stdout == "tiny@production -> 2 (was 1)\n"

  listed = cli(reg_dir, "list").stdout.splitlines()
  assert listed[0].split() == ["model", "version", "stages", "kind", "created", "parent",
                               "objective", "accuracy", "p95", "ms", "tok/s", "mem", "MB"]
  assert listed[2].split()[:4] == ["tiny", "1", "-", "hf"]
  assert listed[3].split()[:4] == ["tiny", "2", "production", "native"]
  assert listed[3].split()[5:] == ["tiny:1", "grpo", "0.400", "90.000", "300.000", "800.000"]

  shown = cli(reg_dir, "show", "tiny@production").stdout
  assert shown.startswith("tiny:2  (production)\n") and "parent: tiny:1" in shown
  assert "config: recorded" in shown and "arithmetic  addition  medium      0.400     20" in shown
  assert "p95_latency_ms  90.000" in shown

  compared = cli(reg_dir, "compare", "tiny:1", "tiny@production").stdout.splitlines()
  assert compared[0].split() == ["section", "metric", "tiny:1", "tiny:2", "delta"]
  assert ["eval", "overall", "accuracy", "0.900", "0.400", "-0.500"] in [
      line.split() for line in compared]
  assert ["serving", "p95_latency_ms", "150.000", "90.000", "-60.000"] in [
      line.split() for line in compared]

  weak = cli(reg_dir, "weaknesses", "tiny:2", "--threshold=0.5", "--margin=0.1",
             f"--targeted_out={tmp_path / 'weak.jsonl'}", "--n_per_category=5",
             "--config=configs/grpo.py:test", f"--workdir={tmp_path / 'followup'}",
             "--follow_up_override=train.steps=2").stdout
  assert "tiny:2: 1 weakness(es) (threshold 0.5, margin 0.1, parent tiny:1)" in weak
  assert ("arithmetic/addition/medium (n=20): accuracy 0.400 < threshold 0.500; regressed from "
          "0.900 by 0.500 (> margin 0.100)") in weak
  assert f"wrote 5 prompts records to {tmp_path / 'weak.jsonl'}" in weak
  assert (f"-m wakea_jax.train --config=configs/grpo.py:test --workdir={tmp_path / 'followup'}"
          f" --config.init_from={ck2} --config.data.sources={tmp_path / 'weak.jsonl'}"
          " --config.train.steps=2") in weak
  assert len((tmp_path / "weak.jsonl").read_text().splitlines()) == 5

  role = tmp_path / "role.json"
  role.write_text(json.dumps({"role": "batch grader", "criteria": {
      "accuracy": {"weight": 3}, "tokens_per_s": {"weight": 1},
      "latency_ms": {"weight": 0, "max": 120}}}))
  selected = cli(reg_dir, "select", f"--role={role}").stdout
  assert "role: batch grader   selected: tiny:2" in selected
  assert "tiny:1: latency_ms 150 > 120" in selected
  written = sorted(p.suffix for p in (reg_dir / "selections").iterdir())
  assert written == [".json", ".md"]

  bad = cli(reg_dir, "show", "tiny:9", check=False)
  assert bad.returncode == 1 and "registry show: 'tiny' has no version 9; versions: 1, 2" in (
      bad.stderr)
  bad = cli(reg_dir, "frobnicate", check=False)
  assert bad.returncode == 1 and "unknown command 'frobnicate'" in bad.stderr


def test_run_argument_errors(tmp_path):
  with pytest.raises(RegistryError, match="--registry"):
    binary.run("list", [], registry="")
  assert binary.run("list", [], registry=str(tmp_path)).startswith("(no models registered")
  with pytest.raises(RegistryError, match=r"compare takes 2 argument\(s\), got \['a'\]"):
    binary.run("compare", ["a"], registry=str(tmp_path))
  with pytest.raises(RegistryError, match="expected NAME:VERSION, got 'tiny'"):
    binary.run("promote", ["tiny"], registry=str(tmp_path))
  with pytest.raises(RegistryError, match="register needs --name and --checkpoint"):
    binary.run("register", [], registry=str(tmp_path), name="x")
  reg = Registry(tmp_path)
  reg.register("tiny", checkpoint(tmp_path / "ck", "config.json"))
  with pytest.raises(RegistryError, match="evaluate needs --config"):
    binary.run("evaluate", ["tiny"], registry=str(tmp_path))
  with pytest.raises(RegistryError, match="tiny:1 has no recorded evaluation"):
    binary.run("weaknesses", ["tiny"], registry=str(tmp_path))
  reg.record_eval("tiny", 1, ROWS[:1])
  assert binary.run("weaknesses", ["tiny"], registry=str(tmp_path)).startswith(
      "tiny:1: 0 weakness(es) (threshold 0.5, margin 0.05, no parent)")
