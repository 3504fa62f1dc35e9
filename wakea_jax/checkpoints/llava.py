"""HF `LlavaForConditionalGeneration` checkpoints <-> `models.multimodal.VisionLanguageModel`.

Three parts, each read by its own table: the CLIP or SigLIP tower by `checkpoints/vision.py`,
the projector by `checkpoints/projector.py`, the Llama / Qwen2 / Qwen3 language model by the
decoder's `TENSOR_RULES` (`checkpoints/hf.py`) under a prefix. Key layouts:

  released checkpoints (transformers 4.x):
    vision_tower.vision_model.*   multi_modal_projector.*   language_model.model.*
    language_model.lm_head.weight
  transformers 5's save_pretrained: the same, but the tower as vision_tower.* (no
    vision_model.)
  transformers 5's in-memory names (its state_dict):
    model.vision_tower.*   model.multi_modal_projector.*   model.language_model.*
    lm_head.weight

Import reads any of them (each part's prefix found from the keys); export writes the
released layout, which transformers 4 and 5 both load. config.json: `text_config` (Llama by
default), `vision_config` (CLIP by default), `image_token_index` (or `image_token_id`),
`vision_feature_layer` (an int or a list), `vision_feature_select_strategy`,
`projector_hidden_act`, `multimodal_projector_bias`, `tie_word_embeddings` (at the top or in
text_config: LLaVA ties lm_head to the embedding when either is set). Every tensor is checked
against the config before data is read; a missing, mis-shaped or unknown tensor is an error
naming the file and the tensor, an unsupported tower or LM type one naming the field.
Token pooling in the projector is ours alone: such a model cannot be exported.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from flax import nnx

from wakea_jax.checkpoints import composite, hf
from wakea_jax.checkpoints import projector as projector_ckpt
from wakea_jax.checkpoints import vision as vision_ckpt
from wakea_jax.models.multimodal import VisionLanguageConfig, VisionLanguageModel

ARCHITECTURE = "LlavaForConditionalGeneration"
DEFAULT_IMAGE_TOKEN_INDEX = 32000  # LlavaConfig's default
LM_PREFIXES = composite.LM_PREFIXES  # where each layout keeps the decoder's tensors
# Where the tower and the projector live in a LLaVA checkpoint; the first ones are exported.
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.",
                   "model.vision_tower.vision_model.")
_LM_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}
# The config classes' defaults for the sizes a sub-config may omit: transformers 4.x saved
# nested configs as their difference from the defaults, so released LLaVA checkpoints (e.g.
# llava-1.5-7b's text_config) name only what differs from LlamaConfig().
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
_TEXT_DEFAULTS = {"llama": dict(zip(_SIZES, (32000, 4096, 11008, 32, 32))),
                  "qwen2": dict(zip(_SIZES, (151936, 4096, 22016, 32, 32))),
                  "qwen3": dict(zip(_SIZES, (151936, 4096, 22016, 32, 32)))}


def _text_hf_config(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
  """The language model's config dict (`text_config`, a Llama config by default)."""
  text = hf_config.get("text_config")
  if not isinstance(text, dict):
    raise ValueError(f"{source}: field 'text_config' must be an object, got {text!r}")
  text = {"model_type": "llama", **text}
  if text["model_type"] not in _LM_TYPES:
    raise NotImplementedError(f"{source}: text_config.model_type {text['model_type']!r} is not "
                              f"a supported language model (one of {sorted(_LM_TYPES)})")
  given = {k: v for k, v in text.items() if v is not None}
  return {**_TEXT_DEFAULTS[text["model_type"]], **given,
          "architectures": [_LM_TYPES[text["model_type"]]]}


def _feature_layer(value: Any, source: str) -> int | tuple[int, ...]:
  if isinstance(value, list) and value:
    return tuple(hf.int_field(v, "vision_feature_layer", source) for v in value)
  return hf.int_field(value, "vision_feature_layer", source)


def _image_token(hf_config: dict[str, Any], source: str) -> int:
  """`image_token_index` (what transformers writes) or `image_token_id` (its alias)."""
  given = {f: hf_config[f] for f in ("image_token_index", "image_token_id")
           if hf_config.get(f) is not None}
  for field, value in given.items():
    hf.int_field(value, field, source)
  if len(set(given.values())) > 1:
    raise ValueError(f"{source}: image_token_index {given['image_token_index']} and "
                     f"image_token_id {given['image_token_id']} differ")
  return next(iter(given.values()), DEFAULT_IMAGE_TOKEN_INDEX)


