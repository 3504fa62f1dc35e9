"""Building blocks of the decoder: RMSNorm, RoPE, grouped-query attention (with segment ids,
padding and a KV cache), and the SwiGLU MLP.

Every parameter carries `logical_axes` metadata naming its dimensions ('embed', 'mlp', ...).
The model never mentions a mesh axis: `wakea_jax.parallel.mesh` maps logical names to mesh
axes with the rules table from the config. Activations are annotated the same way through
`constrain`, which is a no-op unless a rules context is active.
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
from jax.ad_checkpoint import checkpoint_name

from wakea_jax.models.config import ModelConfig, RopeScaling
from wakea_jax.models.fused_attention import (
  accelerator_platform,
  choose_implementation,
  fused_attention,
)
from wakea_jax.parallel.mesh import constrain

# A large negative number rather than -inf: a fully masked row (a padding query) must give
# finite values, not NaN, so that gradients through padded batches stay clean.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype: Any, *, std: float | None = None, value: float | None = None) -> nnx.Param:
  """A parameter initialised from N(0, std^2) or to a constant, tagged with logical axes."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
  if value is not None:
    array = jnp.full(shape, value, dtype)
  else:
    assert rngs is not None and std is not None
    array = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(array, logical_axes=tuple(axes))


def dense(x: Array, weight: Any, equation: str, dtype: Any) -> Array:
  """`einsum(equation, x, weight)` in `dtype`, for a plain Param or a weight module.

  Weight modules (LoRA adapters, quantized bases: `wakea_jax.models.lora`) are callables
  `weight(x, equation, dtype)`; the layers stay unaware of how a weight is represented. The
  weight's leading dimensions are the ones contracted with x's trailing dimensions.
  """
  if isinstance(weight, nnx.Variable):
    return matmul(x, weight[...], equation, dtype)
  return weight(x, equation, dtype)


def matmul(x: Array, w: Array, equation: str, dtype: Any = None) -> Array:
  """`einsum(equation, x, w)` in `dtype` (default: w's) for x's trailing dims contracting w's
  leading dims, as one 2-D matmul: [prod(lead), prod(contracted)] @ [prod(contracted),
  prod(out)].

  Why: XLA:CPU runs the backward pass of rank-3 einsums far slower than the same products
  written as 2-D matmuls (bench56m MLP fwd+bwd: 0.37 vs 0.66 TFLOP/s); reshapes of
  contiguous leading/trailing dims are free and keep shardings. In a 16-bit dtype the
  products go through `lowp_matmul` (float32 accumulation, float32 weight gradients).
  """
  dtype = jnp.dtype(w.dtype if dtype is None else dtype)
  lhs, rhs = equation.split("->")[0].split(",")
  k = len(set(lhs) & set(rhs))
  if lhs[-k:] != rhs[:k] or equation.split("->")[1] != lhs[:-k] + rhs[k:]:
    # not of the simple form: let einsum handle it
    return jnp.einsum(equation, x.astype(dtype), w.astype(dtype))
  lead, contracted = x.shape[:-k], x.shape[-k:]
  out = w.shape[k:]
  x2 = x.reshape(-1, math.prod(contracted)).astype(dtype)
  w2 = w.reshape(math.prod(contracted), -1)
  if dtype.itemsize == 2:
    y = lowp_matmul(x2, w2)
  else:
    y = x2 @ w2.astype(dtype)
  return y.reshape(lead + out)


# Names of lowp_matmul's outputs for remat policies (transformer._REMAT), which cannot see
# the dots inside a custom VJP: an unbatched weight's product and a batched one's.
LOWP_DOT = "lowp_dot"
LOWP_BATCHED_DOT = "lowp_batched_dot"


