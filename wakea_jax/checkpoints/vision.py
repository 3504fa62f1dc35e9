"""HF SigLIP / CLIP vision checkpoints to and from `models.vision.VisionTower`, without PyTorch.

The conversion is data, like the decoder's (`checkpoints/hf.py`): `TENSOR_RULES` maps each HF
tensor name (relative to the tower's prefix) to our parameter path and a layout `Hook`. The
same table drives import and export.

Where the tower lives in a checkpoint differs by writer; `find_prefix` detects it:
  ""                                  SiglipVisionModel / CLIPVisionModel saved by transformers 5
  "vision_model."                     the same saved by 4.x, and full SiglipModel / CLIPModel
  "vision_tower.vision_model."        LLaVA saved by 4.x
  "model.vision_tower."               LLaVA saved by transformers 5
The config comes from `config.json`: a vision config at the top level, or the `vision_config`
of a composite one (SiglipModel, CLIPModel, LLaVA), with transformers' defaults for fields
it omits. `read_vision_params` and `vision_tensors` are the pieces a composite (LLaVA)
importer and exporter reuse.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from wakea_jax.checkpoints.hf import (
  HOOKS,
  Hook,
  PathLike,
  SafetensorsReader,
  check_writable,
  eager_tensors,
  float_field,
  int_field,
  read_hf_config,
  save_dtype,
  write_checkpoint,
)
from wakea_jax.models.vision import ACTIVATIONS, VisionConfig, VisionTower, abstract_vision_tower
from wakea_jax.parallel import mesh as mesh_lib

Shape = tuple[int, ...]

# Hooks of the vision tensors beyond the decoder's (HF layout <-> ours).
VISION_HOOKS: dict[str, Hook] = {
    **HOOKS,
    # Conv2d [e, c, p, p] <-> [c, p, p, e] (the patch embedding as a matmul).
    "conv_patch": Hook(lambda x, s: x.transpose(1, 2, 3, 0), lambda x: x.transpose(3, 0, 1, 2),
                       lambda s: (s[3], s[0], s[1], s[2])),
    # The attention-pooling probe: [1, 1, e] <-> [e].
    "probe": Hook(lambda x, s: x.reshape(s), lambda x: x.reshape(1, 1, -1),
                  lambda s: (1, 1, s[0])),
    # nn.MultiheadAttention's fused q/k/v: [3 * e, e] <-> [e, 3, heads, head_dim].
    "fused_qkv": Hook(lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T,
                      lambda s: (math.prod(s[1:]), s[0])),
    # ... and its bias: [3 * e] <-> [3, heads, head_dim].
    "fused_qkv_bias": Hook(lambda x, s: x.reshape(s), lambda x: x.reshape(-1),
                           lambda s: (math.prod(s),)),
}

# (HF name, our path, hook, when): "{i}" is the layer index; `when` is "always", a variant
# ("siglip", "clip") or "head" (SigLIP's attention pooling, `vision_use_head`).
_L, _H = "encoder.layers.{i}.", "head."
TENSOR_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("embeddings.patch_embedding.weight", "patch_embed", "conv_patch", "always"),
    ("embeddings.patch_embedding.bias", "patch_bias", "identity", "siglip"),
    ("embeddings.class_embedding", "class_embed", "identity", "clip"),
    ("embeddings.position_embedding.weight", "position_embed", "identity", "always"),
    ("pre_layrnorm.weight", "pre_norm.scale", "identity", "clip"),  # sic: HF's spelling
    ("pre_layrnorm.bias", "pre_norm.bias", "identity", "clip"),
    (_L + "layer_norm1.weight", "layers.{i}.attn_norm.scale", "identity", "always"),
    (_L + "layer_norm1.bias", "layers.{i}.attn_norm.bias", "identity", "always"),
    (_L + "self_attn.q_proj.weight", "layers.{i}.attn.q_proj", "split_heads", "always"),
    (_L + "self_attn.q_proj.bias", "layers.{i}.attn.q_bias", "split_bias", "always"),
    (_L + "self_attn.k_proj.weight", "layers.{i}.attn.k_proj", "split_heads", "always"),
    (_L + "self_attn.k_proj.bias", "layers.{i}.attn.k_bias", "split_bias", "always"),
    (_L + "self_attn.v_proj.weight", "layers.{i}.attn.v_proj", "split_heads", "always"),
    (_L + "self_attn.v_proj.bias", "layers.{i}.attn.v_bias", "split_bias", "always"),
    (_L + "self_attn.out_proj.weight", "layers.{i}.attn.o_proj", "merge_heads", "always"),
    (_L + "self_attn.out_proj.bias", "layers.{i}.attn.o_bias", "identity", "always"),
    (_L + "layer_norm2.weight", "layers.{i}.mlp_norm.scale", "identity", "always"),
    (_L + "layer_norm2.bias", "layers.{i}.mlp_norm.bias", "identity", "always"),
    (_L + "mlp.fc1.weight", "layers.{i}.mlp.up_proj", "linear_in_out", "always"),
    (_L + "mlp.fc1.bias", "layers.{i}.mlp.up_bias", "identity", "always"),
    (_L + "mlp.fc2.weight", "layers.{i}.mlp.down_proj", "linear_in_out", "always"),
    (_L + "mlp.fc2.bias", "layers.{i}.mlp.down_bias", "identity", "always"),
    ("post_layernorm.weight", "post_norm.scale", "identity", "always"),
    ("post_layernorm.bias", "post_norm.bias", "identity", "always"),
    (_H + "probe", "head.probe", "probe", "head"),
    (_H + "attention.in_proj_weight", "head.in_proj", "fused_qkv", "head"),
    (_H + "attention.in_proj_bias", "head.in_bias", "fused_qkv_bias", "head"),
    (_H + "attention.out_proj.weight", "head.o_proj", "merge_heads", "head"),
    (_H + "attention.out_proj.bias", "head.o_bias", "identity", "head"),
    (_H + "layernorm.weight", "head.norm.scale", "identity", "head"),
    (_H + "layernorm.bias", "head.norm.bias", "identity", "head"),
    (_H + "mlp.fc1.weight", "head.mlp.up_proj", "linear_in_out", "head"),
    (_H + "mlp.fc1.bias", "head.mlp.up_bias", "identity", "head"),
    (_H + "mlp.fc2.weight", "head.mlp.down_proj", "linear_in_out", "head"),
    (_H + "mlp.fc2.bias", "head.mlp.down_bias", "identity", "head"),
)
# Buffers some writers saved; recomputed, never needed.
_IGNORED = ("embeddings.position_ids",)
# Where the tower's tensors may live in a checkpoint (see the module docstring).
PREFIXES = ("", "vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
            "model.vision_tower.vision_model.", "vision_tower.")


def tensor_map(config: VisionConfig, prefix: str = "") -> list[tuple[str, tuple[Any, ...], Hook]]:
  """`TENSOR_RULES` expanded for `config`: (HF name, our parameter path, hook) per tensor."""
  entries = []
  for hf, ours, hook, when in TENSOR_RULES:
    if when not in ("always", config.variant) and not (when == "head" and config.use_head):
      continue
    for i in range(config.num_layers) if "{i}" in hf else (0,):
      path = tuple(int(p) if p.isdigit() else p for p in ours.format(i=i).split("."))
      entries.append((prefix + hf.format(i=i), path, VISION_HOOKS[hook]))
  return entries


# ------------------------------------------------------------------------------------------
# config.json <-> VisionConfig
# ------------------------------------------------------------------------------------------

_MODEL_TYPES = {"siglip_vision_model": "siglip", "clip_vision_model": "clip"}
_ARCHITECTURES = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel"}
# A composite config's model_type -> the variant of a vision_config that names none (LLaVA's
# default tower is CLIP).
_COMPOSITE_TYPES = {"siglip": "siglip", "clip": "clip", "llava": "clip"}
# transformers' SiglipVisionConfig / CLIPVisionConfig defaults for fields a file may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


def _side(value: Any, field: str, source: str) -> int:
  """An int, or a [h, w] pair of equal ints (HF allows both for image_size / patch_size)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise NotImplementedError(f"{source}: field '{field}' is {value!r}; only square sizes "
                                "are supported")
    value = value[0]
  return int_field(value, field, source)


