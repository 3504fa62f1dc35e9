"""Hugging Face checkpoints (Llama, Qwen2, Qwen3) to and from our `Transformer`, without PyTorch.

A checkpoint directory holds `config.json` and `model.safetensors`, or shards listed in
`model.safetensors.index.json`. The conversion is data: `TENSOR_RULES` maps each HF tensor name
to a parameter path in `nnx.state(model, nnx.Param)` and names a `Hook` that changes the layout
(HF `nn.Linear` stores [out, in], we store [in, out] with the heads split out). The same table
drives import and export. RoPE needs no permutation: our layers use HF's rotate_half layout.

Import reads one tensor at a time and, given a mesh, places it straight onto its shards, so a
large model is never whole on one device.

Import is strict about types, so a damaged checkpoint fails with the file and the field or
tensor named rather than loading as something else: config.json integer fields must be JSON
integers (not 2.5, not true), float fields finite numbers, flags booleans; every tensor must
be stored in a floating dtype (`LOADABLE_DTYPES`: an int64 or bool tensor is an error, not a
silent cast); and a file safetensors cannot open (truncated, not safetensors) is an error
naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from absl import logging
from flax import nnx
from safetensors import safe_open

from wakea_jax.models.config import ModelConfig, RopeScaling
from wakea_jax.models.transformer import Transformer, abstract_model
from wakea_jax.parallel import mesh as mesh_lib

PathLike = str | os.PathLike[str]
Shape = tuple[int, ...]


ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}

# ------------------------------------------------------------------------------------------
# The name map
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hook:
  """How one tensor's layout differs between HF and us.

  to_ours(hf_array, our_shape) -> our array; to_hf(our_array) -> HF array;
  hf_shape(our_shape) -> the shape HF stores (checked before any data is read).
  """

  to_ours: Callable[[np.ndarray, Shape], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[Shape], Shape]


HOOKS: dict[str, Hook] = {
    "identity": Hook(lambda x, s: x, lambda x: x, lambda s: s),
    # nn.Linear [out, in] <-> ours [in, out] (MLP, lm_head).
    "linear_in_out": Hook(lambda x, s: x.T, lambda x: x.T, lambda s: s[::-1]),
    # q/k/v: [heads * head_dim, embed] <-> [embed, heads, head_dim].
    "split_heads": Hook(lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T,
                        lambda s: (s[1] * s[2], s[0])),
    # o_proj: [embed, heads * head_dim] <-> [heads, head_dim, embed].
    "merge_heads": Hook(lambda x, s: x.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T,
                        lambda s: (s[2], s[0] * s[1])),
    # q/k/v bias: [heads * head_dim] <-> [heads, head_dim].
    "split_bias": Hook(lambda x, s: x.reshape(s), lambda x: x.reshape(-1),
                       lambda s: (s[0] * s[1],)),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One HF tensor name pattern ("{i}" = layer index), our parameter path, and its hook.

  `when` names the ModelConfig feature the tensor exists under ("always", "untied", or a bool
  field such as "qkv_bias").
  """

  hf: str
  ours: str
  hook: str
  when: str = "always"


