"""Fusing media features into the decoder's token sequence; the Qwen2-Audio and LLaVA models.

The HF convention (Qwen2-Audio, LLaVA): the prompt holds one placeholder token id
(`audio_token_index` / `image_token_index` in config.json) per media token, the processor
having expanded each `<|AUDIO|>` / `<image>` to as many copies as the encoder gives tokens.
The decoder's input is the token embeddings with the media features written over the
placeholder positions, in order: `torch.Tensor.masked_scatter` semantics, the k-th
placeholder of the batch (row-major) taking the k-th real media token (media by media, each
in token order). Everything after that is the text path (`Transformer.forward(inputs_embeds=)`).

`expand_placeholders` turns one placeholder per item (as a chat is written and tokenised)
into the expanded form, with any per-token arrays alongside. `scatter_media` is the jittable
fusion. Under `jit` it cannot raise, so the counts are checked on the host, where the data
is: `check_media_placement` (NumPy) raises a ValueError naming both counts when the
placeholders and the media tokens differ in number, and one naming the media item when an
item's tokens would land in two examples (two rows, or two segments of a packed row): with
packing the in-order scatter would otherwise move one example's media into another's
placeholders. `AudioLanguageModel.forward` runs the check itself when its inputs are
concrete (called outside `jit`).

`AudioLanguageModel` is Qwen2AudioForConditionalGeneration: Whisper-style audio tower with
Qwen2-Audio's pool (`models/audio.py`) -> one-Linear projector -> fusion -> Qwen2 decoder.
Checkpoints are `checkpoints/qwen2_audio.py`.

`VisionLanguageModel` is LlavaForConditionalGeneration: ViT tower (`models/vision.py`) ->
`select_features` (vision_feature_layer, vision_feature_select_strategy) -> two-layer MLP
projector (`models/projector.py`, with optional token pooling of ours) -> fusion -> decoder.
Checkpoints are `checkpoints/llava.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from wakea_jax.models.audio import AudioEncoder, AudioEncoderConfig, AudioProjector, output_lengths
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.layers import KVCache
from wakea_jax.models.projector import Projector, ProjectorConfig
from wakea_jax.models.transformer import DecoderOutput, Transformer
from wakea_jax.models.vision import (
    VisionConfig,
    VisionTower,
    layers_needed,
    num_image_tokens,
    select_features,
)


def scatter_media(embeds: Array, placeholders: Array, features: Array,
                  feature_mask: Array | None = None) -> Array:
  """`embeds` with the real media tokens written over the placeholder positions, in order.

  embeds        [b, t, e] token embeddings.
  placeholders  [b, t] bool, True at placeholder tokens (`input_ids == placeholder_id`).
  features      [n, m, e] projected media features, n items of up to m tokens.
  feature_mask  [n, m] bool, True for real tokens (e.g. `AudioEncoderOutput.token_mask`);
                None: all are real.
  -> [b, t, e] in embeds' dtype. The k-th placeholder (row-major) takes the k-th real token
  (item-major). The counts must agree (`check_media_placement`): under jit a shortfall leaves
  zeros, a surplus of media tokens is dropped. Differentiable in `features` (and `embeds`).
  """
  b, t, e = embeds.shape
  n, m, fe = features.shape
  if fe != e:
    raise ValueError(f"media features have width {fe}, the token embeddings {e}; project them "
                     f"to the decoder's embed_dim first")
  flat = features.reshape(n * m, e).astype(embeds.dtype)
  if feature_mask is not None:
    # Real tokens first, each group in its order (a stable sort): masked_scatter's source.
    flat = flat[jnp.argsort(~feature_mask.reshape(n * m).astype(bool), stable=True)]
  slots = placeholders.reshape(b * t).astype(bool)
  rank = jnp.cumsum(slots.astype(jnp.int32)) - 1
  picked = jnp.take(flat, rank, axis=0, mode="fill", fill_value=0)
  return jnp.where(slots[:, None], picked, embeds.reshape(b * t, e)).reshape(b, t, e)


def expand_placeholders(input_ids: Any, placeholder_id: int, token_counts: Any, *aligned: Any
                        ) -> tuple[np.ndarray, ...]:
  """What HF's processors do to the text, on token ids (NumPy, one example): each single
  placeholder becomes as many copies as its media item has tokens.

  input_ids [t] with one `placeholder_id` per media item; token_counts [n] the items' token
  counts in order (`models.audio.output_lengths` of their frames for audio); `aligned` are
  other per-token arrays [t] (loss mask, segment ids, ...), each repeated like the ids.
  Returns (ids, *aligned) expanded. Raises ValueError naming both counts when the number of
  placeholders differs from the number of media items.
  """
  ids = np.asarray(input_ids)
  counts = np.asarray(token_counts, np.int64).reshape(-1)
  if ids.ndim != 1:
    raise ValueError(f"input_ids must be one example [seq], got shape {ids.shape}")
  at = np.flatnonzero(ids == placeholder_id)
  if at.size != counts.size:
    raise ValueError(f"{at.size} placeholder token(s) (id {placeholder_id}) in input_ids but "
                     f"{counts.size} media item(s); write one placeholder per item")
  if (counts < 0).any():
    raise ValueError(f"token counts must be >= 0, got {counts.tolist()}")
  repeats = np.ones(ids.shape, np.int64)
  repeats[at] = counts
  out = [np.repeat(ids, repeats)]
  for array in aligned:
    array = np.asarray(array)
    if array.shape != ids.shape:
      raise ValueError(f"an aligned array has shape {array.shape}, input_ids {ids.shape}")
    out.append(np.repeat(array, repeats))
  return tuple(out)


def check_media_placement(input_ids: Any, placeholder_id: int, token_counts: Any, *,
                          segment_ids: Any = None, what: str = "media") -> None:
  """Host-side check (NumPy) that `scatter_media` puts every media item into its own example.

  input_ids [b, t]; token_counts [n]: real tokens of each media item, in placeholder order;
  segment_ids [b, t] for packed rows (0 = padding). Raises ValueError when the number of
  placeholder tokens differs from the number of media tokens (both named), or when an item's
  tokens would span two rows or segments, or padding (the example's placeholders do not
  match its own media).
  """
  ids = np.asarray(input_ids)
  counts = np.asarray(token_counts, np.int64).reshape(-1)
  slots = ids == placeholder_id
  n_slots, n_tokens = int(slots.sum()), int(counts.sum())
  if n_slots != n_tokens:
    raise ValueError(
        f"{n_slots} {what} placeholder token(s) (id {placeholder_id}) in input_ids but "
        f"{n_tokens} {what} token(s) from {counts.size} {what} item(s) (tokens per item: "
        f"{counts.tolist()}); each item needs exactly its token count of placeholders")
  rows, cols = np.nonzero(slots)                          # row-major, as scatter_media fills
  segments = (np.asarray(segment_ids)[rows, cols] if segment_ids is not None
              else np.ones_like(rows))
  item = np.repeat(np.arange(counts.size), counts)        # which item fills each placeholder
  for k in range(counts.size):
    at = item == k
    owners = sorted(set(zip(rows[at].tolist(), segments[at].tolist())))
    if len(owners) > 1 or (owners and owners[0][1] == 0):
      where = ", ".join(f"row {r} segment {s}" for r, s in owners)
      raise ValueError(
          f"{what} item {k} ({int(counts[k])} tokens) would fill placeholders in {where}: the "
          f"placeholders of an example (row{' and segment' if segment_ids is not None else ''}) "
          f"do not match the token counts of its own {what} items")


@dataclasses.dataclass(frozen=True)
class AudioLanguageConfig:
  """Qwen2-Audio's shape: a text decoder, an audio tower, and the placeholder token id."""

  text: ModelConfig
  audio: AudioEncoderConfig
  audio_token_id: int = 151646  # Qwen2AudioConfig.audio_token_index's default

  def __post_init__(self) -> None:
    if not self.audio.avg_pool:
      raise ValueError("AudioLanguageConfig.audio must be the Qwen2-Audio tower (avg_pool=True)")
    if not 0 <= self.audio_token_id < self.text.vocab_size:
      raise ValueError(f"audio_token_id {self.audio_token_id} is not in the text vocabulary "
                       f"[0, {self.text.vocab_size})")


