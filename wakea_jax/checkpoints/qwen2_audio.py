"""HF `Qwen2AudioForConditionalGeneration` checkpoints <-> `models.multimodal.AudioLanguageModel`.

Three parts, each read by its own table: the audio tower and the projector by
`checkpoints/audio.py`, the Qwen2 language model by the decoder's `TENSOR_RULES`
(`checkpoints/hf.py`) under a prefix. Two key layouts exist:

  as saved (released checkpoints, and transformers' save_pretrained, 4.x and 5.x alike):
    audio_tower.*   multi_modal_projector.linear.*   language_model.model.*
    language_model.lm_head.weight
  transformers 5's in-memory names (its state_dict):
    model.audio_tower.*   model.multi_modal_projector.linear.*   model.language_model.*
    lm_head.weight

Import reads either (found from the keys); export writes the saved layout, which
`from_pretrained` of transformers 4 and 5 both load. config.json: `text_config` (a Qwen2
config), `audio_config` (Qwen2AudioEncoderConfig) and `audio_token_index`. Every tensor is
checked against the config before data is read; a missing, mis-shaped or unknown tensor is
an error naming the file and the tensor.
"""

from __future__ import annotations

import pathlib
from typing import Any

from flax import nnx

from wakea_jax.checkpoints import audio as audio_ckpt
from wakea_jax.checkpoints import composite, hf
from wakea_jax.models.multimodal import AudioLanguageConfig, AudioLanguageModel

ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
DEFAULT_AUDIO_TOKEN_INDEX = 151646  # Qwen2AudioConfig's default
LM_PREFIXES = composite.LM_PREFIXES  # where each layout keeps the decoder's tensors
_OTHER_PARTS = ("audio_tower.", "multi_modal_projector.", "model.audio_tower.",
                "model.multi_modal_projector.")


def text_hf_config(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
  """The language model's config dict (`text_config`, a Qwen2 config by default)."""
  text = hf_config.get("text_config")
  if not isinstance(text, dict):
    raise ValueError(f"{source}: field 'text_config' must be an object, got {text!r}")
  return {"model_type": "qwen2", **text}


def config_from_hf(hf_config: dict[str, Any], *, source: str = "config.json",
                   dtype: str = "float32", param_dtype: str | None = None
                   ) -> AudioLanguageConfig:
  """Our AudioLanguageConfig for a Qwen2AudioConfig dict."""
  if hf_config.get("model_type") != "qwen2_audio":
    raise ValueError(f"{source}: model_type {hf_config.get('model_type')!r} is not "
                     f"'qwen2_audio' ({ARCHITECTURE})")
  text = hf.config_from_hf(text_hf_config(hf_config, source), source=f"{source}: text_config")
  # Qwen2AudioForConditionalGeneration never ties lm_head to the embedding (it declares no
  # tied weights; text_config.tie_word_embeddings does not reach it): lm_head is always read.
  text = text.replace(dtype=dtype, param_dtype=param_dtype or dtype, tie_embeddings=False)
  audio = audio_ckpt.audio_config_from_hf(hf_config, source=source, dtype=dtype,
                                          param_dtype=param_dtype)
  token = hf_config.get("audio_token_index", DEFAULT_AUDIO_TOKEN_INDEX)
  if isinstance(token, bool) or not isinstance(token, int):
    raise ValueError(f"{source}: field 'audio_token_index' must be an integer, got {token!r}")
  try:
    return AudioLanguageConfig(text=text, audio=audio, audio_token_id=token)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def config_to_hf(config: AudioLanguageConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json of a Qwen2AudioForConditionalGeneration (sub-configs without
  `architectures`, as transformers writes them)."""
  text = hf.config_to_hf(config.text, "Qwen2ForCausalLM", dtype)
  text["tie_word_embeddings"] = False  # see config_from_hf; a tied model is saved untied
  audio = audio_ckpt.audio_config_to_hf(config.audio, dtype)
  for sub in (text, audio):
    for field in ("architectures", "dtype", "torch_dtype"):
      sub.pop(field, None)
  return {"architectures": [ARCHITECTURE], "model_type": "qwen2_audio",
          "audio_token_index": config.audio_token_id, "text_config": text,
          "audio_config": audio, "dtype": dtype, "torch_dtype": dtype}


def load_qwen2_audio(path: hf.PathLike, *, dtype: str = "float32",
                     param_dtype: str | None = None) -> AudioLanguageModel:
  """The AudioLanguageModel of the HF Qwen2AudioForConditionalGeneration directory `path`.

  `dtype` is the compute dtype, `param_dtype` (default `dtype`) what weights are stored in.
  Raises ValueError naming the file and tensor for a missing, mis-shaped or unknown tensor
  (a key that belongs to no part is unknown).
  """
  directory = pathlib.Path(path)
  source = str(directory / "config.json")
  config = config_from_hf(hf.read_hf_config(directory), source=source, dtype=dtype,
                          param_dtype=param_dtype)
  reader = hf.SafetensorsReader(directory)
  prefixes = composite.lm_prefixes(set(reader.weight_map), directory)
  composite.check_parts(reader.weight_map, _OTHER_PARTS + tuple(prefixes.values()), directory,
                        ARCHITECTURE)
  language_model = hf.read_model(reader, config.text, source=f"{source}: text_config",
                                 prefixes=prefixes)
  model = nnx.eval_shape(lambda: AudioLanguageModel(config, rngs=nnx.Rngs(0)))
  model.audio_tower = audio_ckpt.load_audio_encoder(directory, dtype=dtype,
                                                    param_dtype=param_dtype)
  model.projector = audio_ckpt.load_audio_projector(directory, dtype=dtype,
                                                    param_dtype=param_dtype)
  model.language_model = language_model
  return model


def save_qwen2_audio(model: AudioLanguageModel, path: hf.PathLike, *, dtype: str = "float32",
                     max_shard_size: int | str = "5GB", overwrite: bool = False
                     ) -> pathlib.Path:
  """Writes `model` as a Qwen2AudioForConditionalGeneration directory (the saved layout) that
  transformers' `from_pretrained` loads. Shards past `max_shard_size`; appears atomically; a
  non-checkpoint directory is refused unless `overwrite`."""
  np_dtype = hf.save_dtype(dtype)
  hf_config = config_to_hf(model.config, dtype)
  target = pathlib.Path(path).absolute()
  hf.check_writable(target, "config.json", overwrite)
  prefixes = LM_PREFIXES["saved"]
  tensors = hf.export_tensors(model.language_model, np_dtype, prefixes)
  if model.config.text.tie_embeddings:  # HF's Qwen2-Audio does not tie: lm_head is the table
    embed = next(t for t in tensors
                 if t[0] == hf.stored_name("model.embed_tokens.weight", prefixes))
    tensors.append((hf.stored_name("lm_head.weight", prefixes), embed[1], embed[2]))
  parts = {**audio_ckpt.encoder_tensors(model.audio_tower, "audio_tower.", np_dtype),
           **audio_ckpt.projector_tensors(model.projector, "multi_modal_projector.", np_dtype)}
  return hf.write_checkpoint(target, hf.eager_tensors(parts) + tensors, hf_config,
                             max_shard_size)


__all__ = ["ARCHITECTURE", "LM_PREFIXES", "config_from_hf", "config_to_hf", "load_qwen2_audio",
           "save_qwen2_audio", "text_hf_config"]
