"""Whisper audio encoder (arXiv 2212.04356) and the Qwen2-Audio variant (arXiv 2407.10759), in
Flax NNX.

`AudioEncoder` reproduces HF `WhisperEncoder` and, with `AudioEncoderConfig.avg_pool`,
`Qwen2AudioEncoder`:

  log-mel [b, mels, 2P] -> conv1d(k3, pad 1) -> GELU -> conv1d(k3, stride 2, pad 1) -> GELU
  -> + position embedding [P, d] -> pre-LN layers -> (Qwen2-Audio: average pool k2 s2)
  -> final LayerNorm -> [b, P, d] (Whisper) or [b, P // 2, d] (Qwen2-Audio)

where P = `max_source_positions` (1500 for 30 s of audio). As in HF the mel input must be
exactly 2P frames long (the feature extractor pads to `chunk_length` seconds); tests use a
small P. The convolutions' GELU is always the exact erf form; the layers' MLP uses
`activation_function`. Attention has biases on q, v and out but not on k (HF's
`WhisperAttention`). The position embedding is a parameter, as HF stores it
(`embed_positions.weight`); a fresh encoder starts it at Whisper's sinusoids.

Padding: HF's `WhisperEncoder` ignores any attention mask (every one of the P positions
attends to all, padding included), which `attention_mask=None` reproduces. Given the feature
extractor's frame mask, padded positions are masked as keys, as `Qwen2AudioForConditionalGeneration`
does for its tower: a clip of n real frames has (n - 1) // 2 + 1 real positions after the
stride-2 conv (`output_lengths`), and (that - 2) // 2 + 1 real tokens after the pool.

Loading HF weights is `checkpoints/audio.py`; the NumPy log-mel front end is `data/audio.py`.
Used functionally like the decoder: `graphdef, state = nnx.split(encoder)`, `nnx.merge`
inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from wakea_jax.models.encoder_blocks import EncoderLayer, LayerNorm
from wakea_jax.models.layers import dense, param

# HF `ACT2FN` names of the layers' MLP activation: "gelu" is the exact erf form Whisper uses.
GELU_APPROXIMATE = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
  """Shapes and numerics of a Whisper-style audio encoder (HF field names where they exist).

  `avg_pool` selects the Qwen2-Audio variant (average pool of 2 before the final norm).
  `dtype` is what matmuls run in, `param_dtype` what weights are stored in; LayerNorm
  statistics and attention softmax are float32 either way.
  """

  num_mel_bins: int = 80
  d_model: int = 384
  encoder_layers: int = 4
  encoder_attention_heads: int = 6
  encoder_ffn_dim: int = 1536
  max_source_positions: int = 1500
  activation_function: str = "gelu"
  layer_norm_eps: float = 1e-5  # torch nn.LayerNorm's default; HF does not configure it
  avg_pool: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self) -> None:
    for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                 "encoder_ffn_dim", "max_source_positions"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"AudioEncoderConfig.{name} must be a positive int, got {value!r}")
    if self.d_model % self.encoder_attention_heads:
      raise ValueError(f"AudioEncoderConfig.d_model {self.d_model} is not a multiple of "
                       f"encoder_attention_heads {self.encoder_attention_heads}")
    if self.d_model % 2:
      raise ValueError(f"AudioEncoderConfig.d_model must be even (sinusoidal positions), "
                       f"got {self.d_model}")
    if self.activation_function not in GELU_APPROXIMATE:
      raise ValueError(f"AudioEncoderConfig.activation_function "
                       f"{self.activation_function!r} is not supported "
                       f"(one of {sorted(GELU_APPROXIMATE)})")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"AudioEncoderConfig.{name} must be one of {DTYPES}, "
                         f"got {getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head: d_model // encoder_attention_heads."""
    return self.d_model // self.encoder_attention_heads

  @property
  def num_frames(self) -> int:
    """Mel frames the encoder takes: 2 * max_source_positions (the stride-2 conv halves it)."""
    return 2 * self.max_source_positions

  @property
  def num_tokens(self) -> int:
    """Output tokens per clip: max_source_positions, halved again by Qwen2-Audio's pool."""
    return self.max_source_positions // 2 if self.avg_pool else self.max_source_positions

  @property
  def compute_dtype(self) -> Any:
    """The jnp dtype matmuls and activations run in (from `dtype`)."""
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    """The jnp dtype weights are stored in (from `param_dtype`)."""
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes: Any) -> AudioEncoderConfig:
    """A copy with `changes` applied, validated again."""
    return dataclasses.replace(self, **changes)


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
  """Whisper's position table [length, channels]: sin of the first half, cos of the second
  (HF `modeling_whisper.sinusoids`, which initialises `embed_positions`)."""
  increment = math.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
  scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def output_lengths(frame_lengths: Array | np.ndarray, avg_pool: bool) -> Any:
  """Real tokens per clip from real mel frames per clip (HF `_get_feat_extract_output_lengths`):
  (n - 1) // 2 + 1 after the stride-2 conv, then (that - 2) // 2 + 1 after the pool."""
  conv = (frame_lengths - 1) // 2 + 1
  return (conv - 2) // 2 + 1 if avg_pool else conv


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AudioEncoderOutput:
  """What `AudioEncoder.__call__` returns.

  last_hidden_state  [b, num_tokens, d] after the final LayerNorm (and pool).
  token_mask         [b, num_tokens] bool, True for tokens of real audio (all True without a
                     frame mask).
  hidden_states      with `output_hidden_states`: HF's tuple of encoder_layers + 1 arrays, the
                     input of every layer ([b, P, d]) and then `last_hidden_state`.
  """

  last_hidden_state: Array
  token_mask: Array
  hidden_states: tuple[Array, ...] | None = None