_L, _A = "model.layers.{i}.", "model.layers.{i}.self_attn."
TENSOR_RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "embed", "identity"),
    TensorRule("model.norm.weight", "final_norm.scale", "identity"),
    TensorRule("lm_head.weight", "lm_head", "linear_in_out", when="untied"),
    TensorRule(_L + "input_layernorm.weight", "layers.{i}.input_norm.scale", "identity"),
    TensorRule(_L + "post_attention_layernorm.weight", "layers.{i}.post_attn_norm.scale",
               "identity"),
    TensorRule(_A + "q_proj.weight", "layers.{i}.attn.q_proj", "split_heads"),
    TensorRule(_A + "k_proj.weight", "layers.{i}.attn.k_proj", "split_heads"),
    TensorRule(_A + "v_proj.weight", "layers.{i}.attn.v_proj", "split_heads"),
    TensorRule(_A + "o_proj.weight", "layers.{i}.attn.o_proj", "merge_heads"),
    TensorRule(_A + "q_proj.bias", "layers.{i}.attn.q_bias", "split_bias", when="qkv_bias"),
    TensorRule(_A + "k_proj.bias", "layers.{i}.attn.k_bias", "split_bias", when="qkv_bias"),
    TensorRule(_A + "v_proj.bias", "layers.{i}.attn.v_bias", "split_bias", when="qkv_bias"),
    TensorRule(_A + "q_norm.weight", "layers.{i}.attn.q_norm.scale", "identity", when="qk_norm"),
    TensorRule(_A + "k_norm.weight", "layers.{i}.attn.k_norm.scale", "identity", when="qk_norm"),
    TensorRule(_L + "mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj", "linear_in_out"),
    TensorRule(_L + "mlp.up_proj.weight", "layers.{i}.mlp.up_proj", "linear_in_out"),
    TensorRule(_L + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj", "linear_in_out"),
)

# Buffers older HF checkpoints saved, recomputed by every model that reads them.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# Our parameters with no HF counterpart; import initialises them, export drops them.
_NOT_IN_HF = (("value_head",), ("value_bias",))


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a concrete model: its HF name, our parameter path and its layout hook.

  In a `scan_layers` model a layer's tensor is row `layer` of the stacked parameter at `path`
  ("layers.attn.q_proj"); otherwise `layer` is None and `path` names it alone
  ("layers.3.attn.q_proj").
  """

  hf_name: str
  path: tuple[str | int, ...]
  hook: Hook
  layer: int | None = None


def tensor_map(config: ModelConfig) -> list[TensorEntry]:
  """`TENSOR_RULES` expanded for `config`: every tensor of the model, in checkpoint order."""
  entries = []
  for rule in TENSOR_RULES:
    if rule.when == "untied":
      active = not config.tie_embeddings
    else:
      active = rule.when == "always" or bool(getattr(config, rule.when))
    if not active:
      continue
    per_layer = "{i}" in rule.hf
    for i in (range(config.num_layers) if per_layer else (0,)):
      if per_layer and config.scan_layers:
        ours, layer = rule.ours.replace("{i}.", ""), i
      else:
        ours, layer = rule.ours.format(i=i), None
      path = tuple(int(p) if p.isdigit() else p for p in ours.split("."))
      entries.append(TensorEntry(rule.hf.format(i=i), path, HOOKS[rule.hook], layer))
  return entries


def _dotted(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


# ------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ------------------------------------------------------------------------------------------

# Defaults of the transformers config classes for fields a config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False),
    "Qwen2ForCausalLM": dict(num_key_value_heads=32, head_dim=None, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, use_sliding_window=False),
    "Qwen3ForCausalLM": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                             rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# Fields config_from_hf reads, by JSON type; None (or absent) means "use the default".
_INT_FIELDS = _REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")


def int_field(value: Any, field: str, source: str) -> int:
  """`value` if it is a JSON integer (bools are not), else a ValueError naming the field."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{source}: field '{field}' must be an integer, got {value!r}")
  return value


