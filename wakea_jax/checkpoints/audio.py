"""HF Whisper and Qwen2-Audio audio towers <-> `models.audio`, without PyTorch.

Layouts read (the encoder's tensors sit under a prefix found from the checkpoint's keys):

  WhisperModel                          encoder.*          (config: model_type "whisper")
  WhisperForConditionalGeneration       model.encoder.*
  WhisperEncoder (bare, as we export)   *
  Qwen2AudioForConditionalGeneration    audio_tower.*      (config: audio_config nested,
                                        multi_modal_projector.linear.*   text_config for the
                                                                         projector's width)
  Qwen2AudioEncoder (bare)              *                  (model_type "qwen2_audio_encoder")

The name map is data (`ENCODER_RULES`, `PROJECTOR_RULES`) with the decoder's layout hooks
(`checkpoints/hf.py`) plus one for conv kernels. Every tensor is checked: a missing or
mis-shaped one is an error naming the file and the tensor, as is an encoder tensor the table
does not know. Other tensors of a composite checkpoint (the Whisper decoder, the language
model) are left for their own importers.

Export writes a bare encoder directory (`save_audio_encoder`) that `WhisperEncoder` /
`Qwen2AudioEncoder.from_pretrained` load; `encoder_tensors` / `projector_tensors` give the
HF-named arrays for a composite exporter to place under its own prefix.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wakea_jax.checkpoints.composite import find_prefix
from wakea_jax.checkpoints.hf import (
  HOOKS,
  Hook,
  PathLike,
  SafetensorsReader,
  TensorRule,
  check_writable,
  eager_tensors,
  read_hf_config,
  save_dtype,
  write_checkpoint,
)
from wakea_jax.models.audio import AudioEncoder, AudioEncoderConfig, AudioProjector

# nn.Conv1d [out, in, kernel] <-> ours [kernel, in, out].
AUDIO_HOOKS: dict[str, Hook] = {
    **HOOKS,
    "conv1d": Hook(lambda x, s: x.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0),
                   lambda s: s[::-1]),
}

_L = "layers.{i}."
ENCODER_RULES: tuple[TensorRule, ...] = (
    TensorRule("conv1.weight", "conv1", "conv1d"),
    TensorRule("conv1.bias", "conv1_bias", "identity"),
    TensorRule("conv2.weight", "conv2", "conv1d"),
    TensorRule("conv2.bias", "conv2_bias", "identity"),
    TensorRule("embed_positions.weight", "position_embed", "identity"),
    TensorRule(_L + "self_attn_layer_norm.weight", "layers.{i}.attn_norm.scale", "identity"),
    TensorRule(_L + "self_attn_layer_norm.bias", "layers.{i}.attn_norm.bias", "identity"),
    TensorRule(_L + "self_attn.q_proj.weight", "layers.{i}.attn.q_proj", "split_heads"),
    TensorRule(_L + "self_attn.q_proj.bias", "layers.{i}.attn.q_bias", "split_bias"),
    # HF's WhisperAttention has no k bias (a bias on keys cancels in the softmax).
    TensorRule(_L + "self_attn.k_proj.weight", "layers.{i}.attn.k_proj", "split_heads"),
    TensorRule(_L + "self_attn.v_proj.weight", "layers.{i}.attn.v_proj", "split_heads"),
    TensorRule(_L + "self_attn.v_proj.bias", "layers.{i}.attn.v_bias", "split_bias"),
    TensorRule(_L + "self_attn.out_proj.weight", "layers.{i}.attn.o_proj", "merge_heads"),
    TensorRule(_L + "self_attn.out_proj.bias", "layers.{i}.attn.o_bias", "identity"),
    TensorRule(_L + "final_layer_norm.weight", "layers.{i}.mlp_norm.scale", "identity"),
    TensorRule(_L + "final_layer_norm.bias", "layers.{i}.mlp_norm.bias", "identity"),
    TensorRule(_L + "fc1.weight", "layers.{i}.mlp.up_proj", "linear_in_out"),
    TensorRule(_L + "fc1.bias", "layers.{i}.mlp.up_bias", "identity"),
    TensorRule(_L + "fc2.weight", "layers.{i}.mlp.down_proj", "linear_in_out"),
    TensorRule(_L + "fc2.bias", "layers.{i}.mlp.down_bias", "identity"),
    TensorRule("layer_norm.weight", "final_norm.scale", "identity"),
    TensorRule("layer_norm.bias", "final_norm.bias", "identity"),
)
PROJECTOR_RULES: tuple[TensorRule, ...] = (
    TensorRule("linear.weight", "weight", "linear_in_out"),
    TensorRule("linear.bias", "bias", "identity"),
)
# Where the encoder sits in each layout, most specific first (a bare encoder has no prefix).
ENCODER_PREFIXES = ("model.encoder.", "encoder.", "model.audio_tower.", "audio_tower.", "")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")

# Defaults of the transformers config classes for fields a config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "whisper": dict(num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
                    encoder_ffn_dim=1536, max_source_positions=1500,
                    activation_function="gelu"),
    "qwen2_audio_encoder": dict(num_mel_bins=128, d_model=1280, encoder_layers=32,
                                encoder_attention_heads=20, encoder_ffn_dim=5120,
                                max_source_positions=1500, activation_function="gelu"),
}
_INT_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
               "encoder_ffn_dim", "max_source_positions")


def encoder_hf_config(hf_config: dict[str, Any], source: str = "config.json"
                      ) -> tuple[dict[str, Any], str]:
  """(the audio encoder's own config dict, its model_type) from a checkpoint's config.json:
  top level for Whisper and a bare Qwen2AudioEncoder, `audio_config` in composite configs."""
  raw = hf_config.get("audio_config", hf_config)
  where = f"{source}: audio_config" if raw is not hf_config else source
  if not isinstance(raw, dict):
    raise ValueError(f"{where} must be an object, got {raw!r}")
  model_type = raw.get("model_type")
  if model_type is None and hf_config.get("model_type") == "qwen2_audio":
    model_type = "qwen2_audio_encoder"  # Qwen2AudioConfig's default audio_config
  if model_type not in _HF_DEFAULTS:
    raise NotImplementedError(f"{where}: model_type {model_type!r} is not an audio encoder we "
                              f"read (one of {sorted(_HF_DEFAULTS)})")
  return raw, model_type


def audio_config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json",
                         dtype: str = "float32", param_dtype: str | None = None
                         ) -> AudioEncoderConfig:
  """Our AudioEncoderConfig for an HF Whisper / Qwen2-Audio (encoder) config dict."""
  raw, model_type = encoder_hf_config(hf_config, source)
  hf = {**_HF_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None}}
  for field in _INT_FIELDS:
    if isinstance(hf[field], bool) or not isinstance(hf[field], int):
      raise ValueError(f"{source}: field '{field}' must be an integer, got {hf[field]!r}")
  try:
    return AudioEncoderConfig(
        num_mel_bins=hf["num_mel_bins"], d_model=hf["d_model"],
        encoder_layers=hf["encoder_layers"],
        encoder_attention_heads=hf["encoder_attention_heads"],
        encoder_ffn_dim=hf["encoder_ffn_dim"], max_source_positions=hf["max_source_positions"],
        activation_function=hf["activation_function"],
        avg_pool=model_type == "qwen2_audio_encoder", dtype=dtype,
        param_dtype=param_dtype or dtype)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def audio_config_to_hf(config: AudioEncoderConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json of a bare encoder: WhisperConfig for Whisper (the decoder fields take
  transformers' defaults), Qwen2AudioEncoderConfig for the pooled variant."""
  fields = dict(num_mel_bins=config.num_mel_bins, d_model=config.d_model,
                encoder_layers=config.encoder_layers,
                encoder_attention_heads=config.encoder_attention_heads,
                encoder_ffn_dim=config.encoder_ffn_dim,
                max_source_positions=config.max_source_positions,
                activation_function=config.activation_function, scale_embedding=False,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                encoder_layerdrop=0.0, dtype=dtype, torch_dtype=dtype)
  if config.avg_pool:
    return {"architectures": ["Qwen2AudioEncoder"], "model_type": "qwen2_audio_encoder",
            "initializer_range": config.init_std, **fields}
  return {"architectures": ["WhisperEncoder"], "model_type": "whisper",
          "init_std": config.init_std, **fields}


def _expand(rules: tuple[TensorRule, ...], num_layers: int, prefix: str
            ) -> list[tuple[str, str, Hook]]:
  """(HF name, our dotted path, hook) for every tensor of the rules."""
  out = []
  for rule in rules:
    for i in (range(num_layers) if "{i}" in rule.hf else (0,)):
      out.append((prefix + rule.hf.format(i=i), rule.ours.format(i=i), AUDIO_HOOKS[rule.hook]))
  return out


def _load(module: nnx.Module, reader: SafetensorsReader, entries: list[tuple[str, str, Hook]],
          source: str) -> nnx.Module:
  """`module` with every parameter read through `entries`; shapes checked before reading."""
  graphdef, abstract_state = nnx.split(module)
  expected = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
  param_dtype = next(iter(expected.values()))[1].get_value().dtype
  missing = [n for n, _, _ in entries if n not in reader.weight_map]
  if missing:
    raise ValueError(f"{reader.directory}: tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} missing; {source} implies them")
  for name, ours, hook in entries:
    reader.check_tensor(name, hook.hf_shape(tuple(expected[ours][1].get_value().shape)), source)
  values = {ours: np.asarray(hook.to_ours(reader.read(name), tuple(
      expected[ours][1].get_value().shape)).astype(param_dtype), order="C")
            for name, ours, hook in entries}
  unfilled = sorted(set(expected) - set(values))
  if unfilled:
    raise RuntimeError(f"the audio tensor rules leave parameter(s) {unfilled} without a source")
  state = nnx.from_flat_state(
      [(p, v.replace(jnp.asarray(values[name]))) for name, (p, v) in expected.items()])
  return nnx.merge(graphdef, state)


def load_audio_encoder(path: PathLike, *, dtype: str = "float32",
                       param_dtype: str | None = None) -> AudioEncoder:
  """The audio encoder of the HF checkpoint directory `path` (any layout in the module doc).

  `dtype` is the compute dtype, `param_dtype` (default `dtype`) what weights are stored in.
  Raises ValueError naming the file and tensor for a missing, mis-shaped or unknown encoder
  tensor.
  """
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  config = audio_config_from_hf(read_hf_config(directory), source=source, dtype=dtype,
                                param_dtype=param_dtype)
  reader = SafetensorsReader(directory)
  keys = set(reader.weight_map)
  prefix = find_prefix(keys, ENCODER_PREFIXES, "conv1.weight", directory, "audio encoder")
  entries = _expand(ENCODER_RULES, config.encoder_layers, prefix)
  wanted = {n for n, _, _ in entries}
  # Only keys under the prefix are the encoder's; a bare encoder owns every key except a
  # composite's other parts (which would have had a prefix match first).
  owned = [k for k in keys if k.startswith(prefix)] if prefix else list(keys)
  extra = sorted(k for k in owned if k not in wanted)
  if extra:
    raise ValueError(f"{directory}: unexpected audio encoder tensor(s) {extra[:5]} "
                     f"({len(extra)} in all, e.g. in {reader.weight_map[extra[0]]}) not "
                     f"described by {source}")
  abstract = nnx.eval_shape(lambda: AudioEncoder(config, rngs=nnx.Rngs(0)))
  return _load(abstract, reader, entries, source)


def load_audio_projector(path: PathLike, *, dtype: str = "float32",
                         param_dtype: str | None = None) -> AudioProjector:
  """Qwen2-Audio's `multi_modal_projector` (audio width -> text_config.hidden_size)."""
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  hf_config = read_hf_config(directory)
  audio = audio_config_from_hf(hf_config, source=source)
  text = hf_config.get("text_config")
  if not isinstance(text, dict) or not isinstance(text.get("hidden_size"), int):
    raise ValueError(f"{source}: field 'text_config.hidden_size' is missing; a projector "
                     "checkpoint is a composite (Qwen2AudioForConditionalGeneration) config")
  reader = SafetensorsReader(directory)
  prefix = find_prefix(set(reader.weight_map), PROJECTOR_PREFIXES, "linear.weight", directory,
                       "multi_modal_projector")
  entries = _expand(PROJECTOR_RULES, 0, prefix)
  abstract = nnx.eval_shape(lambda: AudioProjector(
      audio.d_model, text["hidden_size"], dtype=dtype, param_dtype=param_dtype or dtype,
      rngs=nnx.Rngs(0)))
  return _load(abstract, reader, entries, source)


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def _to_hf(module: nnx.Module, entries: list[tuple[str, str, Hook]], dtype: Any
           ) -> dict[str, np.ndarray]:
  flat = {".".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  odd = sorted(set(flat) ^ {ours for _, ours, _ in entries})
  if odd:
    raise ValueError(f"parameters {odd[:5]} are not those of a plain {type(module).__name__}")
  return {name: np.asarray(hook.to_hf(np.asarray(jax.device_get(flat[ours]), np.float32))
                           .astype(dtype), order="C")
          for name, ours, hook in entries}


def encoder_tensors(encoder: AudioEncoder, prefix: str = "", dtype: Any = np.float32
                    ) -> dict[str, np.ndarray]:
  """The encoder's tensors by HF name under `prefix` ("audio_tower." in a Qwen2-Audio model)."""
  return _to_hf(encoder, _expand(ENCODER_RULES, encoder.config.encoder_layers, prefix), dtype)


def projector_tensors(projector: AudioProjector, prefix: str = "multi_modal_projector.",
                      dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """The projector's tensors by HF name (Qwen2-Audio's `multi_modal_projector.linear.*`)."""
  return _to_hf(projector, _expand(PROJECTOR_RULES, 0, prefix), dtype)


_SAVE_DTYPES = {"float32": np.float32, "float16": np.float16}


def save_audio_encoder(encoder: AudioEncoder, path: PathLike, *, dtype: str = "float32",
                       overwrite: bool = False) -> pathlib.Path:
  """Writes a bare HF encoder directory (config.json + model.safetensors) that
  `WhisperEncoder.from_pretrained` (or `Qwen2AudioEncoder.from_pretrained` for a pooled
  encoder) loads. It appears atomically; a non-checkpoint directory is refused unless
  `overwrite`."""
  np_dtype = save_dtype(dtype, _SAVE_DTYPES)
  target = pathlib.Path(path).absolute()
  check_writable(target, "config.json", overwrite)
  tensors = encoder_tensors(encoder, dtype=np_dtype)
  return write_checkpoint(target, eager_tensors(tensors),
                          audio_config_to_hf(encoder.config, dtype), None)


__all__ = ["AUDIO_HOOKS", "ENCODER_PREFIXES", "ENCODER_RULES", "PROJECTOR_RULES",
           "audio_config_from_hf", "audio_config_to_hf", "encoder_hf_config", "encoder_tensors",
           "load_audio_encoder", "load_audio_projector", "projector_tensors",
           "save_audio_encoder"]

