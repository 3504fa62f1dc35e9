"""One loader for every kind of model checkpoint.

  load_model("/models/Qwen3-0.6B")            a Hugging Face directory (config.json)
  load_model("/tmp/qwen3_native")             a wakea_jax model directory (model_config.json):
                                              `python -m wakea_jax.convert --out`, or a run's
                                              export/model
  load_model("/tmp/sft")                      a run's workdir: its export/model
"""

from __future__ import annotations

import json
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
    if (path / "checkpoints").is_dir():
      raise FileNotFoundError(
          f"{path}: a run workdir without an exported model ({RUN_EXPORT} is missing: the run "
          "had config.export.enabled=False or has not finished); convert one of its "
          "checkpoints or rerun with export on")
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
  directories; a wakea_jax model directory carries its own ModelConfig, except that
  `scan_layers` picks the layer layout of either kind (converted if needed) and dtype,
  param_dtype and remat_policy (`export.COMPUTE_FIELDS`), when given, replace its own: how
  a model computes is the caller's choice, what it is the directory's; None is "as
  saved". (Before, a run's `--config.model.dtype=bfloat16` with `init_from` a wakea_jax
  export was silently ignored.)
  """
  hf_overrides = {k: v for k, v in hf_overrides.items() if v is not None}   # None: as saved
  kind, directory = resolve(path)
  if kind == "hf":
    return hf.load_model(directory, mesh=mesh, rules=rules, **hf_overrides)
  compute = {k: hf_overrides.get(k) for k in export.COMPUTE_FIELDS}
  return export.load_model_dir(directory, mesh=mesh, rules=rules,
                               scan_layers=hf_overrides.get("scan_layers"), **compute)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_path(init_from: str | pathlib.Path, *, _depth: int = 0) -> str:
  """The tokenizer that belongs to the checkpoint at `init_from`, or "" when it has none.

  Looked for, in order: tokenizer files in the directory itself (an HF model directory), in
  a run workdir's export/model and export/hf, then the run's recorded `tokenizer` or, failing
  that, its own `init_from` (a run started from an HF model and not told otherwise used that
  model's tokenizer). "" means the bundled tokenizer.
  """
  if not init_from or _depth > 8:
    return ""
  path = pathlib.Path(init_from)
  for directory in (path, path / RUN_EXPORT, path / "export" / "hf"):
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
      return str(directory)
  record_path = path / "config.json"
  if (path / RUN_EXPORT).is_dir() and record_path.is_file():
    try:
      record = json.loads(record_path.read_text())
    except (OSError, ValueError):
      return ""
    if isinstance(record, dict):
      if record.get("tokenizer"):
        return str(record["tokenizer"])
      return tokenizer_path(record.get("init_from") or "", _depth=_depth + 1)
  return ""