def float_field(value: Any, field: str, source: str, *, positive: bool = False) -> float:
  """`value` as a float if it is a finite JSON number (and > 0 when `positive`)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{source}: field '{field}' must be a finite number, got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"{source}: field '{field}' must be > 0, got {value!r}")
  return float(value)


def _check_field_types(hf: dict[str, Any], source: str) -> None:
  """Type checks of the top-level fields config_from_hf reads (None means absent)."""
  for field in _INT_FIELDS:
    if hf.get(field) is not None:
      int_field(hf[field], field, source)
  for field in _FLOAT_FIELDS:
    if hf.get(field) is not None:
      float_field(hf[field], field, source)
  for field in _BOOL_FIELDS:
    if hf.get(field) is not None and not isinstance(hf[field], bool):
      raise ValueError(f"{source}: field '{field}' must be true or false, got {hf[field]!r}")


def read_hf_config(path: PathLike) -> dict[str, Any]:
  """The parsed `config.json` of an HF checkpoint directory."""
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"HF checkpoint directory {directory} does not exist")
  file = directory / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} is missing; an HF checkpoint directory needs config.json")
  return read_json_object(file)


def read_json_object(file: pathlib.Path) -> dict[str, Any]:
  """The JSON object in `file` (a config.json, preprocessor_config.json, ...); ValueError
  naming the file when it is not valid JSON or not an object."""
  try:
    values = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON: {e}") from e
  if not isinstance(values, dict):
    raise ValueError(f"{file}: expected a JSON object, got {type(values).__name__}")
  return values


def hf_architecture(hf_config: dict[str, Any], source: str = "config.json") -> str:
  """The supported architecture named by `architectures` (or, failing that, `model_type`)."""
  names = hf_config.get("architectures") or []
  if not names:
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    if hf_config.get("model_type") in by_type:
      return by_type[hf_config["model_type"]]
    raise ValueError(f"{source}: field 'architectures' is missing and model_type "
                     f"{hf_config.get('model_type')!r} is not one of {sorted(by_type)}")
  supported = [n for n in names if n in ARCHITECTURES]
  if not supported:
    raise NotImplementedError(f"{source}: architectures {names} not supported; "
                              f"supported: {sorted(ARCHITECTURES)}")
  return supported[0]


def _rope_from_hf(hf: dict[str, Any], max_len: int, source: str
                  ) -> tuple[float, RopeScaling | None]:
  # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older versions a
  # top-level `rope_theta` plus an optional `rope_scaling` dict ("type" before "rope_type").
  field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  raw = hf.get(field) or {}
  if not isinstance(raw, dict):
    raise ValueError(f"{source}: field '{field}' must be an object, got {raw!r}")
  params = dict(raw)
  if params and all(isinstance(v, dict) for v in params.values()):
    raise NotImplementedError(f"{source}: per-layer-type {field} {sorted(params)} not supported")
  if params.get("rope_theta") is not None:
    theta = float_field(params["rope_theta"], f"{field}.rope_theta", source, positive=True)
  elif hf.get("rope_theta") is not None:
    theta = float_field(hf["rope_theta"], "rope_theta", source, positive=True)
  else:
    theta = 10_000.0
  partial = 1.0
  for where, values in ((f"{field}.", params), ("", hf)):
    if values.get("partial_rotary_factor") is not None:
      partial = float_field(values["partial_rotary_factor"], f"{where}partial_rotary_factor",
                            source)
      break
  if partial != 1.0:
    raise NotImplementedError(f"{source}: partial_rotary_factor != 1 is not supported")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise NotImplementedError(f"{source}: {field}.rope_type={rope_type!r} is not supported "
                              "(only 'default' and 'llama3')")
  missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
  if missing:
    raise ValueError(f"{source}: {field} of rope_type 'llama3' lacks field {missing[0]!r}")
  factors = {k: float_field(params[k], f"{field}.{k}", source, positive=True)
             for k in ("factor", "low_freq_factor", "high_freq_factor")}
  original = params.get("original_max_position_embeddings")
  if original is None:
    original = max_len
  elif int_field(original, f"{field}.original_max_position_embeddings", source) <= 0:
    raise ValueError(f"{source}: field '{field}.original_max_position_embeddings' must be > 0, "
                     f"got {original}")
  scaling = RopeScaling(original_max_position_embeddings=original, **factors)
  return theta, scaling


def config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
  """Our ModelConfig for an HF Llama / Qwen2 / Qwen3 config dict (float32, no value head)."""
  arch = hf_architecture(hf_config, source)
  hf = {**_HF_DEFAULTS[arch], **hf_config}
  missing = [k for k in _REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"{source}: required field(s) {missing} missing")
  _check_field_types(hf, source)
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"{source}: hidden_act={hf['hidden_act']!r} not supported "
                              "(only 'silu')")
  if hf.get("attention_bias"):
    # Llama's and Qwen3's attention_bias also adds an o_proj bias, which our layers lack.
    raise NotImplementedError(f"{source}: attention_bias=true (biases on q/k/v *and* o_proj) "
                              f"is not supported for {arch}")
  if hf.get("mlp_bias"):
    raise NotImplementedError(f"{source}: mlp_bias=true is not supported")
  layer_types = hf.get("layer_types") or []
  if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
    raise NotImplementedError(f"{source}: sliding-window attention (use_sliding_window / "
                              "layer_types) is not supported")
  heads = int(hf["num_attention_heads"])
  max_len = int(hf["max_position_embeddings"])
  theta, scaling = _rope_from_hf(hf, max_len, source)
  try:
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), embed_dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf["num_key_value_heads"] or heads),
        head_dim=int(hf["head_dim"] or int(hf["hidden_size"]) // heads),
        mlp_dim=int(hf["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
        max_seq_len=max_len)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def infer_architecture(config: ModelConfig) -> str:
  """The HF family a config fits: QK-norm -> Qwen3, qkv bias -> Qwen2, else Llama."""
  if config.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"


def config_to_hf(config: ModelConfig, architecture: str | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
  """The config.json for `config` as `architecture` (errors if the family cannot express it)."""
  arch = architecture or infer_architecture(config)
  if arch not in ARCHITECTURES:
    raise ValueError(f"architecture {arch!r} not supported; choose one of {sorted(ARCHITECTURES)}")
  if config.smeared_keys:
    raise ValueError("ModelConfig.smeared_keys has no transformers architecture (no HF model "
                     "mixes each key with the previous one); keep the wakea_jax checkpoint, "
                     "or set export.hf=False")
  # Each family has a fixed attention: Llama plain, Qwen2 with q/k/v bias, Qwen3 with QK-norm.
  wants = {"LlamaForCausalLM": (False, False), "Qwen2ForCausalLM": (True, False),
           "Qwen3ForCausalLM": (False, True)}[arch]
  if (config.qkv_bias, config.qk_norm) != wants:
    raise ValueError(f"{arch} needs qkv_bias={wants[0]}, qk_norm={wants[1]}, but the model has "
                     f"qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm}; pick architecture "
                     f"{infer_architecture(config)!r}")
  if arch == "LlamaForCausalLM" and config.embed_dim % config.num_heads:
    raise ValueError(f"LlamaConfig requires hidden_size ({config.embed_dim}) divisible by "
                     f"num_attention_heads ({config.num_heads})")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": config.rope_theta,
            **dataclasses.asdict(config.rope_scaling)}
  hf: dict[str, Any] = {
      "architectures": [arch], "model_type": ARCHITECTURES[arch],
      "vocab_size": config.vocab_size, "hidden_size": config.embed_dim,
      "intermediate_size": config.mlp_dim, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
      "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std,
      "attention_dropout": 0.0, "use_cache": True,
      # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling.
      "rope_parameters": rope, "rope_theta": config.rope_theta,
      "rope_scaling": rope if config.rope_scaling is not None else None,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if arch == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    hf.update(use_sliding_window=False, sliding_window=None,
              max_window_layers=config.num_layers,
              layer_types=["full_attention"] * config.num_layers)
    if arch == "Qwen3ForCausalLM":
      hf["attention_bias"] = False
  return hf


# ------------------------------------------------------------------------------------------
# safetensors reading (bfloat16 included: safetensors' numpy backend cannot return it)
# ------------------------------------------------------------------------------------------

_RAW_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16)}
# safetensors dtypes import accepts (cast to the model's param_dtype); anything else (I64,
# BOOL, F8_*, ...) is an error naming the file and tensor, never a silent cast.
LOADABLE_DTYPES = ("F32", "BF16", "F16", "F64")


class SafetensorsReader:
  """Tensors by name from `model.safetensors` or the shards of its index, one at a time."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map': {e}") from e
      files = sorted(set(weight_map.values()))
    elif single.is_file():
      files = [single.name]
    else:
      raise FileNotFoundError(
          f"{directory}: no model.safetensors or model.safetensors.index.json (other weight "
          "formats such as pytorch_model.bin are not supported)")
    self._handles: dict[str, Any] = {}
    self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
    self.weight_map: dict[str, str] = {}
    for name in files:
      if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name} (listed in {index.name}) is missing")
      try:
        handle = safe_open(str(directory / name), framework="numpy")
      except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise ValueError(f"{directory / name}: not a readable safetensors file (truncated or "
                         f"damaged?): {e}") from e
      self._handles[name] = handle
      self.weight_map.update({key: name for key in handle.keys()})
    if index.is_file():
      absent = sorted(k for k, f in weight_map.items() if self.weight_map.get(k) != f)
      if absent:
        raise ValueError(f"{index}: tensor(s) {absent[:5]} are not in the files it names")

  def file(self, name: str) -> pathlib.Path:
    """The file that holds tensor `name`."""
    return self.directory / self.weight_map[name]

  def shape(self, name: str) -> Shape:
    """Tensor `name`'s shape, from the header (no data read)."""
    return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype string of tensor `name` ("F32", "BF16", "I64", ...)."""
    return self._handles[self.weight_map[name]].get_slice(name).get_dtype()

  def check_dtype(self, name: str) -> None:
    """Raises ValueError naming the file and tensor if `name` is not a floating tensor."""
    if (dtype := self.dtype(name)) not in LOADABLE_DTYPES:
      raise ValueError(f"{self.file(name)}: tensor {name!r} has dtype {dtype}; weights must be "
                       f"one of {list(LOADABLE_DTYPES)} (no silent cast from {dtype})")

  def check_tensor(self, name: str, shape: Shape, source: str) -> None:
    """Raises ValueError naming the file and tensor unless `name` is a floating tensor of
    `shape` (HF layout), the shape the config named by `source` implies."""
    self.check_dtype(name)
    if (got := self.shape(name)) != shape:
      raise ValueError(f"{self.file(name)}: tensor {name!r} has shape {got}, expected {shape} "
                       f"from {source}")

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` as a NumPy array (bfloat16 as ml_dtypes.bfloat16)."""
    self.check_dtype(name)
    handle = self._handles[self.weight_map[name]]
    dtype = self.dtype(name)
    if dtype not in _RAW_DTYPES:
      try:
        return handle.get_tensor(name)
      except Exception as e:  # SafetensorError, or OSError if the file changed since opening
        raise ValueError(f"{self.file(name)}: cannot read tensor {name!r}: {e}") from e
    # Read the raw bytes at the offsets the header gives (header: u64 length + JSON).
    file = self.weight_map[name]
    with open(self.directory / file, "rb") as f:
      if file not in self._headers:
        (length,) = struct.unpack("<Q", f.read(8))
        self._headers[file] = (8 + length, json.loads(f.read(length)))
      data_start, header = self._headers[file]
      begin, end = header[name]["data_offsets"]
      f.seek(data_start + begin)
      data = f.read(end - begin)
    if len(data) != end - begin:
      raise ValueError(f"{self.file(name)}: tensor {name!r} is truncated ({len(data)} of "
                       f"{end - begin} bytes)")
    return np.frombuffer(data, _RAW_DTYPES[dtype]).reshape(self.shape(name))


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------


