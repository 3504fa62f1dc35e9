"""Media prompts given at sampling time: a vision- or audio-language checkpoint's loader and
the preprocessing that turns images and clips into the arrays its sampler takes
(`Sampler.generate(media=)`, the per-row layout of models/media.py without the row axis).

Shared by `python -m wakea_jax.sample --image / --audio` (files) and the server's
`image_url` / `input_audio` content parts (decoded images and WAV bytes), so both prepare a
prompt's media the same way: images as the checkpoint's `preprocessor_config.json` says
(data/images.py, `transformers`' image processor), clips as Whisper log-mel features
(data/audio.py) at the feature extractor's sampling rate, at most its window long.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from wakea_jax.checkpoints import hf, loader
from wakea_jax.checkpoints.llava import load_llava
from wakea_jax.checkpoints.qwen2_audio import load_qwen2_audio
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data.audio import FeatureConfig, log_mel_features
from wakea_jax.data.images import ImageConfig, preprocess_batch
from wakea_jax.models.multimodal import AudioLanguageModel, VisionLanguageModel

# config.json model_type -> the loader of a model that takes media.
MEDIA_MODEL_TYPES = {"llava": load_llava, "qwen2_audio": load_qwen2_audio}


def load_checkpoint(checkpoint: str) -> nnx.Module:
  """The model at `checkpoint`: a VisionLanguageModel / AudioLanguageModel for an HF
  directory whose config.json has model_type "llava" / "qwen2_audio", else
  `loader.load_model`'s text decoder. FileNotFoundError names --checkpoint."""
  try:
    kind, directory = loader.resolve(checkpoint)
    model_type = hf.read_hf_config(directory).get("model_type") if kind == "hf" else None
    if model_type in MEDIA_MODEL_TYPES:
      return MEDIA_MODEL_TYPES[model_type](directory)
    return loader.load_model(checkpoint)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--checkpoint: {e}") from None


def media_kind(model: nnx.Module) -> str:
  """"image", "audio", or "" for a model that takes text only."""
  if isinstance(model, VisionLanguageModel):
    return "image"
  if isinstance(model, AudioLanguageModel):
    return "audio"
  return ""


@dataclasses.dataclass(frozen=True)
class MediaInputs:
  """How one checkpoint's prompts take media: its placeholders and token counts (`config`)
  and the preprocessing of its kind of media (`image` or `features`)."""
  kind: str                                # "image" | "audio"
  config: mm_data.MediaConfig
  image: ImageConfig | None = None
  features: FeatureConfig | None = None
  image_size: int = 0                      # the vision tower's input side
  source: str = ""                         # the preprocessor_config.json read

  def images(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
    """Images (PIL images, arrays or paths) -> pixel_values [k, 3, H, W], image_mask [k]."""
    pixels = preprocess_batch(list(images), self.image)
    if len(pixels) and pixels.shape[-2:] != (self.image_size, self.image_size):
      raise ValueError(f"{self.source} preprocesses images to {pixels.shape[-2:]}, but the "
                       f"vision tower takes {self.image_size}x{self.image_size}")
    return {"pixel_values": pixels, "image_mask": np.ones((len(pixels),), np.int32)}

  def clips(self, clips: Sequence[tuple[np.ndarray, str]]
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Clips (mono samples at the feature extractor's rate, as `data.audio.load_audio`
    returns them, and where they came from) -> (input_features [k, mels, F] +
    feature_attention_mask [k, F], placeholder tokens per clip [k]). A clip longer than the
    feature extractor's window is a ValueError naming `where`."""
    features = self.features
    for samples, where in clips:
      if samples.shape[0] > features.n_samples:
        raise ValueError(f"{where} is {samples.shape[0] / features.sampling_rate:.2f} s long, "
                         f"longer than the feature extractor's {features.chunk_length} s "
                         "window (the rest would be cut off); split the clip")
    if clips:
      mels, frames = log_mel_features([c[0] for c in clips], features)
    else:
      mels = np.zeros((0, features.feature_size, features.num_frames), np.float32)
      frames = np.zeros((0, features.num_frames), np.int32)
    return ({"input_features": mels, "feature_attention_mask": frames},
            mm_data.audio_token_counts(frames, self.config))


def media_inputs_for(model: nnx.Module, checkpoint: str, label: str) -> MediaInputs:
  """The `MediaInputs` of a vision- or audio-language `model` loaded from `checkpoint`, from
  its `preprocessor_config.json` (FileNotFoundError when missing, ValueError when it does not
  fit the tower; both start with `label`, e.g. the flag at fault)."""
  kind = media_kind(model)
  if not kind:
    raise ValueError(f"{label}: {checkpoint} holds a {type(model).__name__}, which takes "
                     "text only")
  file = loader.resolve(checkpoint)[1] / "preprocessor_config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{label}: {file} is missing; a{'n' if kind == 'image' else ''} "
                            f"{kind} checkpoint needs its preprocessor_config.json (the HF "
                            f"processor's) to preprocess {kind} inputs")
  if kind == "image":
    image = ImageConfig.from_json(file)
    return MediaInputs("image", mm_data.MediaConfig.for_vision(model.config, image),
                       image=image, image_size=model.config.vision.image_size, source=str(file))
  features = FeatureConfig.from_json(file)
  audio = model.config.audio
  if (features.feature_size, features.num_frames) != (audio.num_mel_bins,
                                                      2 * audio.max_source_positions):
    raise ValueError(f"{label}: {file} gives {features.feature_size} mel bins x "
                     f"{features.num_frames} frames, but the audio tower takes "
                     f"{audio.num_mel_bins} x {2 * audio.max_source_positions}")
  return MediaInputs("audio", mm_data.MediaConfig.for_audio(model.config, features),
                     features=features, source=str(file))


__all__ = ["MEDIA_MODEL_TYPES", "MediaInputs", "load_checkpoint", "media_inputs_for",
           "media_kind"]
