"""ViT vision towers in Flax NNX: SigLIP (arXiv 2303.15343) and CLIP (arXiv 2103.00020).

`VisionTower(config)(pixel_values)` reproduces HF `SiglipVisionModel` / `CLIPVisionModel`:

  patch embedding (a stride-`patch` convolution, run as patchify + one matmul)
  [CLIP: prepend the class embedding]  + learned position embeddings  [CLIP: pre_layrnorm]
  pre-LN encoder layers: x + attn(LN(x)), x + fc2(act(fc1(LN(x))))
  SigLIP: post_layernorm on every token, optional attention-pooling head (a learned probe)
  CLIP:   post_layernorm on the CLS token only (the pooled output)

`pixel_values` are channels-first [batch, channels, height, width], as HF processors (and
`data/images.py`) produce them. The output carries the hidden states of every layer as HF's
`output_hidden_states=True` does: index 0 is the encoder's input, index i the output of layer
i; LLaVA picks one of them (`vision_feature_layer`, e.g. -2) with `select_features`.

Used functionally like the decoder: `graphdef, state = nnx.split(tower)` once, then
`nnx.merge` inside a jitted function. Loading HF weights is `checkpoints/vision.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from wakea_jax.models.config import _DTYPES
from wakea_jax.models.encoder_blocks import EncoderLayer, EncoderMLP, LayerNorm
from wakea_jax.models.layers import dense, dot_product_attention, param
from wakea_jax.parallel.mesh import constrain

VARIANTS = ("siglip", "clip")


def _quick_gelu(x: Array) -> Array:
  # HF `QuickGELUActivation`, the activation of OpenAI's CLIP: x * sigmoid(1.702 x).
  return x * jax.nn.sigmoid(1.702 * x)


# HF `ACT2FN` names the towers use.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shapes and numerics of a ViT vision tower (hashable: usable as a static argument).

  `variant` "siglip": patch bias, no class token, post-LN on all tokens, `use_head` adds the
  attention-pooling head. "clip": class token, pre-LN before the encoder, no patch bias,
  post-LN on the pooled class token. `dtype` is what matmuls run in, `param_dtype` what
  weights are stored in; LayerNorm statistics and attention softmax are float32.
  """

  variant: str = "siglip"
  embed_dim: int = 768
  mlp_dim: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  use_head: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self) -> None:
    if self.variant not in VARIANTS:
      raise ValueError(f"VisionConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
    for name in ("embed_dim", "mlp_dim", "num_layers", "num_heads", "image_size", "patch_size",
                 "num_channels"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"VisionConfig.embed_dim ({self.embed_dim}) must be a multiple of "
                       f"num_heads ({self.num_heads})")
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                       f"patch_size ({self.patch_size})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"VisionConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.hidden_act!r}")
    if self.use_head and self.variant != "siglip":
      raise ValueError("VisionConfig.use_head (attention pooling) exists only for 'siglip'")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"VisionConfig.{name} must be one of {sorted(_DTYPES)}, "
                         f"got {getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.embed_dim // self.num_heads

  @property
  def grid_size(self) -> int:
    """Patches per side at `image_size`."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Patch tokens per image at `image_size`."""
    return self.grid_size ** 2

  @property
  def has_class_token(self) -> bool:
    """CLIP prepends a class (CLS) token; SigLIP has none."""
    return self.variant == "clip"

  @property
  def num_positions(self) -> int:
    """Rows of the position embedding: the patches, plus the class token for CLIP."""
    return self.num_patches + int(self.has_class_token)

  @property
  def compute_dtype(self) -> Any:
    """The jnp dtype matmuls and activations run in (from `dtype`)."""
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    """The jnp dtype weights are stored in (from `param_dtype`)."""
    return _DTYPES[self.param_dtype]

  def replace(self, **changes: Any) -> VisionConfig:
    """A copy with `changes` applied, validated again."""
    return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionOutput:
  """What `VisionTower` returns (HF `BaseModelOutputWithPooling` with hidden states).

  last_hidden_state  [b, tokens, e]: SigLIP post-LN'd, CLIP the last layer's output.
  pooled             [b, e]: SigLIP the head's output (None without a head), CLIP the
                     post-LN'd class token.
  hidden_states      num_layers + 1 arrays [b, tokens, e]: the encoder input, then each
                     layer's output (before any post-LN), as HF's `hidden_states`.
  """

  last_hidden_state: Array
  pooled: Array | None
  hidden_states: tuple[Array, ...]


def _encoder_layer(c: VisionConfig, rngs: nnx.Rngs) -> EncoderLayer:
  return EncoderLayer(c.embed_dim, c.num_heads, c.mlp_dim, ACTIVATIONS[c.hidden_act],
                      norm_eps=c.norm_eps, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                      init_std=c.init_std, rngs=rngs)


