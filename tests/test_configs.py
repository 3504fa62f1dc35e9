"""Config files: variants, overrides, and absl's error on unknown keys."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from wakea_jax import config_lib
from wakea_jax.models.config import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=["prog"] + argv)
  fv(["prog"] + argv)
  return fv.config


# common.py holds the shared sections the others build on; it has no variants of its own.
@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.py")
                                        if p.name != "common.py"))
def test_every_config_file_loads(path):
  config = _parse([f"--config={ROOT / 'configs' / path}"])
  assert "seed" in config and "mesh" in config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_model_variants_and_overrides(preset):
  config = _parse([f"--config={ROOT / 'configs/model.py'}:{preset}",
                   "--config.model.num_layers=3", "--config.mesh.tensor=2",
                   "--config.model.remat_policy=dots"])
  model = config_lib.model_config_from(config.model)
  assert model.num_layers == 3 and model.remat_policy == "dots"
  assert model.vocab_size == PRESETS[preset].vocab_size
  assert config.mesh.tensor == 2


def test_unknown_override_key_fails():
  with pytest.raises(Exception, match='Did you mean "num_layers"'):
    _parse([f"--config={ROOT / 'configs/model.py'}", "--config.model.num_layerz=3"])


def test_invalid_model_value_is_reported_by_field():
  config = _parse([f"--config={ROOT / 'configs/model.py'}", "--config.model.num_kv_heads=3"])
  with pytest.raises(ValueError, match="num_kv_heads"):
    config_lib.model_config_from(config.model)


def test_mesh_and_rules_from_config():
  config = _parse([f"--config={ROOT / 'configs/model.py'}", "--config.mesh.data=2",
                   "--config.mesh.fsdp=2", "--config.mesh.tensor=-1"])
  mesh = config_lib.mesh_from(config)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  rules = dict(config_lib.rules_from(config))
  assert rules["embed"] == "fsdp" and rules["act_batch"] == ("data", "fsdp")
