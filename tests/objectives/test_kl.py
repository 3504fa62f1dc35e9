"""KL estimators against Schulman (2020) "Approximating KL Divergence", written in NumPy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.objectives.kl import KL_ESTIMATORS, kl_per_token


def _reference(logp: float, ref: float, estimator: str) -> float:
  # The blog post's notation: r = q(x)/p(x) = ref/pi for x ~ pi.
  r = math.exp(ref - logp)
  if estimator == "k1":
    return -math.log(r)
  if estimator == "k2":
    return 0.5 * math.log(r) ** 2
  return (r - 1.0) - math.log(r)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_formula(estimator: str) -> None:
  rng = np.random.default_rng(0)
  logp = -np.abs(rng.normal(size=(4, 7))).astype(np.float32) * 2
  ref = (logp + rng.normal(size=(4, 7)) * 0.7).astype(np.float32)
  got = np.asarray(kl_per_token(jnp.asarray(logp), jnp.asarray(ref), estimator))
  assert got.shape == (4, 7) and got.dtype == np.float32
  want = np.array([[_reference(float(logp[i, j]), float(ref[i, j]), estimator)
                    for j in range(7)] for i in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_default_is_k3_and_nonnegative() -> None:
  rng = np.random.default_rng(1)
  logp = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
  ref = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
  np.testing.assert_array_equal(kl_per_token(logp, ref), kl_per_token(logp, ref, "k3"))
  assert float(jnp.min(kl_per_token(logp, ref))) >= 0.0
  assert float(jnp.max(jnp.abs(kl_per_token(logp, logp)))) == 0.0


def test_k1_and_k3_are_unbiased() -> None:
  # Monte Carlo over a small categorical: E_pi[k1] = E_pi[k3] = KL(pi || ref).
  p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
  q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
  exact = float(np.sum(p * np.log(p / q)))
  x = np.random.default_rng(2).choice(5, size=200_000, p=p)
  logp, logq = jnp.log(jnp.asarray(p[x], jnp.float32)), jnp.log(jnp.asarray(q[x], jnp.float32))
  for estimator in ("k1", "k3"):
    assert abs(float(jnp.mean(kl_per_token(logp, logq, estimator))) - exact) < 5e-3


def test_registry_and_unknown_name() -> None:
  assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
  with pytest.raises(ValueError, match=r"'k4'.*k1.*k2.*k3"):
    kl_per_token(jnp.zeros(3), jnp.zeros(3), "k4")


def test_jit() -> None:
  f = jax.jit(kl_per_token, static_argnums=2)
  a, b = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -0.5])
  np.testing.assert_allclose(f(a, b, "k2"), kl_per_token(a, b, "k2"), rtol=1e-6)