def lowp_matmul(x: Array, w: Array, out_dtype: Any = None, w_transposed: bool = False) -> Array:
  """x [..., m, k] @ w [..., k, n] (w [..., n, k] with `w_transposed`; the same leading batch
  dimensions, or none for w) in x's 16-bit dtype, accumulated in float32, returned in
  `out_dtype` (default x's). w may be the float32 master weight (cast here); its gradient
  then stays float32.

  Why: XLA:CPU runs a bfloat16 dot on its fast kernels (YNNPACK, AMX where the CPU has it)
  only when the dot outputs float32 and the lhs is row-major with the contracted dimension
  last; otherwise it converts both operands to float32 first (bench56m's MLP fwd+bwd: 226
  ms in bfloat16, 217 in float32, 148 with this function, on an AMX Xeon). Plain autodiff
  breaks both conditions in the backward pass (float32 cotangents; the weight gradient
  x^T g contracts x's row dimension), so the backward is written out: the cotangent in
  x's dtype, the input gradient as a 16-bit dot, the weight gradient from a transposed copy
  of x (of g for a transposed w; a copy on CPU only). On GPU and TPU these are the same
  products with the same float32 accumulation.

  The output is named for remat policies: `LOWP_DOT` for an unbatched w, else
  `LOWP_BATCHED_DOT`.
  """
  y = _lowp_matmul(x, w, out_dtype, w_transposed)
  return checkpoint_name(y, LOWP_DOT if w.ndim == 2 else LOWP_BATCHED_DOT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lowp_matmul(x: Array, w: Array, out_dtype: Any, w_transposed: bool) -> Array:
  return _lowp_dot(x, w.astype(x.dtype), w_transposed).astype(out_dtype or x.dtype)


def _lowp_dot(a: Array, b: Array, b_transposed: bool) -> Array:
  """a [..., m, k] . b [..., k, n] (b [..., n, k] when transposed) -> float32 [..., m, n]."""
  batch = tuple(range(b.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim - 1 if b_transposed else b.ndim - 2,)), (batch, batch))
  if not batch:   # an unbatched weight: x's leading dims are rows
    dims = (((a.ndim - 1,), (1 if b_transposed else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _lowp_matmul_fwd(x, w, out_dtype, w_transposed):
  return _lowp_matmul(x, w, out_dtype, w_transposed), (x, w)


def _lowp_matmul_bwd(out_dtype, w_transposed, residuals, g):
  del out_dtype
  x, w = residuals
  g = g.astype(x.dtype)
  wc = w.astype(x.dtype)
  if w.ndim == 2 and x.ndim > 2:   # an unbatched weight: fold x's leading dims into rows
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  else:
    x2, g2 = x, g
  if w_transposed:   # y = x w^T: dx = g w, dw = g^T x
    dx = _lowp_dot(g, wc, False)
    dw = _lowp_dot(_transpose_rows(g2), x2, False)
  else:              # y = x w: dx = g w^T, dw = x^T g
    dx = _lowp_dot(g, wc, True)
    dw = _lowp_dot(_transpose_rows(x2), g2, False)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


_TRANSPOSE_BLOCK = 8   # rows per block in _transpose_rows


def _copies_transposes() -> bool:
  """Whether transposes feeding 16-bit products are made copies in memory: on CPU only. GPU
  and TPU matmuls take transposed operands as they are (XLA folds the transpose into the
  product's dimension numbers there), so a copy would only add memory traffic."""
  return accelerator_platform() == "cpu"


def _head_major(x: Array) -> Array:
  """[b, t, n, h] -> [b, n, t, h] as a copy in memory, so that the attention products see
  row-major operands with their batch dimensions leading: a plain transpose is folded into
  the products' dimension numbers, and XLA:CPU then converts 16-bit operands to float32
  first (see `lowp_matmul`). Blocks of 8 positions: the same values. Elsewhere than on CPU,
  the plain transpose (`_copies_transposes`)."""
  b, t, n, h = x.shape
  r = _TRANSPOSE_BLOCK
  if t % r or not _copies_transposes():
    return x.transpose(0, 2, 1, 3)
  return x.reshape(b, t // r, r, n, h).transpose(0, 3, 1, 2, 4).reshape(b, n, t, h)


def _transpose_rows(x: Array) -> Array:
  """x [..., m, k] -> [..., k, m], written so that XLA keeps it a transpose in memory: a
  plain transpose feeding a dot is folded into the dot's dimension numbers, which makes the
  dot one XLA:CPU will not run in 16 bits (see `lowp_matmul`). Blocks of 8 rows: the same
  values. Elsewhere than on CPU, the plain transpose (`_copies_transposes`)."""
  *lead, m, k = x.shape
  n = len(lead)
  r = _TRANSPOSE_BLOCK
  if m % r or not _copies_transposes():
    return jnp.swapaxes(x, -1, -2)
  blocks = x.reshape(*lead, m // r, r, k)
  return blocks.transpose(*range(n), n + 2, n, n + 1).reshape(*lead, k, m)


class RMSNorm(nnx.Module):
  """Root-mean-square norm (arXiv 1910.07467), computed in float32 like HF Llama."""

  def __init__(self, dim: int, eps: float, *, param_dtype: Any, axes: tuple[str, ...] = ("norm",)):
    self.eps = eps
    self.scale = param(None, (dim,), axes, param_dtype, value=1.0)

  def __call__(self, x: Array) -> Array:
    """Normalises x over its last axis; the result has x's shape and dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before multiplying by the weight; we do the same so
    # that bfloat16 runs round identically.
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Rotary position embedding (arXiv 2104.09864), HF "rotate_half" layout: the first half of
# the head dimension pairs with the second half. HF checkpoints are stored in this layout,
# so import needs no permutation.
# ----------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  # Llama 3.1 frequency-dependent scaling (HF `_compute_llama3_parameters`).
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array,
               inv_freq: np.ndarray) -> Array:
  """Rotates x [b, t, heads, head_dim] by positions [b, t] * inv_freq; float32 math, x's dtype."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, h/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer keys and values plus each sequence's fill level.

  Slot `s` of sequence `b` holds the token at position `s`. `end_index[b]` is the number of
  valid slots; new tokens are written at `end_index[b] + t` and attend to slots `<=` their own.
  Slots past `end_index` may hold stale values (e.g. right-padding written during prefill);
  the causal rule never lets a valid query see them, and they are overwritten as decoding
  proceeds. Writers must keep `end_index + new_tokens <= capacity` (the sampler checks it).

  Head-major: a layer's keys (and values) are [batch, kv_heads, capacity, head_dim], the
  layout attention multiplies in, so a decode step reads the cache as stored. Token-major
  [batch, capacity, kv_heads, head_dim] made every step transpose the whole cache of every
  layer into a copy (bench56m decode: about 30% of the bytes a step moved); now only the
  new tokens are transposed, when they are written.

  Two arrangements of the layers, chosen by `create` from `ModelConfig.scan_layers`: a tuple
  of per-layer [batch, kv_heads, capacity, head_dim] arrays (a Python loop over layers), or
  one stacked [layers, batch, kv_heads, capacity, head_dim] array that `lax.scan` runs over
  together with the stacked layer parameters. Code that only uses `create`, `capacity` and
  `end_index` works with both.
  """

  keys: tuple[Array, ...] | Array    # see the layouts above
  values: tuple[Array, ...] | Array
  end_index: Array                   # [batch] int32

  @classmethod
  def create(cls, config: ModelConfig, batch: int, capacity: int,
             dtype: Any | None = None) -> KVCache:
    """An empty cache in the layout of `config.scan_layers`, end_index 0."""
    dtype = dtype or config.compute_dtype
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    end_index = jnp.zeros((batch,), jnp.int32)
    if config.scan_layers:
      stacked = (config.num_layers,) + shape
      return cls(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype), end_index)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return cls(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
               end_index)

  @property
  def stacked(self) -> bool:
    """Whether keys and values are single [layers, ...] arrays (the scan_layers layout)."""
    return not isinstance(self.keys, (tuple, list))

  @property
  def capacity(self) -> int:
    """Slots per sequence: the most tokens the cache can hold."""
    return self.keys.shape[3] if self.stacked else self.keys[0].shape[2]


def _bits_on_cpu(dtype: Any) -> bool:
  """Whether arrays of `dtype` are moved as unsigned-integer bits (`take_rows`, `_write`):
  16-bit floats on CPU, where XLA:CPU gathers and scatters them in float32."""
  dtype = jnp.dtype(dtype)
  return (jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2
          and accelerator_platform() == "cpu")


def take_rows(table: Array, ids: Array) -> Array:
  """`jnp.take(table, ids, axis=0)`; a 16-bit float table is gathered as unsigned integers of
  its width (a free bitcast), since XLA:CPU gathers from a bfloat16 table by converting all
  of it to float32 first (a bench56m rollout model's 32000 x 512 embedding: 35 ms and 62
  MiB per decode call); on CPU only. Differentiable as the plain gather (a custom VJP)."""
  if not _bits_on_cpu(table.dtype):
    return jnp.take(table, ids, axis=0)
  return _take_bits(table, ids)


@jax.custom_vjp
def _take_bits(table: Array, ids: Array) -> Array:
  bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
  return jax.lax.bitcast_convert_type(bits, table.dtype)


def _take_bits_fwd(table, ids):
  return _take_bits(table, ids), (table, ids)


def _take_bits_bwd(residuals, g):
  table, ids = residuals
  _, vjp = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)
  return vjp(g)[0], None


_take_bits.defvjp(_take_bits_fwd, _take_bits_bwd)


def _write(cache: Array, new: Array, start: Array) -> Array:
  """Writes new [b, t, k, h] into a head-major cache [b, k, s, h] at a per-sequence offset.

  Only the t new tokens are moved to head-major; the cache is updated in place.

  A 16-bit cache is written another way: XLA:CPU runs a bfloat16 scatter in float32,
  converting the whole cache there and back (4 of a bench56m bfloat16 decode step's 16 ms
  of thread time). One token per row (a decode step) is a select over the cache (one fused
  pass, ~0.4 ms for the step's 16 caches at 256 slots); more (a prefill) is the scatter on
  the cache's bits as uint16 (a bitcast XLA:CPU copies, once per call). A start past the
  cache (a finished row of a full cache) writes nothing there; the scatter clamps it. On
  CPU only: GPU and TPU scatter 16-bit values in place, where a select would read and
  write the whole cache every step.
  """
  dtype = cache.dtype
  new = new.astype(dtype).transpose(0, 2, 1, 3)                       # [b, k, t, h]
  if not _bits_on_cpu(dtype):
    return _scatter_rows(cache, new, start)   # GPU and TPU scatter 16 bits in place
  if new.shape[2] == 1:
    slot = jnp.arange(cache.shape[2]) == start[:, None]                 # [b, s]
    bits = jnp.where(slot[:, None, :, None], jax.lax.bitcast_convert_type(new, jnp.uint16),
                     jax.lax.bitcast_convert_type(cache, jnp.uint16))
    return jax.lax.bitcast_convert_type(bits, dtype)
  out = _scatter_rows(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                      jax.lax.bitcast_convert_type(new, jnp.uint16), start)
  return jax.lax.bitcast_convert_type(out, dtype)


def _scatter_rows(cache: Array, new: Array, start: Array) -> Array:
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(
      cache, new, start)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, num_kv_heads: int, *,
                          causal: bool = False, block: int = 128,
                          kv_layout: str = "bskh", smear: Array | None = None) -> Array:
  """Grouped-query softmax attention.

  q [b, t, n, h], k/v [b, s, k, h] (`kv_layout="bskh"`, fresh projections) or [b, k, s, h]
  (`kv_layout="bksh"`, the head-major KV cache), mask [b, t, s] (True = may attend) ->
  [b, t, n, h]. Scores and softmax are float32. Heads are moved in front of the sequence so
  that both matmuls are plain batched [t', h] x [h, s] products over (batch, kv head), with
  the query group folded into the rows; on CPU this layout is ~25% faster than contracting
  in place. Head-major keys and values are already in it: nothing is transposed.

  With `causal=True` (the mask is known to include the causal rule and t == s), queries are
  processed in blocks that only look at the keys up to the block's end: exact, since later
  keys are masked anyway, and it skips the upper triangle's score work (about half).

  `smear` [n] (in [0, 1], per query head) attends with smeared keys
  k'_j = (1 - smear) k_j + smear k_{j-1} (ModelConfig.smeared_keys), where k_{j-1} counts only
  if the query may attend to it (mask[i, j-1]: else slot j starts the query's segment, or
  follows padding). Scores are linear in the key, so with a cache (or `causal=False`) this
  is the score matrix mixed with itself shifted one key along: no key tensor is rebuilt, and
  the KV cache keeps plain keys. Without one (`causal=True`, t == s: training, scoring) the
  keys are smeared per query head instead (`_smeared_keys`) and attended to like plain ones.
  """
  b, t, n, h = q.shape
  g = n // num_kv_heads
  if smear is not None:
    smear = smear.astype(jnp.float32).reshape(1, num_kv_heads, g, 1, 1)
  if kv_layout == "bskh":
    k = _head_major(k)                                                # [b, k, s, h]
    v = _head_major(v)
  elif kv_layout != "bksh":
    raise ValueError(f"kv_layout must be 'bskh' or 'bksh', got {kv_layout!r}")
  if smear is not None and causal and t == k.shape[2]:
    k, v = _smeared_keys(k, v, mask, smear)                           # [b, n, s, h]
    smear, num_kv_heads, g = None, n, 1
  q = _head_major(q).reshape(b, num_kv_heads, g, t, h)                # [b, k, g, t, h]
  if causal and t == k.shape[2] and t > block:
    starts = range(0, t, block)
    out = jnp.concatenate(
        [_attend(q[:, :, :, i:i + block], k[:, :, :i + block], v[:, :, :i + block],
                 mask[:, i:i + block, :i + block], smear) for i in starts], axis=3)
  else:
    out = _attend(q, k, v, mask, smear)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _smeared_keys(k: Array, v: Array, mask: Array, smear: Array) -> tuple[Array, Array]:
  """Smeared keys built per query head, for attention without a cache (training, scoring):
  k/v [b, kv, s, h], mask [b, s, s] causal, smear [1, kv, g, 1, 1] -> k', v [b, kv*g, s, h]
  with k'_j = (1 - smear) k_j + smear k_{j-1} where query j may attend to key j-1.

  The same function as mixing the scores (`_attend`): a query i that may attend to key j
  may attend to key j-1 exactly when query j may (causal masks within segments, padding keys
  removed: `transformer.attention_mask_for`), so the per-(i, j) rule is a per-key one here.
  The attention is then the plain one with its written-out backward pass, where autodiff of
  the mixed scores made several passes over [b, n, t, s] tensors (one layer's fwd+bwd at the
  SRL demonstration base's shapes: README, "Smeared keys are what made the searcher copy").
  The keys and values then take g times their memory (g query heads per KV head): fine for
  the small from-scratch models smeared keys serve."""
  b, kv, s, h = k.shape
  g = smear.shape[2]
  ok = jnp.pad(jnp.diagonal(mask, offset=-1, axis1=1, axis2=2), ((0, 0), (1, 0)))   # [b, s]
  previous = jnp.pad(k[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))
  previous = jnp.where(ok[:, None, :, None], previous, 0)
  mixed = ((1.0 - smear) * k[:, :, None].astype(jnp.float32)
           + smear * previous[:, :, None].astype(jnp.float32)).astype(k.dtype)
  v = jnp.broadcast_to(v[:, :, None], (b, kv, g, s, h))
  return mixed.reshape(b, kv * g, s, h), v.reshape(b, kv * g, s, h)


def _attend(q: Array, k: Array, v: Array, mask: Array, smear: Array | None = None) -> Array:
  """q [b, k, g, t, h], k/v [b, k, s, h], mask [b, t, s], smear [1, k, g, 1, 1] or None
  -> [b, k, g, t, h]."""
  b, kv, g, t, h = q.shape
  s = k.shape[2]
  if smear is None:
    return _softmax_attention(q.reshape(b, kv, g * t, h), k, v, mask, g).reshape(q.shape)
  # Smeared keys: the softmax below, differentiated by autodiff.
  if q.dtype.itemsize == 2:   # 16-bit compute: XLA:CPU's fast path (lowp_matmul)
    scores = lowp_matmul(q.reshape(b, kv, g * t, h), k, jnp.float32, True)
  else:
    scores = jnp.einsum("bkqh,bksh->bkqs", q.reshape(b, kv, g * t, h), k,
                        preferred_element_type=jnp.float32)
  scores = (scores * (h ** -0.5)).reshape(b, kv, g, t, s)
  m = mask[:, None, None, :, :]
  pad = [(0, 0)] * (scores.ndim - 1) + [(1, 0)]
  previous = jnp.pad(scores[..., :-1], pad)                # q_i . k_{j-1}
  previous_ok = jnp.pad(m[..., :-1], pad)
  scores = (1.0 - smear) * scores + smear * jnp.where(previous_ok, previous, 0.0)
  scores = jnp.where(m, scores, _MASK_VALUE)
  # Max-shifted softmax; the max is a constant for differentiation (the gradient is exact).
  row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - row_max)
  probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
  # Zero rows that see no key at all (padding queries) instead of a uniform average.
  probs = jnp.where(jnp.any(m, axis=-1, keepdims=True), probs, 0.0).astype(v.dtype)
  if v.dtype.itemsize == 2:
    out = lowp_matmul(probs.reshape(b, kv, g * t, s), v)
  else:
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, kv, g * t, s), v)
  return out.reshape(b, kv, g, t, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q: Array, k: Array, v: Array, mask: Array, groups: int) -> Array:
  """softmax(q k^T / sqrt(h), masked) v with a written-out backward pass (as flash attention's):
  q [b, kv, g*t, h] (g query heads per KV head, t queries each), k/v [b, kv, s, h], mask
  [b, t, s] -> [b, kv, g*t, h] in v's dtype. Rows that see no key give 0.

  The forward pass keeps the unnormalised weights exp(s - max) (in v's dtype) and divides the
  [.., h] output by their sum instead of the [.., s] weights; the backward pass is
  dS = W (dO/l v^T - D/l) with D = rowsum(dO O), one elementwise pass over the scores where
  autodiff of the softmax made several (and, in 16-bit compute, no float32 scores-sized
  residual). Products run
  through `_lowp_dot` (float32 accumulation: XLA:CPU's fast 16-bit kernels), the key and
  value gradients as q^T dS and (dO/l)^T W from small transposed copies of q and dO, not of
  the scores-sized dS and W. bench56m shapes, one layer's fwd+bwd on 2 CPU cores: see the
  README ("The attention core").
  """
  return _softmax_attention_fwd(q, k, v, mask, groups)[0]


def _scores(q: Array, k: Array, t: int) -> Array:
  """q [b, kv, r, h] . k [b, kv, s, h] over h -> float32 [b, kv, r, s]: one batched product,
  or, for one float32 query per head (a decode step, t == 1), one matrix-vector product per
  query row of the group, stacked. XLA:CPU streams the cache through a batched [r, h] x
  [s, h]^T product with r of 1-8 rows at a fraction of the rate of r separate [s, h] x [h]
  products (bench56m decode at batch 8, 2-core AMD EPYC: 0.45 -> 0.1-0.15 ms per layer);
  the keys, a few MB per layer, stay in cache between the rows."""
  if t == 1 and q.dtype == jnp.float32 and k.dtype == jnp.float32:
    return jnp.stack([jnp.einsum("bkh,bksh->bks", q[:, :, i], k,
                                 preferred_element_type=jnp.float32)
                      for i in range(q.shape[2])], axis=2)
  return _lowp_dot(q, k, True)


def _softmax_attention_fwd(q, k, v, mask, groups):
  b, kv, r, h = q.shape
  t, s = r // groups, k.shape[2]
  scores = _scores(q, k, t).reshape(b, kv, groups, t, s) * (h ** -0.5)
  m = mask[:, None, None, :, :]
  scores = jnp.where(m, scores, _MASK_VALUE)
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  # 1 / sum, and 0 for a row that sees no key (a padding query): its output and gradients are 0.
  inv = jnp.where(jnp.any(m, axis=-1, keepdims=True),
                  1.0 / jnp.sum(weights, axis=-1, keepdims=True), 0.0).reshape(b, kv, r, 1)
  weights = weights.astype(v.dtype).reshape(b, kv, r, s)
  out = (_lowp_dot(weights, v, False) * inv).astype(v.dtype)
  return out, (q, k, v, weights, inv, out)


def _softmax_attention_bwd(groups, residuals, d_out):
  del groups
  q, k, v, weights, inv, out = residuals
  h = q.shape[-1]
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True) * inv   # D / l
  d_scaled = (d_out * inv).astype(v.dtype)                                           # dO / l
  d_weights = _lowp_dot(d_scaled, v, True)                       # (dO / l) v^T
  d_scores = (weights.astype(jnp.float32) * (d_weights - delta) * (h ** -0.5)).astype(q.dtype)
  dq = _lowp_dot(d_scores, k, False)                             # dS k
  dk = _transpose_rows(_lowp_dot(_transpose_rows(q), d_scores, False).astype(k.dtype))
  dv = _transpose_rows(_lowp_dot(_transpose_rows(d_scaled), weights, False).astype(v.dtype))
  return dq.astype(q.dtype), dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nnx.Module):
  """Grouped-query attention with optional qkv bias (Qwen2) and per-head QK norm (Qwen3)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    pd, std = c.weight_dtype, c.init_std
    out_std = std / math.sqrt(2 * c.num_layers)
    self.q_proj = param(rngs, (c.embed_dim, c.num_heads, c.head_dim),
                        ("embed", "q_heads", "head_dim"), pd, std=std)
    self.k_proj = param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                        ("embed", "kv_heads", "head_dim"), pd, std=std)
    self.v_proj = param(rngs, (c.embed_dim, c.num_kv_heads, c.head_dim),
                        ("embed", "kv_heads", "head_dim"), pd, std=std)
    self.o_proj = param(rngs, (c.num_heads, c.head_dim, c.embed_dim),
                        ("q_heads", "head_dim", "embed"), pd, std=out_std)
    if c.qkv_bias:
      self.q_bias = param(None, (c.num_heads, c.head_dim), ("q_heads", "head_dim"), pd, value=0.0)
      self.k_bias = param(None, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd,
                          value=0.0)
      self.v_bias = param(None, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd,
                          value=0.0)
    if c.qk_norm:
      self.q_norm = RMSNorm(c.head_dim, c.norm_eps, param_dtype=pd, axes=("head_dim",))
      self.k_norm = RMSNorm(c.head_dim, c.norm_eps, param_dtype=pd, axes=("head_dim",))
    if c.smeared_keys:
      # Per query head, the logit of the previous key's share (sigmoid(0) = half).
      self.key_smear = param(None, (c.num_heads,), ("q_heads",), pd, value=0.0)

  def __call__(
      self,
      x: Array,
      positions: Array,
      mask: Array,
      cache: tuple[Array, Array, Array] | None = None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    """x [b, t, e], positions [b, t], mask [b, t, s] -> ([b, t, e], updated (keys, values) or None).

    `cache` is this layer's (keys, values [b, kv_heads, s, head_dim] (head-major, see
    KVCache), start [b] int32): the new keys and values are written at `start` and attended
    to with the rest of the cache. Without a cache s == t and no cache is returned.
    """
    c = self.config
    dt = c.compute_dtype

    qkv_proj = getattr(self, "qkv_proj", None)   # decode_layout.pack_for_decode's fused kernel
    if qkv_proj is not None:
      q, k, v = jnp.split(dense(x, qkv_proj, "bte,enh->btnh", dt),
                          (c.num_heads, c.num_heads + c.num_kv_heads), axis=2)
    else:
      q, k, v = (dense(x, w, "bte,enh->btnh", dt)
                 for w in (self.q_proj, self.k_proj, self.v_proj))
    if c.qkv_bias:
      q, k, v = (y + getattr(self, b)[...].astype(dt)
                 for y, b in ((q, "q_bias"), (k, "k_bias"), (v, "v_bias")))
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # a trace-time constant
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))

    new_cache, kv_layout = None, "bskh"
    if cache is not None:
      cache_k, cache_v, start = cache
      k = _write(cache_k, k, start)
      v = _write(cache_v, v, start)
      new_cache, kv_layout = (k, v), "bksh"
      k, v = k.astype(dt), v.astype(dt)

    smear = (jax.nn.sigmoid(self.key_smear[...].astype(jnp.float32)) if c.smeared_keys
             else None)
    impl = "native" if c.smeared_keys else choose_implementation(c.attention, dt, c.head_dim)
    if impl == "native":
      out = dot_product_attention(q, k, v, mask, c.num_kv_heads, causal=cache is None,
                                  kv_layout=kv_layout, smear=smear)
    else:
      # One new token per row: Transformer.forward's mask is then slot <= end_index (`start`),
      # so the kernel gets lengths instead of a mask tensor. A done row whose cache is full
      # (end_index == capacity) feeds padding at that index: its length is capped at the
      # key count (its output is discarded; kernels need lengths <= keys).
      lengths = (jnp.minimum(start + 1, k.shape[2]) if cache is not None and q.shape[1] == 1
                 else None)
      out = fused_attention(q, k, v, mask, c.num_kv_heads, implementation=impl,
                            causal=cache is None, kv_layout=kv_layout, kv_lengths=lengths)
    out = dense(out, self.o_proj, "btnh,nhe->bte", dt)
    return out, new_cache


class MLP(nnx.Module):
  """SwiGLU feed-forward (arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.dtype = c.compute_dtype
    pd = c.weight_dtype
    self.gate_proj = param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), pd, std=c.init_std)
    self.up_proj = param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), pd, std=c.init_std)
    self.down_proj = param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), pd,
                           std=c.init_std / math.sqrt(2 * c.num_layers))

  def __call__(self, x: Array) -> Array:
    """x [b, t, embed] -> [b, t, embed]."""
    dt = self.dtype
    gate_up = getattr(self, "gate_up", None)   # decode_layout.pack_for_decode's fused kernel
    if gate_up is not None:
      gate, up = jnp.split(dense(x, gate_up, "bte,em->btm", dt), 2, axis=-1)
    else:
      gate = dense(x, self.gate_proj, "bte,em->btm", dt)
      up = dense(x, self.up_proj, "bte,em->btm", dt)
    hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
    return dense(hidden, self.down_proj, "btm,me->bte", dt)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    pd = config.weight_dtype
    self.input_norm = RMSNorm(config.embed_dim, config.norm_eps, param_dtype=pd)
    self.attn = Attention(config, rngs=rngs)
    self.post_attn_norm = RMSNorm(config.embed_dim, config.norm_eps, param_dtype=pd)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, mask, cache=None):
    """x [b, t, e] -> (x [b, t, e], this layer's updated (keys, values) or None); see Attention."""
    attn_out, new_cache = self.attn(self.input_norm(x), positions, mask, cache)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return constrain(x, ("act_batch", "act_length", "act_embed")), new_cache
