"""Projectors from encoder features to the language model's embedding width.

`Projector` is LLaVA's two-layer MLP (arXiv 2310.03744, HF `LlavaMultiModalProjector`):
linear_2(act(linear_1(x))), act GELU by default. Optional token pooling runs before it:
`pool_window=k` averages each k x k block of the patch grid (ceil mode: a block cut by the
grid's edge averages the cells it has), so a 27 x 27 SigLIP grid becomes 14 x 14 at k=2 and
the language model sees ~4x fewer image tokens. Pooling first is the cheap place: it equals
pooling after `linear_1` (an average commutes with an affine map) and differs from pooling
the projector's output only through the activation.
HF's LLaVA has no pooling; import and export map the MLP only (`checkpoints/vision.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.config import _DTYPES
from wakea_jax.models.layers import dense, param
from wakea_jax.models.vision import ACTIVATIONS
from wakea_jax.parallel.mesh import constrain


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """`in_dim` (vision width x feature layers) -> `out_dim` (the LM's embed_dim).

  `hidden_act` is an HF activation name (LLaVA's `projector_hidden_act`), `bias` LLaVA's
  `multimodal_projector_bias`; `pool_window` 1 means no pooling.
  """

  in_dim: int
  out_dim: int
  hidden_act: str = "gelu"
  bias: bool = True
  pool_window: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self) -> None:
    for name in ("in_dim", "out_dim", "pool_window"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ProjectorConfig.{name} must be a positive int, got {value!r}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"ProjectorConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.hidden_act!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"ProjectorConfig.{name} must be one of {sorted(_DTYPES)}, "
                         f"got {getattr(self, name)!r}")

  def num_tokens(self, tokens: int) -> int:
    """Tokens out for `tokens` in (a square grid when pooling)."""
    if self.pool_window == 1:
      return tokens
    side = math.ceil(grid_side(tokens) / self.pool_window)
    return side * side


def grid_side(tokens: int) -> int:
  """The side of a square grid of `tokens` patches (ValueError if not square)."""
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"{tokens} tokens are not a square patch grid; pool patch tokens only "
                     "(drop CLIP's class token: vision_feature_select_strategy 'default')")
  return side


def pool_tokens(x: Array, window: int) -> Array:
  """Average pooling of a square patch grid: x [b, g*g, e] -> [b, ceil(g/k)^2, e].

  Row-major grid (as ViTs flatten patches); a block cut by the edge averages its real cells.
  """
  if window == 1:
    return x
  b, t, e = x.shape
  g = grid_side(t)
  out = -(-g // window)
  pad = out * window - g
  grid = jnp.pad(x.reshape(b, g, g, e), ((0, 0), (0, pad), (0, pad), (0, 0)))
  sums = grid.reshape(b, out, window, out, window, e).sum(axis=(2, 4), dtype=jnp.float32)
  ones = jnp.pad(jnp.ones((g, g), jnp.float32), ((0, pad), (0, pad)))
  counts = ones.reshape(out, window, out, window).sum(axis=(1, 3))
  return (sums / counts[None, :, :, None]).reshape(b, out * out, e).astype(x.dtype)


class Projector(nnx.Module):
  """`projector(features [b, t, in_dim])` -> [b, t', out_dim] (t' = t unless pooling)."""

  def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    pd = _DTYPES[c.param_dtype]
    self.linear_1 = param(rngs, (c.in_dim, c.out_dim), (None, "embed"), pd, std=c.init_std)
    self.linear_2 = param(rngs, (c.out_dim, c.out_dim), (None, "embed"), pd, std=c.init_std)
    if c.bias:
      self.bias_1 = param(None, (c.out_dim,), ("embed",), pd, value=0.0)
      self.bias_2 = param(None, (c.out_dim,), ("embed",), pd, value=0.0)

  def __call__(self, features: Array) -> Array:
    """features [b, t, in_dim] -> [b, t', out_dim] in the config's dtype."""
    c = self.config
    dt = _DTYPES[c.dtype]
    x = pool_tokens(features.astype(dt), c.pool_window)
    h = dense(x, self.linear_1, "bti,io->bto", dt)
    if c.bias:
      h = h + self.bias_1[...].astype(dt)
    h = ACTIVATIONS[c.hidden_act](h)
    out = dense(h, self.linear_2, "bti,io->bto", dt)
    if c.bias:
      out = out + self.bias_2[...].astype(dt)
    return constrain(out, ("act_batch", "act_length", "act_embed"))


def create_projector(config: ProjectorConfig, *, seed: int = 0) -> Projector:
  """A randomly initialised projector."""
  return Projector(config, rngs=nnx.Rngs(seed))


def abstract_projector(config: ProjectorConfig) -> Projector:
  """The projector's structure with ShapeDtypeStruct leaves (no memory), e.g. for loading."""
  return nnx.eval_shape(lambda: Projector(config, rngs=nnx.Rngs(0)))


__all__ = ["Projector", "ProjectorConfig", "abstract_projector", "create_projector",
           "grid_side", "pool_tokens"]
