"""`layers.lowp_matmul`: the 16-bit matmul with a written-out backward pass (float32
accumulation, 16-bit dots in the backward, float32 gradients for float32 master weights),
against a NumPy float64 transcription of y = x w, dx = g w^T, dw = x^T g."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.models import layers, transformer
from wakea_jax.models.config import get_preset


def _bf16(a: np.ndarray) -> np.ndarray:
  """float64 values of a rounded to bfloat16 (what the 16-bit dots see)."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


CASES = [  # x shape, w shape, w_transposed
    ((16, 24), (24, 40), False),
    ((2, 12, 24), (24, 40), False),       # leading dims fold into rows; 24 rows: blocks of 8
    ((2, 5, 24), (24, 40), False),        # 10 rows: not a multiple of 8 (the plain transpose)
    ((16, 24), (40, 24), True),           # a vocabulary-major head (tied embedding)
    ((2, 3, 16, 8), (2, 3, 24, 8), True),   # attention scores: q k^T per batch and head
    ((2, 3, 16, 24), (2, 3, 24, 8), False),  # attention output: p v
]


@pytest.mark.parametrize("x_shape, w_shape, w_transposed", CASES)
@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
def test_lowp_matmul_matches_numpy(x_shape, w_shape, w_transposed, w_dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=w_shape), w_dtype)
  y, vjp = jax.vjp(lambda x, w: layers.lowp_matmul(x, w, jnp.float32, w_transposed), x, w)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  dx, dw = vjp(g)
  assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == w_dtype

  xn, wn, gn = _bf16(x), _bf16(w), _bf16(g)     # the backward casts g to x's dtype
  if w_transposed:
    wn = np.swapaxes(wn, -1, -2)
  if wn.ndim == 2:
    want_y = xn @ wn
    want_dx = gn @ wn.T
    rows = xn.reshape(-1, xn.shape[-1]).T @ gn.reshape(-1, gn.shape[-1])
    want_dw = rows.T if w_transposed else rows
  else:
    want_y = xn @ wn
    want_dx = gn @ np.swapaxes(wn, -1, -2)
    per_batch = np.swapaxes(xn, -1, -2) @ gn
    want_dw = np.swapaxes(per_batch, -1, -2) if w_transposed else per_batch
  # float32 accumulation of exact bfloat16 products: float32 rounding only.
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-4)
  # dx is returned in bfloat16: one bfloat16 rounding (relative 2^-8).
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=8e-3, atol=2e-2)
  # dw keeps float32 for a float32 master weight; a bfloat16 one is rounded once.
  tol = dict(rtol=1e-5, atol=1e-4) if w_dtype == jnp.float32 else dict(rtol=8e-3, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, **tol)


def test_lowp_matmul_backward_dots_are_16_bit_with_float32_accumulation():
  """Plain autodiff of a bfloat16 dot with a float32 output differentiates with float32
  cotangents (dots XLA:CPU runs in float32 after converting both operands); every dot of
  lowp_matmul's gradient takes bfloat16 operands and accumulates in float32."""
  x = jnp.ones((16, 24), jnp.bfloat16)
  w = jnp.ones((24, 40), jnp.float32)

  def loss(x, w):
    return jnp.sum(layers.lowp_matmul(x, w, jnp.float32) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
  dots = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append(eqn)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  assert len(dots) == 3, [str(d) for d in dots]   # forward, dx, dw
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], str(eqn)
    assert eqn.params["preferred_element_type"] == jnp.float32, str(eqn)


def test_bfloat16_model_gradients_follow_float32():
  """A bfloat16-compute model (float32 master weights) through lowp_matmul: its loss
  gradient is float32 and close to the float32 model's (cosine > 0.99 per tensor)."""
  cfg32 = get_preset("tiny")
  m32 = transformer.create_model(cfg32, seed=1)
  m16 = transformer.create_model(cfg32.replace(dtype="bfloat16"), seed=1)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg32.vocab_size, (2, 24)), jnp.int32)

  def grads(model):
    def loss(m):
      logits = m.forward(ids[:, :-1]).logits
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    return jax.tree.leaves(nnx.grad(loss)(model))

  g32, g16 = grads(m32), grads(m16)
  assert len(g32) == len(g16) > 5
  for a, b in zip(g32, g16):
    assert b.dtype == jnp.float32
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
    assert cos > 0.99, cos


def test_remat_dots_policy_keeps_the_16_bit_products():
  """remat_policy="dots" saves matmul outputs; the 16-bit products are custom VJPs the dot
  policies cannot see, so they are saved by name. Compiled, a bfloat16 model's gradient
  then runs as many dots as the float32 model's (recomputing them, as "full" does, adds
  one per product)."""
  import re
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)

  def dots(dtype, policy):
    graphdef, state = nnx.split(transformer.create_model(
        get_preset("tiny", dtype=dtype, remat_policy=policy), seed=1))

    def loss(state):
      logits = nnx.merge(graphdef, state).forward(ids[:, :-1]).logits
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    return len(re.findall(r"= \S+ dot\(", hlo))

  assert dots("bfloat16", "dots") == dots("float32", "dots") < dots("bfloat16", "full")


def test_transposed_copies_on_cpu_only(monkeypatch):
  """The transposes feeding 16-bit products are block-reshaped copies on CPU (XLA:CPU would
  fold a plain one into the product and run it in float32) and plain transposes elsewhere,
  where the matmul takes a transposed operand itself. The same values either way."""
  x = jnp.arange(2 * 16 * 24, dtype=jnp.float32).reshape(2, 16, 24).astype(jnp.bfloat16)
  want = np.swapaxes(np.asarray(x, np.float32), -1, -2)

  def primitives(fn, arg):
    return [e.primitive.name for e in jax.make_jaxpr(lambda a: fn(a))(arg).jaxpr.eqns]

  np.testing.assert_array_equal(np.asarray(layers._transpose_rows(x), np.float32), want)
  assert "reshape" in primitives(layers._transpose_rows, x)
  q = x.reshape(2, 16, 4, 6)
  np.testing.assert_array_equal(np.asarray(layers._head_major(q), np.float32),
                                np.asarray(q, np.float32).transpose(0, 2, 1, 3))
  monkeypatch.setattr(layers, "accelerator_platform", lambda: "cuda")
  np.testing.assert_array_equal(np.asarray(layers._transpose_rows(x), np.float32), want)
  assert primitives(layers._transpose_rows, x) == ["transpose"]
  assert primitives(layers._head_major, q) == ["transpose"]