def vision_config_from_hf(hf_config: dict[str, Any], *,
                          source: str = "config.json") -> VisionConfig:
  """Our VisionConfig for an HF vision config, or the `vision_config` of a composite one."""
  where = source
  outer_type = hf_config.get("model_type")
  raw = hf_config
  if isinstance(hf_config.get("vision_config"), dict):
    raw, where = hf_config["vision_config"], f"{source} (vision_config)"
  elif "vision_config" in hf_config and hf_config["vision_config"] is not None:
    raise ValueError(f"{source}: field 'vision_config' must be an object, "
                     f"got {hf_config['vision_config']!r}")
  model_type = raw.get("model_type")
  if model_type in _MODEL_TYPES:
    variant = _MODEL_TYPES[model_type]
  elif model_type is None and raw is not hf_config and outer_type in _COMPOSITE_TYPES:
    variant = _COMPOSITE_TYPES[outer_type]
  else:
    raise NotImplementedError(f"{where}: model_type {model_type!r} is not a supported vision "
                              f"tower (one of {sorted(_MODEL_TYPES)})")
  hf = {**_HF_DEFAULTS[variant], **{k: v for k, v in raw.items() if v is not None}}
  if hf["hidden_act"] not in ACTIVATIONS:
    raise NotImplementedError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
                              f"(one of {sorted(ACTIVATIONS)})")
  use_head = hf.get("vision_use_head", False)
  if not isinstance(use_head, bool):
    raise ValueError(f"{where}: field 'vision_use_head' must be true or false, got {use_head!r}")
  try:
    return VisionConfig(
        variant=variant,
        embed_dim=int_field(hf["hidden_size"], "hidden_size", where),
        mlp_dim=int_field(hf["intermediate_size"], "intermediate_size", where),
        num_layers=int_field(hf["num_hidden_layers"], "num_hidden_layers", where),
        num_heads=int_field(hf["num_attention_heads"], "num_attention_heads", where),
        num_channels=int_field(hf["num_channels"], "num_channels", where),
        image_size=_side(hf["image_size"], "image_size", where),
        patch_size=_side(hf["patch_size"], "patch_size", where),
        norm_eps=float_field(hf["layer_norm_eps"], "layer_norm_eps", where, positive=True),
        hidden_act=hf["hidden_act"], use_head=variant == "siglip" and use_head)
  except ValueError as e:
    if str(e).startswith(where):
      raise
    raise ValueError(f"{where}: {e}") from None


