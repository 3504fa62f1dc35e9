"""4-bit NormalFloat (NF4) weight quantization, as in QLoRA (Dettmers et al., arXiv 2305.14314).

A weight is flattened in row-major order, zero-padded to a whole number of blocks of
`block_size` values, and each block is stored as 4-bit indices into the 16 NF4 code values
(two per byte) plus the block's absolute maximum (the "quantization constant", section 3):

  w ~= NF4_CODES[code] * absmax[block]

NF4 (section 3, "4-bit NormalFloat Quantization") places the 16 values at quantiles of
N(0, 1) rescaled to [-1, 1], with an exact zero; we use the published table verbatim
(bitsandbytes `create_normal_map`), so codes are interchangeable with bitsandbytes'.

Double quantization (section 3, "Double Quantization") stores the float32 absmax constants
themselves in 8 bits: they are centred by their mean (they are all positive) and quantized
in groups of 256 with one float32 scale per group. The paper uses FP8 for the 8-bit constants;
we use symmetric int8, which costs the same 8 + 32/256 bits per block: at block size 64 the
constants cost 0.127 bits per weight instead of 0.5.

Row-major flattening keeps the weight's leading axis outermost, so the block axis of the
stored arrays carries the weight's leading logical axis: when a shard boundary falls on a
block boundary, sharding the blocks is sharding that axis (see `NF4Weight`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

# QLoRA appendix E / bitsandbytes `create_normal_map(offset=0.9677)`, in code order.
NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# Decision boundaries between neighbouring codes: a normalised value maps to the nearest code.
_MIDPOINTS = ((NF4_CODES[1:] + NF4_CODES[:-1]) / 2).astype(np.float32)

# Blocks of absmax constants that share one float32 scale under double quantization (paper).
SCALE_GROUP = 256


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_codes", "absmax_scales", "absmax_offset"],
    meta_fields=["shape", "dtype", "block_size"])
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
  """A weight in NF4: packed codes plus per-block absmax, plain or double-quantized.

  codes          uint8 [num_blocks, block_size // 2]; element 2i in the high nibble.
  absmax         float32 [num_blocks], or None when double-quantized, in which case
  absmax_codes   int8 [num_blocks]     absmax ~= absmax_codes * absmax_scales[group] + offset
  absmax_scales  float32 [ceil(num_blocks / 256)]
  absmax_offset  float32 []            the mean of the absmax constants
  shape, dtype   the original weight's shape and dtype name (restored by dequantization)
  """

  codes: Array
  absmax: Array | None
  absmax_codes: Array | None
  absmax_scales: Array | None
  absmax_offset: Array | None
  shape: tuple[int, ...]
  dtype: str
  block_size: int

  @property
  def double_quant(self) -> bool:
    """Whether the absmax constants are double-quantized (int8 codes + per-group scales)."""
    return self.absmax is None

  @property
  def num_blocks(self) -> int:
    """Number of `block_size` blocks of the flattened, zero-padded weight."""
    return self.codes.shape[0]


def _check_block_size(block_size: int) -> None:
  if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
    raise ValueError(f"NF4 block_size must be a positive even int (two codes per byte), "
                     f"got {block_size!r}")


def nf4_encode(normalized: Array) -> Array:
  """Index of the nearest NF4 code for values in [-1, 1] (uint8)."""
  return jnp.searchsorted(jnp.asarray(_MIDPOINTS), normalized, side="left").astype(jnp.uint8)


def pack_codes(codes: Array) -> Array:
  """uint8 codes [..., 2k] in 0..15 -> bytes [..., k], the even element in the high nibble."""
  pairs = codes.astype(jnp.uint8).reshape(codes.shape[:-1] + (-1, 2))
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_codes(packed: Array) -> Array:
  """Inverse of `pack_codes`."""
  high, low = packed >> 4, packed & 0x0F
  return jnp.stack([high, low], axis=-1).reshape(packed.shape[:-1] + (-1,))


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant"))
def _quantize(w: Array, block_size: int, double_quant: bool) -> tuple[Array, ...]:
  flat = w.reshape(-1).astype(jnp.float32)
  flat = jnp.pad(flat, (0, (-flat.size) % block_size))  # zeros quantize exactly (code 7)
  blocks = flat.reshape(-1, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)  # an all-zero block stays all zero
  codes = pack_codes(nf4_encode(blocks / safe[:, None]))
  if not double_quant:
    return codes, absmax
  # Centre (absmax > 0 everywhere) and quantize symmetrically per group of 256 constants.
  num_blocks = absmax.shape[0]
  offset = jnp.mean(absmax)
  centred = jnp.pad(absmax - offset, (0, (-num_blocks) % SCALE_GROUP)).reshape(-1, SCALE_GROUP)
  group_max = jnp.max(jnp.abs(centred), axis=1)
  scales = jnp.where(group_max > 0, group_max / 127.0, 1.0)
  absmax_codes = jnp.clip(jnp.round(centred / scales[:, None]), -127, 127).astype(jnp.int8)
  return codes, absmax_codes.reshape(-1)[:num_blocks], scales, offset


def quantize_nf4(w: Array, block_size: int = 64, *, double_quant: bool = True) -> NF4Tensor:
  """Blockwise NF4 quantization of `w` (any shape; padded to a whole number of blocks)."""
  _check_block_size(block_size)
  if w.size == 0:
    raise ValueError(f"cannot NF4-quantize an empty array of shape {w.shape}")
  out = _quantize(jnp.asarray(w), block_size, double_quant)
  meta = dict(shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name, block_size=block_size)
  if double_quant:
    codes, absmax_codes, scales, offset = out
    return NF4Tensor(codes, None, absmax_codes, scales, offset, **meta)
  codes, absmax = out
  return NF4Tensor(codes, absmax, None, None, None, **meta)


def nf4_absmax(q: NF4Tensor) -> Array:
  """The per-block absmax constants in float32 (decoded when double-quantized)."""
  if not q.double_quant:
    return q.absmax
  n = q.num_blocks
  codes = jnp.pad(q.absmax_codes.astype(jnp.float32), (0, (-n) % SCALE_GROUP))
  decoded = codes.reshape(-1, SCALE_GROUP) * q.absmax_scales[:, None] + q.absmax_offset
  return decoded.reshape(-1)[:n]


def dequantize_nf4(q: NF4Tensor, dtype: Any | None = None) -> Array:
  """The weight back in its original shape, in `dtype` (default: the original dtype)."""
  values = jnp.asarray(NF4_CODES)[unpack_codes(q.codes)] * nf4_absmax(q)[:, None]
  size = int(np.prod(q.shape))
  return values.reshape(-1)[:size].reshape(q.shape).astype(dtype or q.dtype)


def nf4_nbytes(q: NF4Tensor) -> int:
  """Storage of the quantized weight, codes and constants included."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(q))


# ----------------------------------------------------------------------------------------
# NNX holder
# ----------------------------------------------------------------------------------------


class QuantizedBase(nnx.Variable):
  """Frozen quantized storage. Deliberately not an `nnx.Param`: no filter that selects
  trainable parameters (`nnx.Param`, `nnx.LoRAParam`) ever picks it up."""


_ARRAY_FIELDS = ("codes", "absmax", "absmax_codes", "absmax_scales", "absmax_offset")


class NF4Weight(nnx.Module):
  """A frozen NF4 weight usable wherever `layers.dense` takes a weight.

  It is dequantized on the fly to the compute dtype at every call (QLoRA section 3: storage
  in NF4, computation in BF16), so only the 4-bit form is resident between calls.
  """

  def __init__(self, tensor: NF4Tensor, logical_axes: tuple[str | None, ...] | None = None):
    self.shape = tensor.shape
    self.dtype = tensor.dtype
    self.block_size = tensor.block_size
    self.logical_axes = None if logical_axes is None else tuple(logical_axes)
    lead = None if not logical_axes else logical_axes[0]
    axes = {"codes": (lead, None), "absmax": (lead,), "absmax_codes": (lead,),
            "absmax_scales": (None,), "absmax_offset": ()}
    for name in _ARRAY_FIELDS:
      value = getattr(tensor, name)
      if value is not None:
        setattr(self, name, QuantizedBase(value, logical_axes=axes[name]))

  @classmethod
  def from_param(cls, weight: nnx.Variable, block_size: int = 64, *,
                 double_quant: bool = True) -> NF4Weight:
    """Quantizes a Param's value to NF4, keeping its logical axes."""
    return cls(quantize_nf4(weight[...], block_size, double_quant=double_quant),
               weight.get_metadata().get("logical_axes"))

  def tensor(self) -> NF4Tensor:
    """The stored arrays and metadata as an `NF4Tensor`."""
    fields = {name: (getattr(self, name)[...] if hasattr(self, name) else None)
              for name in _ARRAY_FIELDS}
    return NF4Tensor(**fields, shape=self.shape, dtype=self.dtype, block_size=self.block_size)

  def dequantize(self, dtype: Any | None = None) -> Array:
    """The weight in its original shape, in `dtype` (default: the original dtype)."""
    return dequantize_nf4(self.tensor(), dtype)

  def to_param(self) -> nnx.Param:
    """The dequantized weight as a plain Param in the original dtype and logical axes."""
    metadata = {} if self.logical_axes is None else {"logical_axes": self.logical_axes}
    return nnx.Param(self.dequantize(), **metadata)

  def __call__(self, x: Array, equation: str, dtype: Any) -> Array:
    """`einsum(equation, x, W)`, with W dequantized to `dtype` for this call only."""
    return jnp.einsum(equation, x, self.dequantize(dtype))
