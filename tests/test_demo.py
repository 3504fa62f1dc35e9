"""The foundation demo binary runs end to end on the 8-device test mesh."""

import pathlib

import pytest

from wakea_jax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**mesh):
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.timing_steps = 1
  config.mesh.update(mesh)
  return config


def test_demo_runs_sharded_and_round_trips_through_hf(tmp_path):
  results = demo.run(_config(data=2, fsdp=2, tensor=2), tmp_path)
  assert results["export_roundtrip_max_abs"] < 1e-5
  assert abs(results["loss"] - results["uniform_loss"]) < 0.1  # random init ~ uniform
  assert results["assistant_tokens"] > 0
  assert (tmp_path / "hf_export" / "config.json").exists()


def test_demo_reports_bad_data_file(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"messages": []}\n{"oops": 1}\n')
  config = _config()
  config.data = str(bad)
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'messages' is missing"):
    demo.run(config, tmp_path)
