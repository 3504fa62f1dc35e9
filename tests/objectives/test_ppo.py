"""PPO pieces (GAE, reward shaping, whitening, value loss) against plain Python loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.objectives.ppo import PPOConfig, gae, kl_penalized_rewards, value_loss, whiten

B, T = 5, 9


def _mask() -> np.ndarray:
  m = np.zeros((B, T), np.float32)
  m[0, :] = 1                    # full row
  m[1, 3:7] = 1                  # prompt, completion, padding
  # row 2: no valid tokens
  m[3, 2:4] = 1; m[3, 6:8] = 1   # tool output (a hole) in the middle of the completion
  m[4, 1:2] = 1; m[4, 4:5] = 1; m[4, 8:] = 1  # several holes
  return m


def _arrays(seed: int):
  rng = np.random.default_rng(seed)
  mask = _mask()
  a, b, c = (rng.normal(size=(B, T)).astype(np.float32) for _ in range(3))
  for x in (a, b, c):
    x[mask == 0] = 1e3  # garbage where masked
  return a, b, c, mask


def _gae_loop(rewards, values, mask, gamma, lam):
  adv = np.zeros((B, T)); ret = np.zeros((B, T))
  for i in range(B):
    next_value = next_adv = 0.0
    for t in reversed(range(T)):
      if mask[i, t] == 0:
        continue  # tool output / prompt / padding: skipped, not an episode boundary
      delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
      adv[i, t] = delta + gamma * lam * next_adv
      ret[i, t] = adv[i, t] + float(values[i, t])
      next_value, next_adv = float(values[i, t]), adv[i, t]
  return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_loop(gamma, lam) -> None:
  rewards, values, _, mask = _arrays(0)
  adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                 gamma=gamma, lam=lam)
  assert adv.shape == ret.shape == (B, T) and adv.dtype == ret.dtype == jnp.float32
  want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_hole_is_transparent() -> None:
  # A row with tool output in the middle equals the same row with the hole cut out.
  rewards, values, _, mask = _arrays(1)
  adv, _ = gae(jnp.asarray(rewards[3:4]), jnp.asarray(values[3:4]), jnp.asarray(mask[3:4]))
  keep = mask[3] > 0
  compact, _ = gae(jnp.asarray(rewards[3:4, keep]), jnp.asarray(values[3:4, keep]),
                   jnp.ones((1, int(keep.sum()))))
  np.testing.assert_allclose(adv[0, keep], compact[0], rtol=1e-6)
  np.testing.assert_array_equal(adv[0, ~keep], 0.0)


def test_gae_single_step_and_jit() -> None:
  adv, ret = gae(jnp.array([[2.0]]), jnp.array([[0.5]]), jnp.array([[1.0]]))
  np.testing.assert_allclose(adv, [[1.5]]); np.testing.assert_allclose(ret, [[2.0]])
  rewards, values, _, mask = (jnp.asarray(x) for x in _arrays(2))
  f = jax.jit(lambda r, v, m: gae(r, v, m, gamma=0.97, lam=0.9))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               f(rewards, values, mask), gae(rewards, values, mask, gamma=0.97, lam=0.9))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalized_rewards_match_loop(estimator) -> None:
  logprobs, ref, _, mask = _arrays(3)
  scores = np.random.default_rng(4).normal(size=(B,)).astype(np.float32)
  beta = 0.07
  got = kl_penalized_rewards(jnp.asarray(scores), jnp.asarray(logprobs), jnp.asarray(ref),
                             jnp.asarray(mask), beta=beta, estimator=estimator)
  want = np.zeros((B, T))
  for i in range(B):
    valid = [t for t in range(T) if mask[i, t] > 0]
    for t in valid:
      q = math.exp(float(ref[i, t]) - float(logprobs[i, t]))
      kl = {"k1": -math.log(q), "k2": 0.5 * math.log(q) ** 2, "k3": q - 1 - math.log(q)}
      want[i, t] = -beta * kl[estimator]
    if valid:
      want[i, valid[-1]] += float(scores[i])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[2], 0.0)


def test_kl_penalized_rewards_default_is_k1() -> None:
  logprobs, ref, _, mask = (jnp.asarray(x) for x in _arrays(5))
  scores = jnp.arange(B, dtype=jnp.float32)
  np.testing.assert_array_equal(
      kl_penalized_rewards(scores, logprobs, ref, mask, beta=0.1),
      kl_penalized_rewards(scores, logprobs, ref, mask, beta=0.1, estimator="k1"))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean) -> None:
  x, _, _, mask = _arrays(6)
  got = whiten(jnp.asarray(x * 3 + 2), jnp.asarray(mask), shift_mean=shift_mean)
  vals = [float(x[i, t]) * 3 + 2 for i in range(B) for t in range(T) if mask[i, t] > 0]
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / len(vals)
  want = np.zeros((B, T))
  for i in range(B):
    for t in range(T):
      if mask[i, t] > 0:
        want[i, t] = (float(x[i, t]) * 3 + 2 - mean) / math.sqrt(var + 1e-8)
        if not shift_mean:
          want[i, t] += mean
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if shift_mean:
    valid = np.asarray(got)[mask > 0]
    assert abs(valid.mean()) < 1e-5 and abs(valid.std() - 1) < 1e-4
  assert np.all(np.isfinite(np.asarray(whiten(jnp.ones((2, 3)), jnp.zeros((2, 3))))))


@pytest.mark.parametrize("clip", [0.2, 0.0, -1.0])
def test_value_loss_matches_loop(clip) -> None:
  values, old_values, returns, mask = _arrays(7)
  old_values = np.where(mask > 0, values + np.random.default_rng(8).normal(
      size=(B, T)).astype(np.float32) * 0.3, old_values)
  loss_sum, sums = value_loss(jnp.asarray(values), jnp.asarray(old_values),
                              jnp.asarray(returns), jnp.asarray(mask), clip=clip)
  want_loss = want_clipped = want_error = weight = 0.0
  for i in range(B):
    for t in range(T):
      if mask[i, t] == 0:
        continue
      v, vo, r = float(values[i, t]), float(old_values[i, t]), float(returns[i, t])
      plain = (v - r) ** 2
      if clip > 0:
        v_clip = vo + min(max(v - vo, -clip), clip)
        clipped = (v_clip - r) ** 2
        want_loss += 0.5 * max(plain, clipped)
        want_clipped += clipped > plain
      else:
        want_loss += 0.5 * plain
      want_error += plain
      weight += 1
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(sums["weight"]), weight)
  np.testing.assert_allclose(float(sums["value_clipped"]), want_clipped)
  np.testing.assert_allclose(float(sums["value_error"]), want_error, rtol=1e-5)
  if clip > 0:
    assert 0 < want_clipped < weight  # the data exercises both branches


def test_value_loss_gradient_is_zero_where_clipped() -> None:
  values = jnp.array([[1.0, 1.0]]); old = jnp.array([[0.0, 0.0]]); ret = jnp.array([[3.0, -3.0]])
  # Token 0: v moved 1 toward R=3 beyond clip; clipped error (0.2-3)^2 > (1-3)^2 -> no grad.
  grad = jax.grad(lambda v: value_loss(v, old, ret, jnp.ones((1, 2)), clip=0.2)[0])(values)
  np.testing.assert_allclose(grad, [[0.0, 4.0]])


def test_ppo_config() -> None:
  cfg = PPOConfig()
  assert (cfg.gamma, cfg.lam, cfg.vf_coef, cfg.value_clip, cfg.kl_beta, cfg.kl_estimator,
          cfg.whiten_advantages) == (1.0, 0.95, 0.1, 0.2, 0.05, "k1", True)
  PPOConfig(value_clip=0.0, kl_beta=0.0, gamma=0.0, lam=1.0)


@pytest.mark.parametrize("kwargs, field", [
    ({"gamma": 1.5}, "gamma"),
    ({"lam": -0.1}, "lam"),
    ({"vf_coef": -1.0}, "vf_coef"),
    ({"value_clip": float("inf")}, "value_clip"),
    ({"kl_beta": -0.01}, "kl_beta"),
    ({"kl_estimator": "k7"}, "kl_estimator"),
    ({"whiten_advantages": "yes"}, "whiten_advantages"),
])
def test_invalid_ppo_config(kwargs, field) -> None:
  with pytest.raises(ValueError, match=field):
    PPOConfig(**kwargs)