def vision_config_to_hf(config: VisionConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json of a standalone `SiglipVisionModel` / `CLIPVisionModel` for `config`."""
  hf: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[config.variant]],
      "model_type": {v: k for k, v in _MODEL_TYPES.items()}[config.variant],
      "hidden_size": config.embed_dim, "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_channels": config.num_channels, "image_size": config.image_size,
      "patch_size": config.patch_size, "hidden_act": config.hidden_act,
      "layer_norm_eps": config.norm_eps, "attention_dropout": 0.0, "dtype": dtype,
  }
  if config.variant == "siglip":
    hf["vision_use_head"] = config.use_head
  else:
    hf.update(initializer_range=config.init_std, initializer_factor=1.0)
  return hf


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------


def find_prefix(names: Any, source: str) -> str:
  """The prefix (one of `PREFIXES`) under which `names` hold a vision tower."""
  for prefix in PREFIXES:
    if prefix + "embeddings.patch_embedding.weight" in names:
      return prefix
  raise ValueError(f"{source}: no vision tower found (no tensor "
                   f"'<prefix>embeddings.patch_embedding.weight' for a prefix in {PREFIXES})")


def read_vision_params(reader: SafetensorsReader, config: VisionConfig, prefix: str,
                       source: str, *, mesh: jax.sharding.Mesh | None = None,
                       rules: mesh_lib.Rules | None = None) -> VisionTower:
  """A tower of `config` filled from `reader`'s tensors under `prefix`; every tensor's shape
  and dtype is checked before data is read. Tensors under the prefix that the table does not
  describe are an error; tensors elsewhere are the caller's (a composite checkpoint's). With
  `mesh`, each tensor is put straight onto its shards (by the parameters' logical axes)."""
  graphdef, abstract_state = nnx.split(abstract_vision_tower(config))
  expected = dict(nnx.to_flat_state(abstract_state))
  shardings = (dict(nnx.to_flat_state(mesh_lib.state_shardings(abstract_state, mesh, rules)))
               if mesh is not None else {})
  entries = tensor_map(config, prefix)
  missing = [name for name, *_ in entries if name not in reader.weight_map]
  if missing:
    raise ValueError(f"{reader.directory}: tensor(s) {missing[:5]} ({len(missing)} in all) "
                     f"missing; {source} implies them")
  wanted = {name for name, *_ in entries} | {prefix + n for n in _IGNORED}
  # With prefix "" (a standalone tower) that is every tensor of the checkpoint.
  extra = sorted(n for n in reader.weight_map if n.startswith(prefix) and n not in wanted)
  if extra:
    raise ValueError(f"{reader.directory}: unexpected tensor(s) {extra[:5]} ({len(extra)} in "
                     f"all, e.g. in {reader.file(extra[0]).name}) not described by {source}")
  for name, path, hook in entries:
    reader.check_tensor(name, hook.hf_shape(tuple(expected[path].get_value().shape)), source)
  values = {}
  for name, path, hook in entries:
    shape = tuple(expected[path].get_value().shape)
    array = np.asarray(hook.to_ours(reader.read(name), shape).astype(config.weight_dtype),
                       order="C")
    sharding = shardings.get(path)
    values[path] = jax.device_put(array, sharding.get_value() if sharding is not None else None)
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in expected.items()])
  return nnx.merge(graphdef, state)


