"""Int8 weight-only quantization with one symmetric scale per output channel.

A weight W of shape [in..., out...] (its first `in_ndim` dims contract with the input, as
everywhere in layers.py) is stored as int8 codes of the same shape plus one float32 scale per
output channel, the largest magnitude over that channel's inputs mapped to 127 (absmax, or
"symmetric per-channel" quantization; LLM.int8(), arXiv 2208.07339 §2 and §3.1, before its
outlier decomposition, which this does not do):

  scale[o] = max_i |W[i, o]| / 127,   code[i, o] = round(W[i, o] / scale[o]) in [-127, 127]
  W[i, o] ~= code[i, o] * scale[o],   |W[i, o] - code[i, o] * scale[o]| <= scale[o] / 2

-128 is never used, so the grid is symmetric and negation-exact. A channel that is all zero
gets scale 1 and codes 0 (exact). Nothing is clipped: |W / scale| <= 127 by construction.

Why per output channel: a scale that varies along the output dims factors out of the
contraction, x @ (code * scale) = (x @ code) * scale, so the layer runs one matmul against
the codes (converted to the compute dtype) and scales its [.., out] result, never forming the
dequantized weight; the rounding error of each channel is bounded by its own range.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.layers import matmul
from wakea_jax.models.quant import QuantizedBase

INT8_MAX = 127


@functools.partial(jax.jit, static_argnames=("in_ndim",))
def quantize_int8(w: Array, in_ndim: int) -> tuple[Array, Array]:
  """(codes int8 shaped like `w`, scales float32 [out...]) of w [in..., out...]."""
  if not 0 < in_ndim < w.ndim:
    raise ValueError(f"in_ndim {in_ndim} does not split a weight of shape {w.shape}")
  w32 = w.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w32), axis=tuple(range(in_ndim)))
  scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0)
  codes = jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  return codes, scale


def dequantize_int8(codes: Array, scale: Array, dtype: Any = jnp.float32) -> Array:
  """codes * scale in `dtype` (the scale broadcasts over the leading input dims)."""
  return (codes.astype(jnp.float32) * scale).astype(dtype)


class Int8Weight(nnx.Module):
  """A frozen int8 weight usable wherever `layers.dense` takes a weight (for decoding).

  codes  QuantizedBase int8 [in..., out...], the weight's logical axes
  scale  QuantizedBase float32 [out...], the logical axes of the output dims
  Neither is an `nnx.Param`, so no trainable-parameter filter selects them.
  """

  def __init__(self, codes: Array, scale: Array, *, in_ndim: int,
               logical_axes: tuple[str | None, ...] | None = None):
    if codes.shape[in_ndim:] != scale.shape:
      raise ValueError(f"scale shape {scale.shape} is not the output dims of {codes.shape} "
                       f"(in_ndim {in_ndim})")
    self.in_ndim = in_ndim
    axes = tuple(logical_axes) if logical_axes is not None else (None,) * codes.ndim
    self.codes = QuantizedBase(codes, logical_axes=axes)
    self.scale = QuantizedBase(scale, logical_axes=axes[in_ndim:])

  @classmethod
  def from_param(cls, weight: nnx.Variable, in_ndim: int) -> Int8Weight:
    """Quantizes a Param's value, keeping its logical axes."""
    codes, scale = quantize_int8(weight[...], in_ndim)
    return cls(codes, scale, in_ndim=in_ndim,
               logical_axes=weight.get_metadata().get("logical_axes"))

  def dequantize(self, dtype: Any = jnp.float32) -> Array:
    """The weight codes * scale in `dtype`."""
    return dequantize_int8(self.codes[...], self.scale[...], dtype)

  def __call__(self, x: Array, equation: str, dtype: Any) -> Array:
    """`einsum(equation, x, W)` in `dtype`: one matmul against the codes, then the scales
    on the output dims (exact refactoring; see the module docstring)."""
    lhs, rhs = equation.replace(" ", "").split("->")[0].split(",")
    out = equation.replace(" ", "").split("->")[1]
    k = self.in_ndim
    # The scale multiplies the output's trailing dims: only when they are the weight's
    # output dims in order; any other form dequantizes the weight first.
    if len(rhs) != self.codes[...].ndim or not out.endswith(rhs[k:]):
      return jnp.einsum(equation, x, self.dequantize(dtype))
    y = matmul(x, self.codes[...].astype(dtype), equation)
    return y * self.scale[...].astype(dtype)


def int8_nbytes(weight: Int8Weight) -> int:
  """Storage of the codes and scales."""
  return sum(math.prod(v.shape) * v.dtype.itemsize
             for v in (weight.codes[...], weight.scale[...]))
