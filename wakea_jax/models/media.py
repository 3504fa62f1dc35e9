"""Media in a batch, and a multimodal model bound to a batch's media.

Every objective (SFT, the DPO family, the GRPO family, PPO) is written against the text
decoder's interface: `model.forward(input_ids, positions=, segment_ids=, attention_mask=,
cache=)`, `model.head_matrix()`, `model.config`. `bind_media(model, batch)` gives a
`VisionLanguageModel` / `AudioLanguageModel` exactly that interface, with the batch's media
fused into the token embeddings, so the same loss functions train multimodal models
unchanged (`with_media(loss_fn)` wraps one for the train step).

The per-row layout (every array's first axis is the batch row, so a media batch shards,
splits into micro-batches and concatenates, e.g. chosen + rejected, like its token arrays):

  pixel_values            float [B, k, C, H, W]  up to k images per row, in placeholder order
  image_mask              int   [B, k]           1 for real images; padding images come last
  input_features          float [B, k, mels, F]  up to k log-mel clips per row
  feature_attention_mask  int   [B, k, F]        real frames; a padding clip's row is all 0
                                                 (it yields no tokens)

With a frozen tower and `config.media.cache_features` (train/cached_features.py) the batch
carries the tower's stored output instead of the pixels / log-mels, and the model runs only
the projector on it (gradients reach the projector and decoder as before):

  image_tower_features    float [B, k, T, D]     `VisionLanguageModel.encode_images` of each
                                                 slot (LLaVA's selected layers, before the
                                                 projector), with `image_mask` as above
  audio_tower_features    float [B, k, T, D]     `AudioLanguageModel.encode_audios` (pooled)
  audio_tower_mask        int   [B, k, T]        its real tokens; a padding clip's row is all 0

Placeholders are filled row-major (`models.multimodal.scatter_media`), so a row's items must
be in the order of its placeholders, and a packed row's items in segment order; the data side
(`data/media_batches.py`) builds batches that way and checks the counts on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
from jax import Array

from wakea_jax.models.multimodal import AudioLanguageModel, VisionLanguageModel
from wakea_jax.models.transformer import DecoderOutput

IMAGE_KEYS = ("pixel_values", "image_mask")
AUDIO_KEYS = ("input_features", "feature_attention_mask")
# The cached tower outputs that replace pixel_values / the log-mels (media.cache_features).
CACHED_IMAGE_KEYS = ("image_tower_features", "image_mask")
CACHED_AUDIO_KEYS = ("audio_tower_features", "audio_tower_mask")
MEDIA_KEYS = IMAGE_KEYS + AUDIO_KEYS + ("image_tower_features",) + CACHED_AUDIO_KEYS

LossFn = Callable[[Any, dict[str, Array], Array], tuple[Array, dict[str, Array]]]


def media_of(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The media arrays of a batch (the MEDIA_KEYS it has)."""
  return {k: batch[k] for k in MEDIA_KEYS if k in batch}


def is_multimodal(model: Any) -> bool:
  """Whether `model` takes media (a vision- or audio-language model)."""
  return isinstance(model, VisionLanguageModel | AudioLanguageModel)


def text_model(model: Any) -> Any:
  """The text decoder of a multimodal model; `model` itself otherwise."""
  return model.language_model if is_multimodal(model) else model


class MediaBound:
  """A multimodal model with one batch's media bound to it, used like its text decoder.

  `forward` / `__call__` take the decoder's arguments and fuse the bound media into the
  embeddings of `input_ids` (a call with a KV cache appends to it as usual). Every other
  attribute (`config`, `head_matrix`, `value_from`, ...) is the text decoder's.
  """

  def __init__(self, model: VisionLanguageModel | AudioLanguageModel,
               media: Mapping[str, Array]) -> None:
    vision = isinstance(model, VisionLanguageModel)
    keys, cached = (IMAGE_KEYS, CACHED_IMAGE_KEYS) if vision else (AUDIO_KEYS, CACHED_AUDIO_KEYS)
    other = sorted(set(media) - set(keys) - set(cached))
    if other:
      kind = "vision" if vision else "audio"
      raise ValueError(f"the batch has {other}, which a {kind}-language model does not take")
    if keys[0] in media and cached[0] in media:
      raise ValueError(f"the batch has both {keys[0]} and {cached[0]}; give one (the cached "
                       "tower output replaces the raw media)")
    self.model = model
    self.media = dict(media)

  def embed(self, input_ids: Array) -> Array:
    """Token embeddings [b, t, embed] with the bound media fused in."""
    if not self.media:
      return self.model.language_model.embed_tokens(input_ids)
    return self.model.embed(input_ids, **self.media)

  def forward(self, input_ids: Array, *, positions: Array | None = None,
              segment_ids: Array | None = None, attention_mask: Array | None = None,
              cache: Any = None) -> DecoderOutput:
    """The text decoder's output on the fused sequence."""
    return self.model.language_model.forward(
        inputs_embeds=self.embed(input_ids), positions=positions, segment_ids=segment_ids,
        attention_mask=attention_mask, cache=cache)

  def __call__(self, input_ids: Array, **kwargs: Any) -> Any:
    """Float32 logits [b, t, vocab]; with `cache=`, (logits, new_cache)."""
    out = self.forward(input_ids, **kwargs)
    return out.logits if kwargs.get("cache") is None else (out.logits, out.cache)

  def __getattr__(self, name: str) -> Any:
    return getattr(self.model.language_model, name)


def bind_media(model: nnx.Module, batch: Mapping[str, Any]) -> Any:
  """`model` ready for a text objective on `batch`: a `MediaBound` for a multimodal model
  (with no media in the batch it runs the text path), the model itself for a text decoder,
  which must then get no media (a ValueError names the keys)."""
  if isinstance(model, MediaBound):
    return model   # already bound (a loss wrapped in `with_media` that scores through here)
  media = media_of(batch)
  if is_multimodal(model):
    return MediaBound(model, media)  # type: ignore[arg-type]
  if media:
    raise ValueError(f"the batch has media {sorted(media)} but the model "
                     f"({type(model).__name__}) takes text only")
  return model


def with_media(loss_fn: LossFn) -> LossFn:
  """`loss_fn(model, batch, rng)` run on `bind_media(model, batch)`: the same loss for a text
  decoder and for a multimodal model fed the batch's media."""

  def media_loss_fn(model: Any, batch: dict[str, Array], rng: Array
                    ) -> tuple[Array, dict[str, Array]]:
    return loss_fn(bind_media(model, batch), batch, rng)

  return media_loss_fn


__all__ = ["AUDIO_KEYS", "CACHED_AUDIO_KEYS", "CACHED_IMAGE_KEYS", "IMAGE_KEYS", "MEDIA_KEYS",
           "MediaBound", "bind_media", "is_multimodal", "media_of", "text_model", "with_media"]