def config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json",
                   dtype: str = "float32", param_dtype: str | None = None
                   ) -> VisionLanguageConfig:
  """Our VisionLanguageConfig for a LlavaConfig dict."""
  if hf_config.get("model_type") != "llava":
    raise ValueError(f"{source}: model_type {hf_config.get('model_type')!r} is not 'llava' "
                     f"({ARCHITECTURE})")
  param_dtype = param_dtype or dtype
  text_hf = _text_hf_config(hf_config, source)
  text = hf.config_from_hf(text_hf, source=f"{source}: text_config")
  # LlavaConfig takes tie_word_embeddings from text_config when its own is unset or false.
  tie = bool(hf_config.get("tie_word_embeddings")) or bool(text_hf.get("tie_word_embeddings"))
  text = text.replace(dtype=dtype, param_dtype=param_dtype, tie_embeddings=tie)
  vision = vision_ckpt.vision_config_from_hf(hf_config, source=source)
  vision = vision.replace(dtype=dtype, param_dtype=param_dtype)
  # The text width with its default filled in (see _TEXT_DEFAULTS).
  projector = projector_ckpt.projector_config_from_hf({**hf_config, "text_config": text_hf},
                                                      source=source)
  projector = dataclasses.replace(projector, dtype=dtype, param_dtype=param_dtype)
  strategy = hf_config.get("vision_feature_select_strategy") or "default"
  try:
    return VisionLanguageConfig(
        text=text, vision=vision, projector=projector,
        image_token_id=_image_token(hf_config, source),
        vision_feature_layer=_feature_layer(hf_config.get("vision_feature_layer", -2), source),
        vision_feature_select_strategy=strategy)
  except ValueError as e:
    if str(e).startswith(source):
      raise
    raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: VisionLanguageConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json of a LlavaForConditionalGeneration (sub-configs without `architectures`,
  as transformers writes them). A projector that pools tokens has no HF form: an error."""
  if config.projector.pool_window != 1:
    raise ValueError(f"the projector pools tokens (pool_window={config.projector.pool_window}); "
                     f"HF's LLaVA has no pooling, so this model cannot be exported as "
                     f"{ARCHITECTURE}")
  text = hf.config_to_hf(config.text, None, dtype)
  vision = vision_ckpt.vision_config_to_hf(config.vision, dtype)
  for sub in (text, vision):
    for field in ("architectures", "dtype", "torch_dtype"):
      sub.pop(field, None)
  layer = config.vision_feature_layer
  return {"architectures": [ARCHITECTURE], "model_type": "llava",
          "image_token_index": config.image_token_id, "image_seq_length": config.image_tokens,
          "projector_hidden_act": config.projector.hidden_act,
          "multimodal_projector_bias": config.projector.bias,
          "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
          "vision_feature_select_strategy": config.vision_feature_select_strategy,
          "tie_word_embeddings": config.text.tie_embeddings, "text_config": text,
          "vision_config": vision, "dtype": dtype, "torch_dtype": dtype}


def load_llava(path: hf.PathLike, *, dtype: str = "float32", param_dtype: str | None = None
               ) -> VisionLanguageModel:
  """The VisionLanguageModel of the HF LlavaForConditionalGeneration directory `path`.

  `dtype` is the compute dtype, `param_dtype` (default `dtype`) what weights are stored in.
  Raises ValueError naming the file and tensor for a missing, mis-shaped or unknown tensor (a
  key that belongs to no part is unknown), NotImplementedError naming the field for a tower
  or language model type that is not supported.
  """
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  config = config_from_hf(hf.read_hf_config(directory), source=source, dtype=dtype,
                          param_dtype=param_dtype)
  reader = hf.SafetensorsReader(directory)
  names = set(reader.weight_map)
  lm = composite.lm_prefixes(names, directory)
  vision_prefix = composite.find_prefix(names, VISION_PREFIXES,
                                        "embeddings.patch_embedding.weight", directory,
                                        "vision tower")
  projector_prefix = composite.find_prefix(names, projector_ckpt.PROJECTOR_PREFIXES,
                                           "linear_1.weight", directory, "multi_modal_projector")
  composite.check_parts(reader.weight_map, (vision_prefix, projector_prefix, *lm.values()),
                        directory, ARCHITECTURE)
  model = nnx.eval_shape(lambda: VisionLanguageModel(config, rngs=nnx.Rngs(0)))
  model.vision_tower = vision_ckpt.read_vision_params(reader, config.vision, vision_prefix,
                                                      f"{source} (vision_config)")
  model.projector = projector_ckpt.read_projector_params(reader, config.projector,
                                                         projector_prefix, source)
  model.language_model = hf.read_model(reader, config.text, source=f"{source}: text_config",
                                       prefixes=lm)
  return model


def save_llava(model: VisionLanguageModel, path: hf.PathLike, *, dtype: str = "float32",
               max_shard_size: int | str = "5GB", overwrite: bool = False) -> pathlib.Path:
  """Writes `model` as a LlavaForConditionalGeneration directory (the released layout) that
  transformers' `from_pretrained` loads. Shards past `max_shard_size`; appears atomically; a
  non-checkpoint directory is refused unless `overwrite`."""
  np_dtype = hf.save_dtype(dtype)
  hf_config = config_to_hf(model.config, dtype)
  target = pathlib.Path(path).absolute()
  hf.check_writable(target, "config.json", overwrite)
  parts = {**dict(vision_ckpt.vision_tensors(model.vision_tower, VISION_PREFIXES[0], np_dtype)),
           **dict(projector_ckpt.projector_tensors(model.projector,
                                                   projector_ckpt.PROJECTOR_PREFIXES[0],
                                                   np_dtype))}
  tensors = hf.eager_tensors(parts) + hf.export_tensors(model.language_model, np_dtype,
                                                        LM_PREFIXES["saved"])
  return hf.write_checkpoint(target, tensors, hf_config, max_shard_size)


__all__ = ["ARCHITECTURE", "LM_PREFIXES", "VISION_PREFIXES", "config_from_hf", "config_to_hf",
           "load_llava", "save_llava"]
