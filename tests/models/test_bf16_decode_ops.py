"""The 16-bit decode path's XLA:CPU workarounds compute what the plain ops compute:
`layers._write` (a bfloat16 KV cache written by a select for one token per row, by the
cache's uint16 bits for more, never by a bfloat16 scatter), `layers.take_rows` (the
embedding gathered as bits; its gradient is the plain gather's) and `OutMajor` weights in
bfloat16 (a float32-accumulating product, as `lowp_matmul`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.models import decode_layout, layers


def _reference_write(cache, new, start):
  """NumPy: row r's tokens at slots start[r]..start[r]+t-1, clamped into the cache as
  `lax.dynamic_update_slice` clamps (the scatter path); `drop_past_end` for the select."""
  out = np.array(cache, np.float32)
  new = np.asarray(new, np.float32).transpose(0, 2, 1, 3)            # [b, k, t, h]
  for r, s in enumerate(np.asarray(start)):
    s = min(max(int(s), 0), out.shape[2] - new.shape[2])
    out[r, :, s:s + new.shape[2]] = new[r]
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("t", [1, 3])
def test_write_puts_each_rows_tokens_at_its_offset(dtype, t):
  rng = np.random.RandomState(0)
  b, k, s, h = 3, 2, 8, 4
  cache = jnp.asarray(rng.randn(b, k, s, h), dtype)
  new = jnp.asarray(rng.randn(b, t, k, h), dtype)
  start = jnp.asarray([0, 5 if t == 1 else 4, 2], jnp.int32)
  got = jax.jit(layers._write)(cache, new, start)
  assert got.dtype == dtype and got.shape == cache.shape
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                _reference_write(np.asarray(cache, np.float32),
                                                 np.asarray(new, np.float32), start))


def test_a_16_bit_single_token_past_the_end_writes_nothing():
  """A finished row of a full cache is fed at end_index == capacity: the select writes no
  slot (the float32 scatter clamps onto the last one; the row's output is discarded)."""
  cache = jnp.arange(2 * 1 * 4 * 2, dtype=jnp.bfloat16).reshape(2, 1, 4, 2)
  new = jnp.full((2, 1, 1, 2), -1.0, jnp.bfloat16)
  got = np.asarray(layers._write(cache, new, jnp.asarray([4, 1], jnp.int32)), np.float32)
  np.testing.assert_array_equal(got[0], np.asarray(cache[0], np.float32))
  np.testing.assert_array_equal(got[1, 0, 1], [-1.0, -1.0])


def _primitives(jaxpr, out=None):
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      _primitives(sub, out)
  return out


@pytest.mark.parametrize("t", [1, 5])
def test_a_bfloat16_cache_is_never_scattered_as_bfloat16(t):
  cache = jnp.zeros((2, 2, 8, 4), jnp.bfloat16)
  new = jnp.ones((2, t, 2, 4), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(layers._write)(cache, new, jnp.zeros((2,), jnp.int32)).jaxpr
  float_scatters = [e for e in _primitives(jaxpr)
                    if e.primitive.name in ("scatter", "dynamic_update_slice")
                    and e.invars[0].aval.dtype == jnp.bfloat16]
  assert not float_scatters


def test_take_rows_gathers_16_bit_tables_and_differentiates_as_take():
  rng = np.random.RandomState(1)
  ids = jnp.asarray([[3, 0, 3], [7, 1, 2]], jnp.int32)
  for dtype in (jnp.float32, jnp.bfloat16):
    table = jnp.asarray(rng.randn(8, 5), dtype)
    np.testing.assert_array_equal(np.asarray(layers.take_rows(table, ids), np.float32),
                                  np.asarray(table, np.float32)[np.asarray(ids)])
    cot = jnp.asarray(rng.randn(2, 3, 5), dtype)
    grad = jax.vjp(lambda t: layers.take_rows(t, ids), table)[1](cot)[0]
    want = jax.vjp(lambda t: jnp.take(t, ids, axis=0), table)[1](cot)[0]
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(want, np.float32))
  jaxpr = jax.make_jaxpr(layers.take_rows)(jnp.zeros((8, 5), jnp.bfloat16), ids).jaxpr
  gathers = [e for e in _primitives(jaxpr) if e.primitive.name == "gather"]
  assert gathers and all(e.invars[0].aval.dtype == jnp.uint16 for e in gathers)


def test_bfloat16_out_major_weight_accumulates_in_float32():
  rng = np.random.RandomState(2)
  stored = jnp.asarray(rng.randn(16, 3, 4), jnp.bfloat16)               # q_proj-like [e, n, h]
  x = jnp.asarray(rng.randn(2, 1, 16), jnp.bfloat16)
  weight = decode_layout.OutMajor(stored, contracted=1)
  got = weight(x, "bte,enh->btnh", jnp.bfloat16)
  want = np.einsum("bte,enh->btnh", np.asarray(x, np.float32), np.asarray(stored, np.float32))
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 1, 3, 4)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)
  dots = [e for e in _primitives(jax.make_jaxpr(lambda x: weight(x, "", jnp.bfloat16))(x).jaxpr)
          if e.primitive.name == "dot_general"]
  assert dots and all(e.params["preferred_element_type"] == jnp.float32 for e in dots)


def test_off_cpu_the_cache_and_the_table_use_the_plain_scatter_and_gather(monkeypatch):
  """GPU and TPU scatter and gather 16 bits in place: there a select would read and write
  the whole cache every step, so the workarounds are CPU-only."""
  monkeypatch.setattr(layers, "accelerator_platform", lambda: "cuda")
  cache = jnp.zeros((2, 2, 8, 4), jnp.bfloat16)
  # Fresh lambdas: make_jaxpr caches traces by function, and the platform is read in them.
  jaxpr = jax.make_jaxpr(lambda *a: layers._write(*a))(
      cache, jnp.ones((2, 1, 2, 4), jnp.bfloat16), jnp.zeros((2,), jnp.int32)).jaxpr
  eqns = _primitives(jaxpr)
  assert not [e for e in eqns if e.primitive.name == "bitcast_convert_type"]
  assert [e for e in eqns if e.primitive.name == "scatter"
          and e.invars[0].aval.dtype == jnp.bfloat16]
  jaxpr = jax.make_jaxpr(lambda *a: layers.take_rows(*a))(
      jnp.zeros((8, 5), jnp.bfloat16), jnp.zeros((3,), jnp.int32)).jaxpr
  gathers = [e for e in _primitives(jaxpr) if e.primitive.name == "gather"]
  assert gathers and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in gathers)