def load_model(path: PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None, rules: mesh_lib.Rules | None = None,
               **config_overrides: Any) -> Transformer:
  """A Transformer with the weights of the HF checkpoint directory `path`.

  `dtype` is the compute dtype; `param_dtype` (default: `dtype`) what weights are stored in.
  `config_overrides` replace ModelConfig fields (e.g. max_seq_len, remat_policy, scan_layers,
  value_head; a value head is freshly initialised). With `mesh`, every tensor is put straight
  onto its shards as it is read (a scan_layers parameter once all its layers are read).
  """
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  config = config_from_hf(read_hf_config(directory), source=source)
  config = config.replace(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
  return read_model(SafetensorsReader(directory), config, source=source, mesh=mesh,
                    rules=rules)


def stored_name(hf_name: str, prefixes: Mapping[str, str] | None) -> str:
  """Where a composite checkpoint keeps the decoder tensor `hf_name`: the first prefix of
  `prefixes` (decoder name start -> composite name start, as in `read_model`) it starts with
  is replaced; a name under none of them (or no `prefixes`) is kept."""
  for ours, theirs in (prefixes or {}).items():
    if hf_name.startswith(ours):
      return theirs + hf_name[len(ours):]
  return hf_name


def read_model(reader: SafetensorsReader, config: ModelConfig, *, source: str,
               prefixes: Mapping[str, str] | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: mesh_lib.Rules | None = None) -> Transformer:
  """A Transformer for `config` with its tensors read from `reader` (see `load_model`).

  `prefixes` places the decoder inside a composite checkpoint: it maps the start of a
  decoder tensor's name to where the checkpoint keeps it, e.g. {"model.":
  "language_model.model.", "lm_head.": "language_model.lm_head."} for Qwen2-Audio as saved.
  The decoder then owns only the keys under those prefixes (others are another part's, and
  not checked here); without `prefixes` it owns every key. `source` names the config the
  tensors are checked against in errors.
  """
  prefixes = dict(prefixes or {})

  def decoder_name(key: str) -> str | None:  # the inverse of `stored`; None: not the decoder's
    if not prefixes:
      return key
    for ours, theirs in prefixes.items():
      if key.startswith(theirs):
        return ours + key[len(theirs):]
    return None

  graphdef, abstract_state = nnx.split(abstract_model(config))
  expected = dict(nnx.to_flat_state(abstract_state))
  shardings = (dict(nnx.to_flat_state(mesh_lib.state_shardings(abstract_state, mesh, rules)))
               if mesh is not None else {})
  entries = [dataclasses.replace(e, hf_name=stored_name(e.hf_name, prefixes))
             for e in tensor_map(config)]
  missing = [e.hf_name for e in entries if e.hf_name not in reader.weight_map]
  if missing:
    raise ValueError(f"{reader.directory}: tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all) missing; "
                     f"{source} implies them")
  wanted = {e.hf_name for e in entries}
  # HF ties lm_head to the embedding and ignores a stored lm_head when embeddings are tied.
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  extra = sorted(n for n in reader.weight_map
                 if n not in wanted and (name := decoder_name(n)) is not None
                 and name not in ignorable and not _IGNORED_HF.fullmatch(name))
  if extra:
    raise ValueError(f"{reader.directory}: unexpected tensor(s) {extra[:5]} ({len(extra)} in "
                     f"all, e.g. in {reader.weight_map[extra[0]]}) not described by {source}")

  def put(path: tuple[Any, ...], array: np.ndarray) -> jax.Array:
    # order="C": hooks return transposed views; np.ascontiguousarray would make 0-d 1-d.
    array = np.asarray(array.astype(config.weight_dtype), order="C")
    sharding = shardings.get(path)
    return jax.device_put(array, sharding.get_value() if sharding is not None else None)

  def our_shape(e: TensorEntry) -> Shape:  # one layer's shape for rows of stacked parameters
    shape = tuple(expected[e.path].get_value().shape)
    return shape if e.layer is None else shape[1:]

  for e in entries:  # every shape and dtype is checked before any data is read
    reader.check_tensor(e.hf_name, e.hook.hf_shape(our_shape(e)), source)
  values: dict[tuple[Any, ...], jax.Array] = {}
  rows: dict[tuple[Any, ...], dict[int, np.ndarray]] = {}
  for e in entries:
    array = e.hook.to_ours(reader.read(e.hf_name), our_shape(e))
    if e.layer is None:
      values[e.path] = put(e.path, array)
      continue
    # A stacked parameter is placed once its last layer is read: one parameter of all
    # layers, not the whole model, is on the host at a time.
    rows.setdefault(e.path, {})[e.layer] = array
    if len(rows[e.path]) == config.num_layers:
      values[e.path] = put(e.path, np.stack([rows[e.path][i] for i in range(config.num_layers)]))
      del rows[e.path]
  for path in _NOT_IN_HF:
    if path in expected:  # the value head: N(0, init_std^2) and a zero bias, as in create_model
      shape = tuple(expected[path].get_value().shape)
      init = (config.init_std * np.random.default_rng(0).standard_normal(shape)
              if path == ("value_head",) else np.zeros(shape))
      values[path] = put(path, init.astype(np.float32))
  unfilled = sorted(_dotted(p) for p in set(expected) - set(values))
  if unfilled:
    raise RuntimeError(f"TENSOR_RULES leave parameter(s) {unfilled} without a source")
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in expected.items()])
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------

SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# (HF name, producer of the array, byte size): a tensor to write, fetched when its shard is.
ExportTensor = tuple[str, Callable[[], np.ndarray], int]
_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "B": 1}


def parse_size(size: int | str) -> int:
  """Bytes in `size`: an int, or a string such as "50KB", "5GB", "2GiB" (HF's units)."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
  if not match:
    raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '500MB'")
  return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])


def save_dtype(dtype: str, allowed: Mapping[str, Any] = SAVE_DTYPES) -> np.dtype:
  """The NumPy dtype of the save dtype name `dtype`; ValueError naming the `allowed` ones."""
  if dtype not in allowed:
    raise ValueError(f"save dtype must be one of {sorted(allowed)}, got {dtype!r}")
  return np.dtype(allowed[dtype])


def eager_tensors(arrays: Mapping[str, np.ndarray]) -> list[ExportTensor]:
  """`arrays` (HF name -> array, already in HF layout) as `write_tensors` entries."""
  return [(name, lambda a=a: a, a.nbytes) for name, a in arrays.items()]


def export_tensors(model: Transformer, dtype: Any, prefixes: Mapping[str, str] | None = None
                   ) -> list[ExportTensor]:
  """(HF name, producer of the array, byte size) per tensor; arrays are fetched lazily.
  `prefixes` places the names inside a composite checkpoint (`stored_name`)."""
  config: ModelConfig = model.config
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  entries = tensor_map(config)
  mapped = {e.path for e in entries}
  unmapped = sorted(_dotted(p) for p in set(flat) - mapped - set(_NOT_IN_HF))
  absent = sorted(_dotted(p) for p in mapped - set(flat))
  if unmapped or absent:
    raise ValueError(
        f"model parameters are not those of a plain Transformer (no HF counterpart: "
        f"{unmapped[:5]}; not a plain nnx.Param: {absent[:5]}); merge LoRA adapters and "
        "dequantize weights (wakea_jax.models.lora.merge_lora) before export")
  if any(p in flat for p in _NOT_IN_HF):
    logging.warning("the value head has no HF counterpart and is not exported")
  out = []
  for e in entries:
    value = flat[e.path].get_value()
    shape = value.shape if e.layer is None else value.shape[1:]
    size = math.prod(shape) * dtype.itemsize
    name = stored_name(e.hf_name, prefixes)
    out.append((name, lambda v=value, h=e.hook, i=e.layer: np.asarray(
        h.to_hf(np.asarray(jax.device_get(v if i is None else v[i]))).astype(dtype), order="C"),
        size))
  return out


def save_model(model: Transformer, path: PathLike, *, dtype: str | None = None,
               max_shard_size: int | str = "5GB", architecture: str | None = None,
               overwrite: bool = False, extra_files: Sequence[PathLike] = (),
               files: Mapping[str, bytes] | None = None) -> pathlib.Path:
  """Writes `model` as an HF checkpoint directory that transformers loads.

  `dtype` (default: the model's param_dtype) is what tensors are stored in. Checkpoints larger
  than `max_shard_size` are split into shards with an index. `architecture` defaults to the
  family inferred from the config (`infer_architecture`). `extra_files` (tokenizer files, a
  generation_config.json, ...) are copied in, and `files` (relative name -> contents, e.g.
  from `checkpoints.tokenizer_files`) written. The directory appears atomically: it is written
  beside `path` and renamed. A previous HF checkpoint at `path` (a directory with config.json)
  is replaced; any other non-empty directory is an error unless `overwrite`.
  """
  config: ModelConfig = model.config
  dtype = dtype or config.param_dtype
  np_dtype = save_dtype(dtype)
  hf_config = config_to_hf(config, architecture, dtype)
  target = pathlib.Path(path).absolute()
  check_writable(target, "config.json", overwrite)
  return write_checkpoint(target, export_tensors(model, np_dtype), hf_config, max_shard_size,
                          extra_files=extra_files, files=files)


def write_checkpoint(target: pathlib.Path, tensors: Sequence[ExportTensor],
                     hf_config: dict[str, Any], max_shard_size: int | str | None, *,
                     extra_files: Sequence[PathLike] = (),
                     files: Mapping[str, bytes] | None = None) -> pathlib.Path:
  """Writes an HF checkpoint directory at `target` atomically: `tensors` (`write_tensors`;
  `max_shard_size` None: one model.safetensors), config.json from `hf_config`, `extra_files`
  copied in and `files` (relative name -> contents) written, all beside `target`, then
  renamed over it (`replace_dir`). The caller checks `target` first (`check_writable`)."""
  limit = math.inf if max_shard_size is None else parse_size(max_shard_size)
  temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  temp.mkdir(parents=True)
  try:
    write_tensors(temp, tensors, limit)
    (temp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for extra in extra_files:
      shutil.copy2(extra, temp / pathlib.Path(extra).name)
    for name, contents in (files or {}).items():
      file = temp / name
      if temp.resolve() not in file.resolve().parents:
        raise ValueError(f"file name {name!r} leaves the checkpoint directory")
      file.parent.mkdir(parents=True, exist_ok=True)
      file.write_bytes(contents)
    replace_dir(temp, target)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return target


def write_tensors(directory: pathlib.Path, tensors: Sequence[ExportTensor],
                  max_shard_size: float) -> None:
  """Writes (HF name, producer, byte size) tensors into `directory` as `model.safetensors`, or
  as shards of at most `max_shard_size` bytes with `model.safetensors.index.json`."""
  shards: list[list[ExportTensor]] = [[]]
  for item in tensors:  # greedy, in order, like transformers; a big tensor gets its own shard
    if shards[-1] and sum(s for *_, s in shards[-1]) + item[2] > max_shard_size:
      shards.append([])
    shards[-1].append(item)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = ("model.safetensors" if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    safetensors.numpy.save_file({n: make() for n, make, _ in shard}, str(directory / name),
                                metadata={"format": "pt"})
    weight_map.update({n: name for n, _, _ in shard})
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(s for *_, s in tensors)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_writable(target: pathlib.Path, marker: str, overwrite: bool) -> None:
  """Refuses to replace a non-empty directory that is not a checkpoint (lacks `marker`)."""
  if (target.exists() and any(target.iterdir()) and not (target / marker).is_file()
      and not overwrite):
    raise FileExistsError(f"{target} is a non-empty directory without {marker}, so not a "
                          "checkpoint this would replace; pass overwrite=True to replace it")


def replace_dir(source: pathlib.Path, target: pathlib.Path) -> None:
  """Renames the finished directory `source` to `target`, replacing what was there."""
  if target.exists() and any(target.iterdir()):
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old)
  else:
    if target.exists():
      target.rmdir()
    source.rename(target)
