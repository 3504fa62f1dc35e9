"""Attention through `jax.nn.dot_product_attention`: XLA's reference kernel or cuDNN's fused
flash attention on NVIDIA GPUs, with exactly the semantics of `layers.dot_product_attention`.

Why a second path: the native kernel in layers.py is tuned for CPU and materialises the
[b, kv, g, t, s] scores; on a GPU cuDNN's fused kernel never writes them to memory and runs
the softmax in registers, which is what makes long-sequence bf16 training fast there.

Which kernel runs is `ModelConfig.attention` ("auto" | "native" | "xla" | "cudnn"), resolved
once per trace by `choose_implementation`. "native" stays in layers.py (this module must not
import layers.py, which imports it); this module runs "xla" and "cudnn".

Semantics, identical to the native kernel for every mask:
  * `mask` [b, t, s] (True = may attend) is the only truth about who sees whom: causality,
    packing (a key of another segment is never seen, because the mask says so) and padding.
  * A query row that sees no key at all (a padding query, segment 0) gives exactly 0, not NaN
    and not the uniform average `jax.nn.dot_product_attention` itself returns for such a row
    (its masked logits are all the same large negative number). The zeroing is a `where` on
    the output, so those rows also send exactly zero gradient back.
  * `causal=True` is the native kernel's promise (the mask includes the causal rule and
    t == s). Here it becomes the kernel's `is_causal`, which lets cuDNN skip the tiles above
    the diagonal; the mask is still applied, so the result is the mask's.

How cuDNN gets the mask:
  * `kv_lengths` given (a promise: mask[b, i, j] == j < kv_lengths[b], and j <= i when
    causal): no mask tensor at all, cuDNN's padding (and causal) mask types from the lengths.
    This is the decode step's shape (t == 1: a query sees cache slots 0..end_index).
  * otherwise the boolean mask goes in as an additive bias [b, 1, t, s] (jax converts it;
    0 where allowed, a large negative number where not) together with `is_causal`. That is
    exact for any mask (packing included) at the cost of reading b*t*s bias values; cuDNN's
    packed (THD, q_offsets) layout would avoid it but `jax.nn.dot_product_attention` does not
    expose it. In jax 0.10.2 cuDNN's backward pass also computes a [b, 1, t, s] bias gradient
    that nothing reads (jax's wrapper exports one for every bias; jax-ml/jax#39512 skips it
    for boolean masks in later releases): b*t*s*2 bytes per layer, transient, plus its
    reduction over heads. cuDNN requires even t and s for a bias in training; an odd length
    falls back to "xla".

Layouts: q [b, t, n, h]; k, v [b, s, kv, h] (`kv_layout="bskh"`, the layout of fresh
projections) or [b, kv, s, h] (`kv_layout="bksh"`, the head-major KV cache). The kernel takes
[b, s, kv, h] only. For "xla" the transpose costs nothing (XLA folds it into the einsums'
dimension numbers). For cuDNN it would be a copy of the whole cache of every layer at every
decode step, the very traffic the head-major cache exists to avoid, so "cudnn" with
`kv_layout="bksh"` runs the "xla" kernel: attention over a KV cache (prefill into it and
decode) is XLA's, training and scoring (no cache) are cuDNN's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import Array

from wakea_jax.models.config import ATTENTION_IMPLEMENTATIONS

KV_LAYOUTS = ("bskh", "bksh")

# cuDNN's fused attention computes in half precision only (jax raises NotImplementedError for
# float32 inputs), and its head dimension must be a multiple of 8, at most 128 before Hopper
# and at most 256 from Hopper (sm90) on (jax/_src/cudnn/fused_attention_stablehlo.py,
# check_is_flash_attention).
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_HEAD_DIM_MULTIPLE = 8
_CUDNN_MAX_HEAD_DIM = 256
# "auto" picks cuDNN only where every NVIDIA GPU of the last generations runs it: it cannot see
# the compute capability, so it stays within the pre-Hopper bound.
_AUTO_MAX_HEAD_DIM = 128


@functools.cache
def accelerator_platform() -> str:
  """"cuda", "rocm", "tpu" or "cpu": the default backend, with NVIDIA told apart from AMD.

  `jax.default_backend()` says "gpu" for both; only NVIDIA GPUs have cuDNN.
  """
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = jax.devices()[0].client.platform_version.lower()
  return "rocm" if "rocm" in version else "cuda"


def _cudnn_unsupported(dtype: Any, head_dim: int, max_head_dim: int) -> str | None:
  """Why cuDNN cannot run attention of this dtype and head size, or None if it can."""
  name = jnp.dtype(dtype).name
  if name not in _CUDNN_DTYPES:
    return (f"cuDNN fused attention computes in {' or '.join(_CUDNN_DTYPES)} only, "
            f"the model computes in {name} (set ModelConfig.dtype='bfloat16')")
  if head_dim % _CUDNN_HEAD_DIM_MULTIPLE or head_dim > max_head_dim:
    return (f"cuDNN fused attention needs a head_dim that is a multiple of "
            f"{_CUDNN_HEAD_DIM_MULTIPLE} and at most {max_head_dim}, got {head_dim}")
  return None


def choose_implementation(config_value: str, dtype: Any, head_dim: int,
                          platform: str | None = None) -> str:
  """The kernel to run, "native" | "xla" | "cudnn", for `ModelConfig.attention`.

  `platform` is `accelerator_platform()` by default; "gpu" (what `jax.default_backend()`
  says) counts as "cuda". The fallbacks, all decided here and nowhere else:
    "auto"   -> "cudnn" on an NVIDIA GPU when the dtype is bf16/fp16 and head_dim a multiple
                of 8 and <= 128; otherwise "native" (CPU, TPU, ROCm, float32, odd head sizes:
                the native kernel is the tested reference and the fastest on CPU).
    "native", "xla" -> themselves on every platform.
    "cudnn"  -> "cudnn", or a ValueError saying why it cannot run (not an NVIDIA GPU, wrong
                dtype, head_dim not a multiple of 8 or > 256): asking for cuDNN explicitly
                and silently getting another kernel would make a benchmark lie.
  """
  if config_value not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {config_value!r}")
  platform = platform or accelerator_platform()
  platform = "cuda" if platform == "gpu" else platform
  if config_value in ("native", "xla"):
    return config_value
  if config_value == "auto":
    if platform == "cuda" and _cudnn_unsupported(dtype, head_dim, _AUTO_MAX_HEAD_DIM) is None:
      return "cudnn"
    return "native"
  if platform != "cuda":
    raise ValueError(f"ModelConfig.attention='cudnn' needs an NVIDIA GPU (cuDNN), but this run "
                     f"is on {platform!r}; use 'auto' (cuDNN where it can run, the native "
                     f"kernel elsewhere), 'native' or 'xla'")
  reason = _cudnn_unsupported(dtype, head_dim, _CUDNN_MAX_HEAD_DIM)
  if reason:
    raise ValueError(f"ModelConfig.attention='cudnn': {reason}; use 'auto' to fall back to the "
                     f"native kernel")
  return "cudnn"


def fused_attention(q: Array, k: Array, v: Array, mask: Array | None, num_kv_heads: int, *,
                    implementation: str, causal: bool = False, kv_layout: str = "bskh",
                    kv_lengths: Array | None = None) -> Array:
  """Grouped-query softmax attention through `jax.nn.dot_product_attention`.

  q [b, t, n, h]; k, v [b, s, kv, h] or, with `kv_layout="bksh"`, [b, kv, s, h];
  mask [b, t, s] bool (True = may attend) -> [b, t, n, h] in q's dtype, the same numbers as
  `layers.dot_product_attention(q, k, v, mask, num_kv_heads, causal=causal)` (see the module
  docstring for the fully masked rows, `causal` and `kv_lengths`). `implementation` is "xla"
  or "cudnn" (resolve "auto" with `choose_implementation`; "native" lives in layers.py).
  With `kv_lengths` [b] int32 the mask is not read and may be None.
  """
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"fused_attention runs 'xla' or 'cudnn', got {implementation!r} ('native' "
                     f"is layers.dot_product_attention; resolve 'auto' with "
                     f"choose_implementation)")
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
  b, t, n, h = q.shape
  if implementation == "cudnn":
    if accelerator_platform() != "cuda":
      raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU, this run is on "
                       f"{accelerator_platform()!r}")
    reason = _cudnn_unsupported(q.dtype, h, _CUDNN_MAX_HEAD_DIM)
    if reason:
      raise ValueError(reason)
  if kv_layout == "bksh":
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if implementation == "cudnn":
      implementation = "xla"   # not a copy of the cache per step (see the module docstring)
  s, kv = k.shape[1], k.shape[2]
  if kv != num_kv_heads or n % kv:
    raise ValueError(f"keys have {kv} heads (layout {kv_layout}), expected num_kv_heads="
                     f"{num_kv_heads} dividing the {n} query heads")
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  is_causal = causal and t == s
  with jax.named_scope("fused_attention"):
    if kv_lengths is not None:
      kv_lengths = kv_lengths.astype(jnp.int32)
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=is_causal, key_value_seq_lengths=kv_lengths,
          implementation=implementation)
      # Every row sees key 0 unless the sequence is empty.
      sees_a_key = jnp.broadcast_to((kv_lengths > 0)[:, None], (b, t))
    else:
      if mask is None or mask.shape != (b, t, s):
        raise ValueError(f"mask must be [batch, query, key] = {(b, t, s)}, got "
                         f"{None if mask is None else mask.shape}")
      mask = mask.astype(bool)
      if implementation == "cudnn" and (t % 2 or s % 2):
        # cuDNN refuses a bias with odd lengths in training (check_is_flash_attention); the
        # XLA kernel computes the same numbers.
        implementation = "xla"
      out = jax.nn.dot_product_attention(
          q, k, v, mask=mask[:, None], is_causal=is_causal, implementation=implementation)
      sees_a_key = jnp.any(mask, axis=-1)
    return jnp.where(sees_a_key[:, :, None, None], out, jnp.zeros((), out.dtype))
