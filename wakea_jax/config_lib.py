"""Turning ml_collections ConfigDicts (the binary boundary) into library objects.

ConfigDicts stop here: binaries call these helpers and pass frozen dataclasses, meshes and
rule tuples into the library.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from wakea_jax.models.config import ModelConfig, get_preset
from wakea_jax.parallel import mesh as mesh_lib


def model_config_dict(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A ConfigDict holding every ModelConfig field of `preset`, so each is overridable."""
  values = get_preset(preset, **overrides).to_dict()
  return ml_collections.ConfigDict(values)


def model_config_from(config: ml_collections.ConfigDict | dict[str, Any]) -> ModelConfig:
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return ModelConfig.from_dict(values)


def base_config() -> ml_collections.ConfigDict:
  """Fields every binary shares: seed, mesh sizes, logical-axis rules."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Mesh axis sizes; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis -> mesh axes; strings, lists of strings or None.
  config.sharding_rules = [list(rule) for rule in mesh_lib.DEFAULT_RULES]
  return config


def mesh_from(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  return mesh_lib.create_mesh(dict(config.mesh), devices)


def rules_from(config: ml_collections.ConfigDict) -> mesh_lib.Rules:
  return mesh_lib.normalize_rules([tuple(rule) for rule in config.sharding_rules])
