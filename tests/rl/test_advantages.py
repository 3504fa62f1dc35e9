"""Group advantage estimators against loop transcriptions of their papers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.rl.advantages import ADVANTAGE_ESTIMATORS, group_advantages, zero_variance_groups


def _rewards(num_groups: int = 5, group_size: int = 4, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(num_groups, group_size)).astype(np.float32)
  r[1] = 1.0  # a zero-variance group
  r[2] = rng.integers(0, 2, size=group_size)  # binary correctness rewards
  return r


def _grpo_loop(r: np.ndarray, eps: float) -> np.ndarray:
  out = np.zeros_like(r, dtype=np.float64)
  for g in range(r.shape[0]):
    vals = [float(v) for v in r[g]]
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))  # unbiased, as TRL
    for i, v in enumerate(vals):
      out[g, i] = (v - mean) / (std + eps)
  return out


def _dr_grpo_loop(r: np.ndarray) -> np.ndarray:
  out = np.zeros_like(r, dtype=np.float64)
  for g in range(r.shape[0]):
    mean = sum(float(v) for v in r[g]) / r.shape[1]
    for i in range(r.shape[1]):
      out[g, i] = float(r[g, i]) - mean
  return out


def _rloo_loop(r: np.ndarray) -> np.ndarray:
  out = np.zeros_like(r, dtype=np.float64)
  n = r.shape[1]
  for g in range(r.shape[0]):
    for i in range(n):
      others = [float(r[g, j]) for j in range(n) if j != i]
      out[g, i] = float(r[g, i]) - sum(others) / len(others)
  return out


@pytest.mark.parametrize("group_size", [2, 4, 7])
def test_estimators_match_loops(group_size: int) -> None:
  r = _rewards(group_size=group_size)
  rj = jnp.asarray(r)
  np.testing.assert_allclose(group_advantages(rj, "grpo", eps=1e-4), _grpo_loop(r, 1e-4),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(group_advantages(rj), _grpo_loop(r, 1e-6), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(group_advantages(rj, "dr_grpo"), _dr_grpo_loop(r), atol=1e-5)
  np.testing.assert_allclose(group_advantages(rj, "rloo"), _rloo_loop(r), atol=1e-5)


def test_rloo_closed_form() -> None:
  r = _rewards(group_size=5)
  g = r.shape[1]
  np.testing.assert_allclose(group_advantages(jnp.asarray(r), "rloo"),
                             g / (g - 1) * (r - r.mean(axis=1, keepdims=True)), atol=1e-5)


def test_zero_variance_group_has_zero_advantage() -> None:
  r = jnp.asarray(_rewards())
  for name in ADVANTAGE_ESTIMATORS:
    adv = group_advantages(r, name)
    assert bool(jnp.all(jnp.isfinite(adv)))
    np.testing.assert_array_equal(adv[1], 0.0)


def test_group_size_one_is_zero() -> None:
  r = jnp.asarray([[1.0], [3.0]])
  for name in ADVANTAGE_ESTIMATORS:
    np.testing.assert_array_equal(group_advantages(r, name), 0.0)


def test_zero_variance_groups() -> None:
  r = jnp.asarray([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5 + 1e-8, 0.5], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(zero_variance_groups(r), [True, False, True, True])
  np.testing.assert_array_equal(zero_variance_groups(r, atol=2.0), [True] * 4)


def test_jit_matches_eager() -> None:
  r = jnp.asarray(_rewards())
  for name in ADVANTAGE_ESTIMATORS:
    f = jax.jit(lambda x, name=name: group_advantages(x, name))
    np.testing.assert_allclose(f(r), group_advantages(r, name), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(jax.jit(zero_variance_groups)(r), zero_variance_groups(r))


def test_errors() -> None:
  with pytest.raises(ValueError, match=r"'ppo'.*dr_grpo.*grpo.*rloo"):
    group_advantages(jnp.zeros((2, 3)), "ppo")
  with pytest.raises(ValueError, match="rewards.*num_groups, group_size"):
    group_advantages(jnp.zeros((6,)))
  with pytest.raises(ValueError, match="rewards"):
    zero_variance_groups(jnp.zeros((2, 3, 1)))
