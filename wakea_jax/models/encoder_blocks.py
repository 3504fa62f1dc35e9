"""The pre-LN transformer encoder block the ViT towers (`models/vision.py`: SigLIP, CLIP) and
the Whisper / Qwen2-Audio tower (`models/audio.py`) share:

  x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))

with biases everywhere except, as HF's `WhisperAttention`, Whisper's k_proj (`k_bias=False`).
The towers differ in the activation (passed in), the LayerNorm eps and whether attention is
masked (Whisper masks padded positions as keys; the ViTs attend to every token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.layers import dense, dot_product_attention, param
from wakea_jax.parallel.mesh import constrain


class LayerNorm(nnx.Module):
  """LayerNorm with bias (arXiv 1607.06450): float32 statistics, the result in `dtype` (None:
  the input's dtype)."""

  def __init__(self, dim: int, eps: float, *, param_dtype: Any, dtype: Any = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(None, (dim,), ("norm",), param_dtype, value=1.0)
    self.bias = param(None, (dim,), ("norm",), param_dtype, value=0.0)

  def __call__(self, x: Array) -> Array:
    """Normalises x over its last axis, then scales and shifts; same shape."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            ).astype(x.dtype if self.dtype is None else self.dtype)


class EncoderAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biases on q, (k unless `k_bias=False`), v
  and out."""

  def __init__(self, embed_dim: int, num_heads: int, *, k_bias: bool = True, dtype: Any,
               param_dtype: Any, init_std: float, rngs: nnx.Rngs):
    e, n, h, pd = embed_dim, num_heads, embed_dim // num_heads, param_dtype
    self.num_heads, self.dtype = n, dtype
    for name in ("q", "k", "v"):
      setattr(self, f"{name}_proj",
              param(rngs, (e, n, h), ("embed", "q_heads", "head_dim"), pd, std=init_std))
      if name != "k" or k_bias:
        setattr(self, f"{name}_bias",
                param(None, (n, h), ("q_heads", "head_dim"), pd, value=0.0))
    self.o_proj = param(rngs, (n, h, e), ("q_heads", "head_dim", "embed"), pd, std=init_std)
    self.o_bias = param(None, (e,), ("embed",), pd, value=0.0)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x [b, t, e], mask [b, t, t] (True = may attend; None: every token sees every token)
    -> [b, t, e]."""
    dt = self.dtype

    def project(name: str) -> Array:
      y = dense(x, getattr(self, f"{name}_proj"), "bte,enh->btnh", dt)
      bias = getattr(self, f"{name}_bias", None)
      return y if bias is None else y + bias[...].astype(dt)

    if mask is None:
      b, t = x.shape[:2]
      mask = jnp.ones((b, t, t), bool)
    out = dot_product_attention(project("q"), project("k"), project("v"), mask, self.num_heads)
    return dense(out, self.o_proj, "btnh,nhe->bte", dt) + self.o_bias[...].astype(dt)


class EncoderMLP(nnx.Module):
  """fc2(act(fc1(x))) with biases."""

  def __init__(self, embed_dim: int, mlp_dim: int, act: Callable[[Array], Array], *,
               dtype: Any, param_dtype: Any, init_std: float, rngs: nnx.Rngs):
    pd, self.dtype, self.act = param_dtype, dtype, act
    self.up_proj = param(rngs, (embed_dim, mlp_dim), ("embed", "mlp"), pd, std=init_std)
    self.up_bias = param(None, (mlp_dim,), ("mlp",), pd, value=0.0)
    self.down_proj = param(rngs, (mlp_dim, embed_dim), ("mlp", "embed"), pd, std=init_std)
    self.down_bias = param(None, (embed_dim,), ("embed",), pd, value=0.0)

  def __call__(self, x: Array) -> Array:
    """x [b, t, e] -> [b, t, e]."""
    dt = self.dtype
    h = dense(x, self.up_proj, "bte,em->btm", dt) + self.up_bias[...].astype(dt)
    h = constrain(self.act(h), ("act_batch", "act_length", "act_mlp"))
    return dense(h, self.down_proj, "btm,me->bte", dt) + self.down_bias[...].astype(dt)


class EncoderLayer(nnx.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, embed_dim: int, num_heads: int, mlp_dim: int,
               act: Callable[[Array], Array], *, norm_eps: float, k_bias: bool = True,
               dtype: Any, param_dtype: Any, init_std: float, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = LayerNorm(embed_dim, norm_eps, **kw)
    self.attn = EncoderAttention(embed_dim, num_heads, k_bias=k_bias, init_std=init_std,
                                 rngs=rngs, **kw)
    self.mlp_norm = LayerNorm(embed_dim, norm_eps, **kw)
    self.mlp = EncoderMLP(embed_dim, mlp_dim, act, init_std=init_std, rngs=rngs, **kw)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """x [b, t, e], mask as `EncoderAttention`'s -> [b, t, e]."""
    x = x + self.attn(self.attn_norm(x), mask)
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("act_batch", "act_length", "act_embed"))


__all__ = ["EncoderAttention", "EncoderLayer", "EncoderMLP", "LayerNorm"]