def load_vision_tower(path: PathLike, *, prefix: str | None = None, dtype: str = "float32",
                      param_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                      rules: mesh_lib.Rules | None = None) -> VisionTower:
  """The vision tower of the HF checkpoint directory `path` (SiglipVisionModel,
  CLIPVisionModel, the vision half of SiglipModel / CLIPModel, or a LLaVA's tower).

  `prefix` defaults to the one `find_prefix` detects. `dtype` is the compute dtype,
  `param_dtype` (default: `dtype`) what weights are stored in. With `mesh` (and `rules`,
  default `parallel.mesh.DEFAULT_RULES`) every tensor is placed on its shards as it is read.
  """
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  config = vision_config_from_hf(read_hf_config(directory), source=source)
  config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype)
  reader = SafetensorsReader(directory)
  if prefix is None:
    prefix = find_prefix(reader.weight_map, str(directory))
  return read_vision_params(reader, config, prefix, source, mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def vision_tensors(tower: VisionTower, prefix: str = "", dtype: Any = np.float32
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array in HF layout) for every tensor of `tower`, in table order."""
  flat = dict(nnx.to_flat_state(nnx.state(tower, nnx.Param)))
  entries = tensor_map(tower.config, prefix)
  unmapped = sorted(".".join(map(str, p)) for p in set(flat) - {p for _, p, _ in entries})
  if unmapped:
    raise ValueError(f"tower parameters {unmapped[:5]} have no HF counterpart")
  for name, path, hook in entries:
    array = np.asarray(jax.device_get(flat[path].get_value()))
    yield name, np.asarray(hook.to_hf(array).astype(dtype), order="C")


def save_vision_tower(tower: VisionTower, path: PathLike, *, dtype: str | None = None,
                      overwrite: bool = False) -> pathlib.Path:
  """Writes `tower` as a `SiglipVisionModel` / `CLIPVisionModel` directory (config.json +
  model.safetensors, transformers 5 names) that `from_pretrained` loads. Atomic, like
  `hf.save_model`: written beside `path` and renamed over it."""
  config: VisionConfig = tower.config
  dtype = dtype or config.param_dtype
  np_dtype = save_dtype(dtype)
  target = pathlib.Path(path).absolute()
  check_writable(target, "config.json", overwrite)
  tensors = dict(vision_tensors(tower, "", np_dtype))
  return write_checkpoint(target, eager_tensors(tensors), vision_config_to_hf(config, dtype),
                          None)


__all__ = ["PREFIXES", "TENSOR_RULES", "VISION_HOOKS", "find_prefix", "load_vision_tower",
           "read_vision_params", "save_vision_tower", "tensor_map", "vision_config_from_hf",
           "vision_config_to_hf", "vision_tensors"]
