"""Group-relative advantage estimators for outcome rewards (one scalar reward per completion).

Rewards come as [num_groups, group_size]: each row holds the rewards of the `group_size`
completions sampled for one prompt. Every estimator returns one advantage per completion,
same shape, which the policy loss broadcasts over that completion's tokens.

Pure jnp, jittable (the estimator name and the shape are static).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array


def _check_rewards(rewards: Array) -> Array:
  if rewards.ndim != 2:
    raise ValueError(f"rewards: expected shape [num_groups, group_size], got {rewards.shape}")
  if rewards.shape[1] < 1:
    raise ValueError(f"rewards: group_size must be >= 1, got shape {rewards.shape}")
  return rewards.astype(jnp.float32)


def _grpo(rewards: Array, eps: float) -> Array:
  # DeepSeekMath arXiv 2402.03300 §4.1.2 (outcome supervision): A_i = (r_i - mean) / std.
  # The paper does not say which std; like TRL's GRPOTrainer (torch.std, Bessel-corrected)
  # we use the unbiased ddof=1 estimate. A group of one has no spread: its advantage is 0.
  g = rewards.shape[1]
  if g == 1:
    return jnp.zeros_like(rewards)
  centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (g - 1))
  return centred / (std + eps)


def _dr_grpo(rewards: Array, eps: float) -> Array:
  # Dr. GRPO arXiv 2503.20783 §3.2: drop the std normalisation (a difficulty bias).
  del eps
  return rewards - jnp.mean(rewards, axis=1, keepdims=True)


def _rloo(rewards: Array, eps: float) -> Array:
  # RLOO arXiv 2402.14740 §3: baseline = mean of the other G-1 rewards,
  # r_i - (sum - r_i)/(G-1) = G/(G-1) * (r_i - mean). A group of one has no baseline: 0.
  del eps
  g = rewards.shape[1]
  if g == 1:
    return jnp.zeros_like(rewards)
  return (g / (g - 1)) * (rewards - jnp.mean(rewards, axis=1, keepdims=True))


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Array, float], Array]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
}


def group_advantages(rewards: Array, estimator: str = "grpo", *, eps: float = 1e-6) -> Array:
  """Advantages [num_groups, group_size] float32 from rewards [num_groups, group_size]."""
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"estimator: unknown advantage estimator {estimator!r}; "
                     f"valid: {sorted(ADVANTAGE_ESTIMATORS)}")
  return ADVANTAGE_ESTIMATORS[estimator](_check_rewards(jnp.asarray(rewards)), eps)


def zero_variance_groups(rewards: Array, atol: float = 1e-6) -> Array:
  """bool [num_groups]: groups whose rewards are all equal (within atol).

  Such groups have zero advantage under every estimator above and give no gradient; DAPO's
  dynamic sampling (arXiv 2503.14476 §3.2, eq. 11) drops them and samples more prompts.
  """
  rewards = _check_rewards(jnp.asarray(rewards))
  return (jnp.max(rewards, axis=1) - jnp.min(rewards, axis=1)) <= atol


def low_spread_groups(rewards: Array, min_std: float) -> Array:
  """bool [num_groups]: groups whose reward standard deviation is below `min_std`.

  SRL's dynamic sampling (arXiv 2510.25992) keeps only groups whose reward std exceeds
  a threshold epsilon: with a continuous reward (a similarity), near-equal rewards carry
  mostly noise after std normalisation. The std is the population one (ddof=0, np.std).
  """
  rewards = _check_rewards(jnp.asarray(rewards))
  return jnp.std(rewards, axis=1) < min_std
