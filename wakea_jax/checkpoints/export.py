"""Our own model directory: `model_config.json` (ModelConfig.to_dict()) plus `params/`, the
parameters as an orbax checkpoint (sharded arrays, restored straight onto a mesh).

Unlike `checkpoints/manager.py` (the whole train state at many steps), this is one model,
ready to sample from, fine-tune or convert to HF (`wakea_jax.convert`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from wakea_jax.checkpoints.hf import PathLike, check_writable, replace_dir
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.stacking import convert_layers
from wakea_jax.models.transformer import Transformer, abstract_model
from wakea_jax.parallel import mesh as mesh_lib

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _check_plain(model: Transformer) -> nnx.State:
  """The model's Params, checked to be exactly those of a plain Transformer of its config."""
  state = nnx.state(model, nnx.Param)
  ours = {p for p, _ in nnx.to_flat_state(state)}
  plain = {p for p, _ in nnx.to_flat_state(nnx.state(abstract_model(model.config), nnx.Param))}
  if ours != plain:
    odd = sorted(".".join(map(str, p)) for p in ours ^ plain)
    raise ValueError(f"model parameters differ from a plain Transformer at {odd[:5]} (merge LoRA "
                     "adapters / dequantize before saving a model directory)")
  return state


def save_model_dir(model: Transformer, path: PathLike, *, overwrite: bool = False
                   ) -> pathlib.Path:
  """Writes `model` to the directory `path`, which appears atomically (written beside, renamed).

  A previous model directory at `path` is replaced; any other non-empty directory is an error
  unless `overwrite`. One process writes it: the temporary name is per process and this
  process renames it once orbax has finished. Under `jax.distributed` (several processes)
  the model must be fully addressable on this process (e.g. gathered to host, as
  `train/setup.py` `export_trained` does on process 0), and orbax is told that this process
  writes alone, so it waits for no other at its barriers.
  """
  target = pathlib.Path(path).absolute()
  check_writable(target, CONFIG_FILE, overwrite)
  state = _check_plain(model)
  temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  temp.mkdir(parents=True)
  values = nnx.to_pure_dict(state)
  options = {}
  if jax.process_count() > 1:
    # Orbax refuses host-local jax.Arrays in a multi-process job; NumPy copies it writes.
    values = jax.tree.map(np.asarray, values)
    me = jax.process_index()
    options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me})
  try:
    with ocp.StandardCheckpointer(**options) as checkpointer:
      checkpointer.save(temp / PARAMS_DIR, values)
      checkpointer.wait_until_finished()
    config = json.dumps(model.config.to_dict(), indent=2, sort_keys=True)
    (temp / CONFIG_FILE).write_text(config + "\n")
    replace_dir(temp, target)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return target


def read_model_config(path: PathLike) -> ModelConfig:
  """The ModelConfig stored in a model directory."""
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"model directory {directory} does not exist")
  file = directory / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} is missing; is {directory} a model directory "
                            "(written by save_model_dir)?")
  try:
    return ModelConfig.from_dict(json.loads(file.read_text()))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{file}: {e}") from e


# ModelConfig fields that say how a model computes, not what it is: a caller may replace
# them when loading (load_model_dir's `compute`).
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat_policy")


def load_model_dir(path: PathLike, *, mesh: jax.sharding.Mesh | None = None,
                   rules: mesh_lib.Rules | None = None, scan_layers: bool | None = None,
                   **compute: str) -> Transformer:
  """The model saved in `path`; with `mesh`, parameters are restored directly sharded.

  `scan_layers` (default: as saved) asks for a layer layout (`ModelConfig.scan_layers`): a
  directory saved in the other one is converted after loading (`convert_layers`).
  `compute` replaces the saved `COMPUTE_FIELDS` (dtype, param_dtype, remat_policy; None
  keeps the saved value): the weights are restored as saved and cast to the new
  param_dtype, so a model trained with bfloat16 compute trains on or is scored in float32
  (or the reverse) as the caller's ModelConfig says.
  """
  unknown = sorted(set(compute) - set(COMPUTE_FIELDS))
  if unknown:
    raise TypeError(f"load_model_dir: unknown fields {unknown}; only {COMPUTE_FIELDS} "
                    "may replace a model directory's own")
  directory = pathlib.Path(path).absolute()
  # Restored straight into the wanted config's model: orbax casts each weight to its dtype.
  config = read_model_config(directory).replace(
      **{k: v for k, v in compute.items() if v is not None})
  params = directory / PARAMS_DIR
  if not params.is_dir():
    raise FileNotFoundError(f"{params} is missing; {directory} has a config but no parameters")
  graphdef, abstract_state = nnx.split(abstract_model(config))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state)
  else:
    shardings = mesh_lib.state_shardings(abstract_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(params, target)
  except Exception as e:
    raise ValueError(f"cannot restore {params} for the config in {directory / CONFIG_FILE}: "
                     f"{e}") from e
  nnx.replace_by_pure_dict(abstract_state, restored)
  model = nnx.merge(graphdef, abstract_state)
  if scan_layers is not None and scan_layers != config.scan_layers:
    model = convert_layers(model, scan_layers)
    if mesh is not None:
      nnx.update(model, mesh_lib.shard_state(nnx.state(model), mesh, rules))
  return model
