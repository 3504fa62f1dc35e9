"""One loader for every kind of model checkpoint.

  load_model("/models/Qwen3-0.6B")            a Hugging Face directory (config.json)
  load_model("/tmp/qwen3_native")             a wakea_jax model directory (model_config.json):
                                              `python -m wakea_jax.convert --out`, or a run's
                                              export/model
  load_model("/tmp/sft")                      a run's workdir: its export/model
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from wakea_jax.checkpoints import export, hf
from wakea_jax.models.transformer import Transformer
from wakea_jax.parallel import mesh as mesh_lib

# Where a run writes its final model, relative to its workdir.
RUN_EXPORT = pathlib.Path("export") / "model"


def resolve(path: str | pathlib.Path) -> tuple[str, pathlib.Path]:
  """(kind, directory) of a checkpoint path: kind is "hf" or "native"."""
  path = pathlib.Path(path)
  if (path / export.CONFIG_FILE).is_file():
    return "native", path
  # Before config.json: a run's workdir has one too (the run's configuration record).
  if (path / RUN_EXPORT / export.CONFIG_FILE).is_file():
    return "native", path / RUN_EXPORT
  if (path / "config.json").is_file():
    return "hf", path
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  raise FileNotFoundError(
      f"{path}: neither a wakea_jax model directory ({export.CONFIG_FILE}), a Hugging Face "
      f"directory (config.json) nor a run workdir with {RUN_EXPORT}")


def load_model(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
               rules: mesh_lib.Rules | None = None, **hf_overrides: Any) -> Transformer:
  """The model at `path` (see the module docstring); with `mesh`, loaded straight onto it.

  `hf_overrides` (dtype, param_dtype, remat_policy, value_head, ...) apply to Hugging Face
  directories; a wakea_jax model directory carries its own ModelConfig.
  """
  kind, directory = resolve(path)
  if kind == "hf":
    return hf.load_model(directory, mesh=mesh, rules=rules, **hf_overrides)
  return export.load_model_dir(directory, mesh=mesh, rules=rules)
