"""PPO with a learned value function for token-level RLHF: GAE, reward shaping, value loss.

The policy term of PPO is `grpo.policy_loss` with per-token advantages (`[b, t]`) and
aggregation "token_mean"; this module supplies what is specific to actor-critic PPO.

Masks are 1 on tokens the policy generated and 0 on prompt, padding and tool-output tokens.
Tool output can sit in the middle of a completion, so masked positions are made transparent
to the time recursion rather than treated as the end of the episode.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from jax import Array

from wakea_jax.objectives.kl import check_kl_estimator, kl_per_token


def gae(token_rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
  """Generalised advantage estimation, arXiv 1506.02438 eq. 16, over valid tokens only.

  token_rewards, values, mask: [b, t]. Returns (advantages, returns), both [b, t] float32.

  For a valid token t with next valid token t' in its row (none after the last one, where
  the episode ends and V = A = 0):
    delta_t = r_t + gamma * V_t' - V_t,   A_t = delta_t + gamma * lam * A_t',   R_t = A_t + V_t.
  Masked tokens get A = R = 0 and leave the recursion unchanged; their rewards are ignored.
  """
  chex.assert_rank(mask, 2)
  chex.assert_equal_shape([token_rewards, values, mask])
  valid = mask > 0
  rewards = jnp.where(valid, token_rewards.astype(jnp.float32), 0.0)
  values = jnp.where(valid, values.astype(jnp.float32), 0.0)

  def step(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]):
    next_value, next_adv = carry  # [b] each: of the next valid token, 0 past the end.
    r, v, ok = xs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    new_carry = (jnp.where(ok, v, next_value), jnp.where(ok, adv, next_adv))
    return new_carry, jnp.where(ok, adv, 0.0)

  b = values.shape[0]
  zero = jnp.zeros((b,), jnp.float32)
  # Scan over time (leading axis) from the last position to the first.
  _, adv_t = jax.lax.scan(step, (zero, zero), (rewards.T, values.T, valid.T), reverse=True)
  advantages = adv_t.T
  returns = jnp.where(valid, advantages + values, 0.0)
  return advantages, returns


def kl_penalized_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array, *,
                         beta: float, estimator: str = "k1") -> Array:
  """Per-token rewards: -beta * KL_t(pi || ref) everywhere, plus the score at the last token.

  Reward shaping of Ziegler et al. arXiv 1909.08593 eq. 2 / InstructGPT arXiv 2203.02155
  eq. 2. scores [b]; logprobs, ref_logprobs, mask [b, t] -> token_rewards [b, t] float32
  (0 on masked tokens; all 0 in a row without valid tokens).
  """
  chex.assert_rank([scores, mask], [1, 2])
  chex.assert_equal_shape([logprobs, ref_logprobs, mask])
  valid = mask > 0
  logprobs = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
  ref_logprobs = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
  rewards = jnp.where(valid, -beta * kl_per_token(logprobs, ref_logprobs, estimator), 0.0)
  positions = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(valid, positions, -1), axis=1)  # [b], -1 when the row is empty.
  at_last = positions[None, :] == last[:, None]
  return rewards + jnp.where(at_last, scores.astype(jnp.float32)[:, None], 0.0)


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """(x - mean) / sqrt(var + eps) over the valid entries of x; masked entries become 0.

  Mean and (population, ddof=0) variance are taken over every valid entry of the whole
  array. With shift_mean=False the mean is added back, so only the scale changes (as in
  TRL's masked_whiten, used for rewards). No valid entries -> all zeros.
  """
  valid = mask > 0
  maskf = valid.astype(jnp.float32)
  x = jnp.where(valid, x.astype(jnp.float32), 0.0)
  count = jnp.maximum(jnp.sum(maskf), 1.0)
  mean = jnp.sum(x) / count
  var = jnp.sum(jnp.square(x - mean) * maskf) / count
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(valid, out, 0.0)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *,
               clip: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """Clipped value loss sum, as in PPO2 / InstructGPT; all inputs [b, t].

  Per valid token 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2); c <= 0
  disables clipping (0.5 * (v - R)^2). Returns (loss_sum, sums) with sums "weight" (valid
  tokens), "value_clipped" (tokens where the clipped term was strictly larger) and
  "value_error" (sum of (v - R)^2).
  """
  chex.assert_equal_shape([values, old_values, returns, mask])
  valid = mask > 0
  maskf = valid.astype(jnp.float32)
  values = jnp.where(valid, values.astype(jnp.float32), 0.0)
  old_values = jnp.where(valid, old_values.astype(jnp.float32), 0.0)
  returns = jnp.where(valid, returns.astype(jnp.float32), 0.0)
  error = jnp.square(values - returns)
  if clip > 0:
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    clipped_error = jnp.square(clipped_values - returns)
    clip_active = clipped_error > error
    per_token = 0.5 * jnp.where(clip_active, clipped_error, error)
    value_clipped = jnp.sum(jax.lax.stop_gradient(clip_active).astype(jnp.float32) * maskf)
  else:
    per_token = 0.5 * error
    value_clipped = jnp.zeros((), jnp.float32)
  loss_sum = jnp.sum(per_token * maskf)
  return loss_sum, {
      "weight": jnp.sum(maskf),
      "value_clipped": value_clipped,
      "value_error": jnp.sum(jax.lax.stop_gradient(error) * maskf),
  }


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Static PPO hyperparameters (the policy clip lives in grpo.LossConfig)."""

  gamma: float = 1.0
  lam: float = 0.95
  vf_coef: float = 0.1
  value_clip: float = 0.2  # <= 0 disables value clipping.
  kl_beta: float = 0.05
  kl_estimator: str = "k1"
  whiten_advantages: bool = True
  # Whether the value loss trains the shared trunk. False: the value head reads
  # stop-gradient hidden states, so an untrained critic cannot disturb the policy (with a
  # small model and a zero-initialised head this is what keeps PPO from degrading it).
  value_trunk_gradient: bool = False

  def __post_init__(self) -> None:
    for name in ("gamma", "lam", "vf_coef", "value_clip", "kl_beta"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    for name in ("gamma", "lam"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)!r}")
    for name in ("vf_coef", "kl_beta"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
    check_kl_estimator(self.kl_estimator, field="kl_estimator")
    for name in ("whiten_advantages", "value_trunk_gradient"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