def _encoder_layer(c: AudioEncoderConfig, rngs: nnx.Rngs) -> EncoderLayer:
  """HF `WhisperEncoderLayer`: no bias on k_proj."""
  act = functools.partial(jax.nn.gelu, approximate=GELU_APPROXIMATE[c.activation_function])
  return EncoderLayer(c.d_model, c.encoder_attention_heads, c.encoder_ffn_dim, act,
                      norm_eps=c.layer_norm_eps, k_bias=False, dtype=c.compute_dtype,
                      param_dtype=c.weight_dtype, init_std=c.init_std, rngs=rngs)


def _conv1d(x: Array, weight: Array, bias: Array, stride: int) -> Array:
  """x [b, t, in], weight [3, in, out] (kernel 3, padding 1) -> [b, ceil(t / stride), out]."""
  y = jax.lax.conv_general_dilated(x, weight, window_strides=(stride,), padding=((1, 1),),
                                   dimension_numbers=("NWC", "WIO", "NWC"),
                                   preferred_element_type=jnp.float32)
  return (y + bias.astype(jnp.float32)).astype(x.dtype)


class AudioEncoder(nnx.Module):
  """HF `WhisperEncoder` (or `Qwen2AudioEncoder` with `config.avg_pool`); see the module doc.

  `encoder(input_features, attention_mask=None)`: input_features [b, num_mel_bins,
  2 * max_source_positions] (the feature extractor's layout), attention_mask [b, frames]
  (1 = real frame) -> `AudioEncoderOutput`.
  """

  def __init__(self, config: AudioEncoderConfig, *, rngs: nnx.Rngs):
    c, pd, std = config, config.weight_dtype, config.init_std
    self.config = c
    # Conv kernels [kernel, in, out]; HF's nn.Conv1d stores [out, in, kernel].
    self.conv1 = param(rngs, (3, c.num_mel_bins, c.d_model), (None, None, "embed"), pd, std=std)
    self.conv1_bias = param(None, (c.d_model,), ("embed",), pd, value=0.0)
    self.conv2 = param(rngs, (3, c.d_model, c.d_model), (None, None, "embed"), pd, std=std)
    self.conv2_bias = param(None, (c.d_model,), ("embed",), pd, value=0.0)
    self.position_embed = nnx.Param(
        jnp.asarray(sinusoids(c.max_source_positions, c.d_model), pd),
        logical_axes=(None, "embed"))
    self.layers = nnx.List([_encoder_layer(c, rngs) for _ in range(c.encoder_layers)])
    self.final_norm = LayerNorm(c.d_model, c.layer_norm_eps, param_dtype=pd)

  def __call__(self, input_features: Array, attention_mask: Array | None = None, *,
               output_hidden_states: bool = False) -> AudioEncoderOutput:
    """See the class docstring; raises ValueError if the frame count is not 2P."""
    c, dt = self.config, self.config.compute_dtype
    b, mels, frames = input_features.shape
    if mels != c.num_mel_bins or frames != c.num_frames:
      raise ValueError(f"input_features has shape {input_features.shape}; the encoder takes "
                       f"[batch, {c.num_mel_bins} mel bins, {c.num_frames} frames] (pad the "
                       f"audio to 2 * max_source_positions frames)")
    x = jnp.swapaxes(input_features, 1, 2).astype(dt)                   # [b, frames, mels]
    x = jax.nn.gelu(_conv1d(x, self.conv1[...].astype(dt), self.conv1_bias[...], 1),
                    approximate=False)
    x = jax.nn.gelu(_conv1d(x, self.conv2[...].astype(dt), self.conv2_bias[...], 2),
                    approximate=False)
    x = x + self.position_embed[...].astype(dt)[None]                    # [b, P, d]
    p = c.max_source_positions
    if attention_mask is None:
      valid = jnp.ones((b, p), bool)
    else:
      lengths = output_lengths(jnp.sum(attention_mask.astype(jnp.int32), axis=-1), False)
      valid = jnp.arange(p)[None, :] < lengths[:, None]
    # Padding positions are masked as keys for every query (HF's bidirectional mask); their
    # own outputs still see the real keys and are dropped by `token_mask` downstream.
    mask = jnp.broadcast_to(valid[:, None, :], (b, p, p))
    hidden_states = []
    for layer in self.layers:
      hidden_states.append(x)
      x = layer(x, mask)
    if c.avg_pool:
      x = x.reshape(b, p // 2, 2, c.d_model).astype(jnp.float32).mean(axis=2).astype(dt)
      token_mask = (jnp.arange(p // 2)[None, :]
                    < (jnp.sum(valid, axis=-1) - 2)[:, None] // 2 + 1)
    else:
      token_mask = valid
    x = self.final_norm(x)
    return AudioEncoderOutput(
        last_hidden_state=x, token_mask=token_mask,
        hidden_states=tuple(hidden_states) + (x,) if output_hidden_states else None)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("output_hidden_states",))
def encode(graphdef: nnx.GraphDef, state: nnx.State, input_features: Array,
           attention_mask: Array | None = None, *, output_hidden_states: bool = False
           ) -> AudioEncoderOutput:
  """`encoder(input_features, attention_mask)` for a split encoder, jitted (one compile per
  config, shape and mask presence): eager dispatch runs op by op, ~10x slower on CPU."""
  return nnx.merge(graphdef, state)(input_features, attention_mask,
                                    output_hidden_states=output_hidden_states)


def create_audio_encoder(config: AudioEncoderConfig, *, seed: int = 0) -> AudioEncoder:
  """A randomly initialised encoder, built under one jit: eager init dispatches (and on CPU
  compiles) every parameter's random draw separately, ~10x slower for a small encoder."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: AudioEncoder(config, rngs=nnx.Rngs(seed))))
  state = jax.jit(lambda: nnx.split(AudioEncoder(config, rngs=nnx.Rngs(seed)))[1])()
  return nnx.merge(graphdef, state)


class AudioProjector(nnx.Module):
  """Qwen2-Audio's `multi_modal_projector`: one Linear (with bias) from the encoder width to
  the language model's, applied token-wise: [..., d_audio] -> [..., d_text]."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype: str = "float32",
               param_dtype: str = "float32", init_std: float = 0.02, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    pd = jnp.dtype(param_dtype)
    self.weight = param(rngs, (in_dim, out_dim), (None, "embed"), pd, std=init_std)
    self.bias = param(None, (out_dim,), ("embed",), pd, value=0.0)

  def __call__(self, x: Array) -> Array:
    """x [..., in_dim] -> [..., out_dim] in the compute dtype."""
    return dense(x.astype(self.dtype), self.weight, "...i,io->...o", self.dtype) + (
        self.bias[...].astype(self.dtype))


__all__ = ["AudioEncoder", "AudioEncoderConfig", "AudioEncoderOutput", "AudioProjector",
           "create_audio_encoder", "encode", "output_lengths",
           "sinusoids"]