class AttentionPoolingHead(nnx.Module):
  """SigLIP's multi-head attention pooling (MAP, arXiv 1810.00825): a learned probe attends
  to all tokens, then probe + mlp(LN(probe)). HF `SiglipMultiheadAttentionPoolingHead`, whose
  `nn.MultiheadAttention` fuses q/k/v into one `in_proj` (here [embed, 3, heads, head_dim])."""

  def __init__(self, c: VisionConfig, *, rngs: nnx.Rngs):
    pd, e, n, h = c.weight_dtype, c.embed_dim, c.num_heads, c.head_dim
    self.num_heads, self.dtype = n, c.compute_dtype
    self.probe = param(rngs, (e,), ("embed",), pd, std=c.init_std)
    self.in_proj = param(rngs, (e, 3, n, h), ("embed", None, "q_heads", "head_dim"), pd,
                         std=c.init_std)
    self.in_bias = param(None, (3, n, h), (None, "q_heads", "head_dim"), pd, value=0.0)
    self.o_proj = param(rngs, (n, h, e), ("q_heads", "head_dim", "embed"), pd, std=c.init_std)
    self.o_bias = param(None, (e,), ("embed",), pd, value=0.0)
    self.norm = LayerNorm(e, c.norm_eps, param_dtype=pd, dtype=c.compute_dtype)
    self.mlp = EncoderMLP(e, c.mlp_dim, ACTIVATIONS[c.hidden_act], dtype=c.compute_dtype,
                          param_dtype=pd, init_std=c.init_std, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x [b, t, e] -> pooled [b, e]."""
    dt = self.dtype
    b, t, e = x.shape
    w, bias = self.in_proj[...].astype(dt), self.in_bias[...].astype(dt)
    probe = jnp.broadcast_to(self.probe[...].astype(dt), (b, 1, e))
    q = jnp.einsum("bte,enh->btnh", probe, w[:, 0]) + bias[0]
    k = jnp.einsum("bte,enh->btnh", x, w[:, 1]) + bias[1]
    v = jnp.einsum("bte,enh->btnh", x, w[:, 2]) + bias[2]
    out = dot_product_attention(q, k, v, jnp.ones((b, 1, t), bool), self.num_heads)
    pooled = dense(out, self.o_proj, "btnh,nhe->bte", dt) + self.o_bias[...].astype(dt)
    pooled = pooled + self.mlp(self.norm(pooled))
    return pooled[:, 0]


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] float32 weights of torch's `interpolate(mode="bicubic",
  align_corners=False)` along one axis: source x = (i + 0.5) * in / out - 0.5, Keys' cubic
  convolution with a = -0.75 (torch's, not PIL's -0.5), border indices clamped, no
  antialiasing. A trace-time constant."""
  a = -0.75

  def cubic(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

  x = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  left = np.floor(x).astype(np.int64)
  weights = np.zeros((size_out, size_in), np.float64)
  for k in range(-1, 3):
    index = np.clip(left + k, 0, size_in - 1)
    np.add.at(weights, (np.arange(size_out), index), cubic(x - (left + k)))
  return weights.astype(np.float32)


class VisionTower(nnx.Module):
  """HF `SiglipVisionModel` / `CLIPVisionModel`: `tower(pixel_values)` -> `VisionOutput`."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    pd, p, e = c.weight_dtype, c.patch_size, c.embed_dim
    # HF's Conv2d weight [e, c, p, p] is stored as [c, p, p, e]: the matmul of a flattened
    # (channel, row, column) patch.
    self.patch_embed = param(rngs, (c.num_channels, p, p, e), (None, None, None, "embed"), pd,
                             std=c.init_std)
    if c.variant == "siglip":
      self.patch_bias = param(None, (e,), ("embed",), pd, value=0.0)
    else:
      self.class_embed = param(rngs, (e,), ("embed",), pd, std=c.init_std)
      self.pre_norm = LayerNorm(e, c.norm_eps, param_dtype=pd, dtype=c.compute_dtype)
    self.position_embed = param(rngs, (c.num_positions, e), (None, "embed"), pd, std=c.init_std)
    self.layers = nnx.List([_encoder_layer(c, rngs) for _ in range(c.num_layers)])
    self.post_norm = LayerNorm(e, c.norm_eps, param_dtype=pd, dtype=c.compute_dtype)
    if c.use_head:
      self.head = AttentionPoolingHead(c, rngs=rngs)

  def embed(self, pixel_values: Array, *, interpolate_pos_encoding: bool = False) -> Array:
    """pixel_values [b, c, H, W] -> the encoder's input [b, tokens, e] (position-embedded;
    CLIP: class token first and pre-LN'd).

    H and W must equal `config.image_size`, unless `interpolate_pos_encoding`: then any
    multiples of the patch size, the patch position embeddings resized bicubically to the
    new grid as HF's `interpolate_pos_encoding=True` does (unchanged for a square image of
    the trained grid).
    """
    c = self.config
    dt = c.compute_dtype
    b, ch, height, width = pixel_values.shape
    p = c.patch_size
    if interpolate_pos_encoding:
      if ch != c.num_channels or height % p or width % p:
        raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; with "
                         f"interpolate_pos_encoding the tower takes [batch, {c.num_channels}, "
                         f"H, W] with H and W multiples of {p} (channels first)")
    elif ch != c.num_channels or height != c.image_size or width != c.image_size:
      raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; the tower takes "
                       f"[batch, {c.num_channels}, {c.image_size}, {c.image_size}] "
                       "(channels first; or pass interpolate_pos_encoding=True)")
    gh, gw = height // p, width // p
    # Row-major patches, each flattened as (channel, row, column), like HF's conv + flatten(2).
    patches = pixel_values.astype(dt).reshape(b, ch, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
    x = dense(patches.reshape(b, gh * gw, ch, p, p), self.patch_embed, "btcij,cije->bte", dt)
    positions = self.position_embed[...]
    if (gh, gw) != (c.grid_size, c.grid_size):
      cls_pos, grid_pos = positions[:int(c.has_class_token)], positions[int(c.has_class_token):]
      grid_pos = grid_pos.reshape(c.grid_size, c.grid_size, -1)
      grid_pos = jnp.einsum("hi,wj,ije->hwe", bicubic_matrix(c.grid_size, gh),
                            bicubic_matrix(c.grid_size, gw), grid_pos.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
      positions = jnp.concatenate(
          [cls_pos, grid_pos.reshape(gh * gw, -1).astype(positions.dtype)], axis=0)
    if c.variant == "siglip":
      x = x + self.patch_bias[...].astype(dt)
    else:
      cls = jnp.broadcast_to(self.class_embed[...].astype(dt), (b, 1, c.embed_dim))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + positions.astype(dt)[None]
    if c.variant == "clip":
      x = self.pre_norm(x)
    return constrain(x, ("act_batch", "act_length", "act_embed"))

  def __call__(self, pixel_values: Array, *, num_layers: int | None = None,
               interpolate_pos_encoding: bool = False) -> VisionOutput:
    """pixel_values [b, c, H, W] (channels first) -> `VisionOutput`.

    `num_layers` stops after that many encoder layers (LLaVA's `vision_feature_layer=-2` needs
    only num_layers - 1): `hidden_states` then ends there and the post-LN outputs are those of
    the last layer run. `interpolate_pos_encoding` admits other image sizes (see `embed`).
    """
    c = self.config
    depth = c.num_layers if num_layers is None else num_layers
    if not 0 <= depth <= c.num_layers:
      raise ValueError(f"num_layers must be in [0, {c.num_layers}], got {depth}")
    x = self.embed(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    hidden = [x]
    for layer in self.layers[:depth]:
      x = layer(x)
      hidden.append(x)
    if c.variant == "siglip":
      last = self.post_norm(x)
      pooled = self.head(last) if c.use_head else None
    else:
      last, pooled = x, self.post_norm(x[:, 0])
    return VisionOutput(last_hidden_state=last, pooled=pooled, hidden_states=tuple(hidden))


def select_features(output: VisionOutput, layer: int | Sequence[int] = -2,
                    strategy: str = "default") -> Array:
  """LLaVA's image features: `hidden_states[layer]` (a list of layers is concatenated along
  the features), without the first token for strategy "default" (CLIP's class token) or
  all tokens for "full". As HF `LlavaModel.get_image_features`. -> [b, tokens, e * layers]."""
  if strategy not in ("default", "full"):
    raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                     f"got {strategy!r}")
  layers = [layer] if isinstance(layer, int) else list(layer)
  count = len(output.hidden_states)
  for i in layers:
    if not -count <= i < count:
      raise ValueError(f"vision_feature_layer {i} is out of range for {count} hidden states")
  features = [output.hidden_states[i] for i in layers]
  if strategy == "default":
    features = [f[:, 1:] for f in features]
  return features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)


def layers_needed(num_layers: int, layer: int | Sequence[int]) -> int:
  """Encoder layers to run so that `hidden_states[layer]` exists (pass as `num_layers`)."""
  layers = [layer] if isinstance(layer, int) else list(layer)
  return max(i % (num_layers + 1) for i in layers)


def create_vision_tower(config: VisionConfig, *, seed: int = 0) -> VisionTower:
  """A randomly initialised tower."""
  return VisionTower(config, rngs=nnx.Rngs(seed))


def abstract_vision_tower(config: VisionConfig) -> VisionTower:
  """The tower's structure with ShapeDtypeStruct leaves (no memory), e.g. for loading."""
  return nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0)))


def apply(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array,
          **kwargs: Any) -> VisionOutput:
  """`nnx.merge(graphdef, state)(pixel_values, **kwargs)`, for use inside `jax.jit`."""
  return nnx.merge(graphdef, state)(pixel_values, **kwargs)


def num_image_tokens(config: VisionConfig, strategy: str = "full") -> int:
  """Tokens per image of `select_features` at `image_size` ("default" drops CLIP's CLS)."""
  tokens = config.num_positions
  return tokens - 1 if strategy == "default" else tokens


__all__ = ["ACTIVATIONS", "AttentionPoolingHead", "VARIANTS", "VisionConfig", "VisionOutput",
           "VisionTower", "abstract_vision_tower", "apply", "bicubic_matrix", "create_vision_tower",
           "layers_needed", "num_image_tokens", "select_features"]
