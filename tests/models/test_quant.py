"""NF4 quantization against an independent NumPy reference of QLoRA (arXiv 2305.14314)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.models import quant

# Typed in from the paper's appendix rather than imported, so a typo in either shows up.
PAPER_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def reference_nf4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes [blocks, block_size], absmax [blocks], dequantized w): nearest code after
  dividing each block of the flattened, zero-padded weight by its absolute maximum."""
  flat = np.asarray(w, np.float32).reshape(-1)
  flat = np.concatenate([flat, np.zeros((-flat.size) % block_size, np.float32)])
  blocks = flat.reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  normalized = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
  codes = np.argmin(np.abs(normalized[..., None] - PAPER_NF4), axis=-1)
  deq = (PAPER_NF4[codes] * absmax[:, None]).reshape(-1)[:w.size].reshape(w.shape)
  return codes, absmax, deq


def _weight(shape, seed=0, scale=0.02):
  return np.asarray(scale * np.random.RandomState(seed).standard_normal(shape), np.float32)


def test_code_table_is_the_papers():
  np.testing.assert_array_equal(quant.NF4_CODES, PAPER_NF4)


@pytest.mark.parametrize("shape,block_size", [((64, 96), 64), ((5, 7, 3), 64), ((96,), 32)])
def test_matches_reference_exactly(shape, block_size):
  w = _weight(shape)
  w.reshape(-1)[:block_size] *= 40  # one block with a very different scale
  codes, absmax, deq = reference_nf4(w, block_size)
  q = quant.quantize_nf4(w, block_size, double_quant=False)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (codes.shape[0], block_size // 2)
  np.testing.assert_array_equal(quant.unpack_codes(q.codes), codes)
  np.testing.assert_array_equal(q.absmax, absmax)
  out = quant.dequantize_nf4(q)
  assert out.shape == w.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, deq)
  # Sanity on the error itself: at most half the widest gap between codes, times absmax.
  max_gap = np.max(np.diff(PAPER_NF4)) / 2
  assert np.abs(np.asarray(out) - w).max() <= max_gap * absmax.max() + 1e-7


def test_nf4_beats_uniform_int4_on_normal_weights():
  """The point of NF4 (paper section 3): for normally distributed weights its error is lower
  than a uniform 4-bit grid with the same blockwise absmax scaling."""
  w = _weight((256, 256), seed=3, scale=1.0)
  nf4 = np.asarray(quant.dequantize_nf4(quant.quantize_nf4(w, 64)))
  blocks = w.reshape(-1, 64)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  int4 = (np.round(blocks / absmax * 7) / 7 * absmax).reshape(w.shape)
  rel = lambda approx: np.sqrt(np.mean((approx - w) ** 2) / np.mean(w ** 2))
  assert rel(nf4) < 0.095 and rel(nf4) < 0.9 * rel(int4)


def test_packing_round_trip_and_nibble_order():
  codes = jnp.asarray(np.random.RandomState(0).randint(0, 16, (3, 64)), jnp.uint8)
  packed = quant.pack_codes(codes)
  assert packed.shape == (3, 32) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(quant.unpack_codes(packed), codes)
  assert int(quant.pack_codes(jnp.asarray([1, 2], jnp.uint8))[0]) == 0x12


def test_padding_and_zero_blocks():
  w = np.zeros((3, 50), np.float32)  # 150 values: 3 blocks of 64, last one padded
  w[0, :5] = [0.1, -0.2, 0.0, 0.3, -0.05]
  q = quant.quantize_nf4(w, 64)
  assert q.num_blocks == 3
  out = np.asarray(quant.dequantize_nf4(q))
  assert np.isfinite(out).all() and out.shape == w.shape
  np.testing.assert_array_equal(out[1:], 0.0)  # all-zero blocks come back exactly zero
  np.testing.assert_allclose(out[0, :5], w[0, :5], atol=0.3 * 0.07)


@pytest.mark.parametrize("block_size", [0, 3, 63, -2])
def test_bad_block_size(block_size):
  with pytest.raises(ValueError, match="block_size"):
    quant.quantize_nf4(np.ones((4, 64), np.float32), block_size)


def test_double_quantization():
  w = _weight((300, 256), seed=1)  # 1200 blocks: 5 groups of 256 constants, the last partial
  plain = quant.quantize_nf4(w, 64, double_quant=False)
  dq = quant.quantize_nf4(w, 64, double_quant=True)
  assert dq.double_quant and dq.absmax_codes.dtype == jnp.int8
  assert dq.absmax_scales.shape == (5,)
  np.testing.assert_array_equal(dq.codes, plain.codes)  # only the constants change
  decoded = np.asarray(quant.nf4_absmax(dq))
  # Symmetric int8 rounding: error at most half a step of the group's scale.
  step = np.repeat(np.asarray(dq.absmax_scales), 256)[:decoded.size]
  assert np.all(np.abs(decoded - np.asarray(plain.absmax)) <= 0.5 * step + 1e-9)
  err_plain = np.abs(np.asarray(quant.dequantize_nf4(plain)) - w).mean()
  err_dq = np.abs(np.asarray(quant.dequantize_nf4(dq)) - w).mean()
  assert err_dq < 1.01 * err_plain
  # 4 bits per weight + 8 bits per block + 32 bits per 256 blocks (+ the offset).
  bits = 8 * quant.nf4_nbytes(dq) / w.size
  assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) * 5 / (1200 / 256) + 32 / w.size)
  assert 8 * quant.nf4_nbytes(plain) / w.size == pytest.approx(4.5)


def test_dtype_restored_and_jit():
  w = jnp.asarray(_weight((64, 64)), jnp.bfloat16)
  q = quant.quantize_nf4(w)
  assert quant.dequantize_nf4(q).dtype == jnp.bfloat16
  assert quant.dequantize_nf4(q, jnp.float32).dtype == jnp.float32
  jitted = jax.jit(quant.dequantize_nf4, static_argnums=1)(q, jnp.float32)
  # Double-quantized constants decode with a multiply-add that XLA may fuse: 1 ulp.
  np.testing.assert_allclose(jitted, quant.dequantize_nf4(q, jnp.float32), rtol=1e-6)


def test_nf4_weight_module():
  w = nnx.Param(jnp.asarray(_weight((64, 4, 24))), logical_axes=("embed", "q_heads", "head_dim"))
  module = quant.NF4Weight.from_param(w, 64)
  assert not jax.tree.leaves(nnx.state(module, nnx.Param))  # never a trainable parameter
  state = nnx.state(module, quant.QuantizedBase)
  assert state["codes"].get_metadata()["logical_axes"] == ("embed", None)
  x = jnp.asarray(_weight((2, 3, 64), seed=2, scale=1.0))
  expected = jnp.einsum("bte,enh->btnh", x, module.dequantize(jnp.float32))
  np.testing.assert_array_equal(module(x, "bte,enh->btnh", jnp.float32), expected)
  param = module.to_param()
  assert param.get_metadata()["logical_axes"] == ("embed", "q_heads", "head_dim")
  np.testing.assert_array_equal(param[...], module.dequantize())