class AudioLanguageModel(nnx.Module):
  """Qwen2AudioForConditionalGeneration: audio tower -> projector -> fused into the decoder.

  `model(input_ids, input_features=None, feature_attention_mask=None, **decoder_kwargs)`:
  input_ids [b, t] with `audio_token_id` repeated once per real audio token of each clip (as
  HF's processor expands `<|AUDIO|>`), input_features [n, mels, 2P] log-mel clips in
  placeholder order, feature_attention_mask [n, 2P] their real frames (None: all real);
  decoder_kwargs are the decoder's (positions, segment_ids, attention_mask, cache).
  """

  def __init__(self, config: AudioLanguageConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.audio_tower = AudioEncoder(config.audio, rngs=rngs)
    self.projector = AudioProjector(config.audio.d_model, config.text.embed_dim,
                                    dtype=config.text.dtype, param_dtype=config.text.param_dtype,
                                    init_std=config.text.init_std, rngs=rngs)
    self.language_model = Transformer(config.text, rngs=rngs)

  def encode_audios(self, input_features: Array, feature_attention_mask: Array | None = None
                    ) -> tuple[Array, Array]:
    """The tower's part (pooling included, projector not): (features [n, P // 2, d_model],
    token_mask [n, P // 2] bool) of n clips. A frozen tower's output is what a run with
    media.cache_features stores (train/cached_features.py)."""
    out = self.audio_tower(input_features, feature_attention_mask)
    return out.last_hidden_state, out.token_mask

  def audio_features(self, input_features: Array, feature_attention_mask: Array | None = None
                     ) -> tuple[Array, Array]:
    """(projected features [n, P // 2, embed], token_mask [n, P // 2] bool) of n clips."""
    hidden, token_mask = self.encode_audios(input_features, feature_attention_mask)
    return self.projector(hidden), token_mask

  def embed(self, input_ids: Array, input_features: Array | None = None,
            feature_attention_mask: Array | None = None, *,
            audio_tower_features: Array | None = None, audio_tower_mask: Array | None = None
            ) -> Array:
    """The decoder's input [b, t, embed]: token embeddings with the clips' tokens fused in.

    Also takes the per-row batch layout (`models/media.py`): input_features [b, k, mels, F]
    and feature_attention_mask [b, k, F], where a padding clip's mask is all zero (it gives
    no tokens). Or, instead of the log-mels, the tower's cached output (`encode_audios`):
    audio_tower_features [b, k, T, d_model] (or [n, T, d_model]) with audio_tower_mask
    [b, k, T] (or [n, T]), its real tokens; the tower is then skipped and the projector runs
    on them as it would on the tower's output."""
    embeds = self.language_model.embed_tokens(input_ids)
    if audio_tower_features is not None:
      if input_features is not None:
        raise ValueError("give input_features or audio_tower_features, not both")
      if audio_tower_mask is None:
        raise ValueError("audio_tower_features need their audio_tower_mask (real tokens)")
      t, d = audio_tower_features.shape[-2:]
      features = self.projector(audio_tower_features.reshape(-1, t, d))
      token_mask = audio_tower_mask.reshape(-1, t).astype(bool)
      return scatter_media(embeds, input_ids == self.config.audio_token_id, features,
                           token_mask)
    if input_features is None:
      return embeds
    if input_features.ndim == 4:
      input_features = input_features.reshape((-1,) + input_features.shape[2:])
      if feature_attention_mask is not None:
        feature_attention_mask = feature_attention_mask.reshape(
            (-1,) + feature_attention_mask.shape[2:])
    features, token_mask = self.audio_features(input_features, feature_attention_mask)
    return scatter_media(embeds, input_ids == self.config.audio_token_id, features, token_mask)

  def forward(self, input_ids: Array, input_features: Array | None = None,
              feature_attention_mask: Array | None = None, *, positions: Array | None = None,
              segment_ids: Array | None = None, attention_mask: Array | None = None,
              cache: KVCache | None = None) -> DecoderOutput:
    """The decoder's output on the fused sequence (see the class docstring). Outside jit the
    placeholder counts are checked first (`check_media_placement`)."""
    if input_features is not None and _concrete(input_ids, feature_attention_mask, segment_ids):
      frames = (np.full((input_features.shape[0],), input_features.shape[-1])
                if feature_attention_mask is None
                else np.asarray(feature_attention_mask).astype(np.int64).sum(-1))
      check_media_placement(input_ids, self.config.audio_token_id,
                            output_lengths(frames, avg_pool=True), segment_ids=segment_ids,
                            what="audio")
    embeds = self.embed(input_ids, input_features, feature_attention_mask)
    return self.language_model.forward(inputs_embeds=embeds, positions=positions,
                                       segment_ids=segment_ids, attention_mask=attention_mask,
                                       cache=cache)

  def __call__(self, input_ids: Array, input_features: Array | None = None,
               feature_attention_mask: Array | None = None, **kwargs: Any
               ) -> Array | tuple[Array, KVCache]:
    """Float32 logits [b, t, vocab]; with `cache=`, (logits, new_cache)."""
    out = self.forward(input_ids, input_features, feature_attention_mask, **kwargs)
    return out.logits if kwargs.get("cache") is None else (out.logits, out.cache)


def _concrete(*arrays: Any) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def create_audio_language_model(config: AudioLanguageConfig, *, seed: int = 0
                                ) -> AudioLanguageModel:
  """A randomly initialised model, built under one jit (eager init is slow on CPU)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: AudioLanguageModel(config,
                                                                     rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.split(AudioLanguageModel(config, rngs=nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class VisionLanguageConfig:
  """LLaVA's shape: a text decoder, a vision tower, its projector, and how features are taken.

  `vision_feature_layer` is the tower's hidden state LLaVA projects (an index into the
  num_layers + 1 hidden states, negative from the end; a tuple concatenates several along the
  features), `vision_feature_select_strategy` "default" drops the first token (CLIP's class
  token) and "full" keeps all. The projector maps vision width x feature layers to the text
  embed_dim.
  """

  text: ModelConfig
  vision: VisionConfig
  projector: ProjectorConfig
  image_token_id: int = 32000  # LlavaConfig.image_token_index's default
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"

  def __post_init__(self) -> None:
    layer = self.vision_feature_layer
    layers = (layer,) if isinstance(layer, int) else layer
    if (isinstance(layer, list) or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)):
      raise ValueError(f"vision_feature_layer must be an int or a non-empty tuple of ints, "
                       f"got {layer!r}")
    count = self.vision.num_layers + 1
    if any(not -count <= i < count for i in layers):
      raise ValueError(f"vision_feature_layer {layer!r} is out of range for the tower's {count} "
                       f"hidden states")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                       f"got {self.vision_feature_select_strategy!r}")
    if self.projector.in_dim != self.vision.embed_dim * len(layers):
      raise ValueError(f"projector in_dim {self.projector.in_dim} != vision embed_dim "
                       f"{self.vision.embed_dim} x {len(layers)} feature layer(s)")
    if self.projector.out_dim != self.text.embed_dim:
      raise ValueError(f"projector out_dim {self.projector.out_dim} != text embed_dim "
                       f"{self.text.embed_dim}")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} is not in the text vocabulary "
                       f"[0, {self.text.vocab_size})")
    self.projector.num_tokens(num_image_tokens(self.vision, self.vision_feature_select_strategy))

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """The selected hidden states as non-negative indices (valid for a truncated run too)."""
    layer = self.vision_feature_layer
    count = self.vision.num_layers + 1
    return tuple(i % count for i in ((layer,) if isinstance(layer, int) else layer))

  @property
  def image_tokens(self) -> int:
    """Placeholder tokens per image (an image at the tower's image_size)."""
    return self.projector.num_tokens(
        num_image_tokens(self.vision, self.vision_feature_select_strategy))


class VisionLanguageModel(nnx.Module):
  """LlavaForConditionalGeneration: vision tower -> projector -> fused into the decoder.

  `model(input_ids, pixel_values=None, **decoder_kwargs)`: input_ids [b, t] with
  `image_token_id` repeated `config.image_tokens` times per image (as HF's processor expands
  `<image>`), pixel_values [n, channels, size, size] the images in placeholder order
  (`data/images.py`); decoder_kwargs are the decoder's (positions, segment_ids,
  attention_mask, cache).
  """

  def __init__(self, config: VisionLanguageConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision_tower = VisionTower(config.vision, rngs=rngs)
    self.projector = Projector(config.projector, rngs=rngs)
    self.language_model = Transformer(config.text, rngs=rngs)

  def encode_images(self, pixel_values: Array) -> Array:
    """The tower's part, up to the projector: LLaVA's selected features [n, tokens, width x
    feature layers] of n images (the projector's input). A frozen tower's output is what a run
    with media.cache_features stores (train/cached_features.py)."""
    c = self.config
    layers = c.feature_layers
    # Only the layers up to the deepest selected one run (LLaVA's usual -2 skips the last).
    out = self.vision_tower(pixel_values, num_layers=layers_needed(c.vision.num_layers, layers))
    return select_features(out, layers, c.vision_feature_select_strategy)

  def image_features(self, pixel_values: Array) -> Array:
    """Projected features [n, image_tokens, embed] of n images."""
    return self.projector(self.encode_images(pixel_values))

  def embed(self, input_ids: Array, pixel_values: Array | None = None,
            image_mask: Array | None = None, *, image_tower_features: Array | None = None
            ) -> Array:
    """The decoder's input [b, t, embed]: token embeddings with the images' tokens fused in.

    pixel_values [n, C, H, W], or the per-row batch layout (`models/media.py`) [b, k, C, H, W]
    with image_mask [b, k] (1 for real images, padding images last in their row). Or, instead
    of the pixels, the tower's cached output (`encode_images`): image_tower_features
    [b, k, T, D] (or [n, T, D]); the tower is then skipped and the projector runs on them."""
    embeds = self.language_model.embed_tokens(input_ids)
    if image_tower_features is not None:
      if pixel_values is not None:
        raise ValueError("give pixel_values or image_tower_features, not both")
      t, d = image_tower_features.shape[-2:]
      features = self.projector(image_tower_features.reshape(-1, t, d))
    elif pixel_values is None:
      return embeds
    else:
      if pixel_values.ndim == 5:
        pixel_values = pixel_values.reshape((-1,) + pixel_values.shape[2:])
      features = self.image_features(pixel_values)
    token_mask = None
    if image_mask is not None:
      token_mask = jnp.broadcast_to(image_mask.reshape(-1, 1).astype(bool), features.shape[:2])
    return scatter_media(embeds, input_ids == self.config.image_token_id, features, token_mask)

  def forward(self, input_ids: Array, pixel_values: Array | None = None, *,
              positions: Array | None = None, segment_ids: Array | None = None,
              attention_mask: Array | None = None, cache: KVCache | None = None
              ) -> DecoderOutput:
    """The decoder's output on the fused sequence (see the class docstring). Outside jit the
    placeholder counts are checked first (`check_media_placement`)."""
    if pixel_values is not None and _concrete(input_ids, segment_ids):
      check_media_placement(input_ids, self.config.image_token_id,
                            [self.config.image_tokens] * pixel_values.shape[0],
                            segment_ids=segment_ids, what="image")
    embeds = self.embed(input_ids, pixel_values)
    return self.language_model.forward(inputs_embeds=embeds, positions=positions,
                                       segment_ids=segment_ids, attention_mask=attention_mask,
                                       cache=cache)

  def __call__(self, input_ids: Array, pixel_values: Array | None = None, **kwargs: Any
               ) -> Array | tuple[Array, KVCache]:
    """Float32 logits [b, t, vocab]; with `cache=`, (logits, new_cache)."""
    out = self.forward(input_ids, pixel_values, **kwargs)
    return out.logits if kwargs.get("cache") is None else (out.logits, out.cache)


__all__ = ["AudioLanguageConfig", "AudioLanguageModel", "VisionLanguageConfig",
           "VisionLanguageModel", "check_media_placement", "create_audio_language_model",
           "expand_placeholders", "scatter_media"]
