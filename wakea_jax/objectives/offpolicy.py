"""LUFFY's mixed-policy loss: GRPO on on-policy tokens, shaped importance weights off-policy.

LUFFY, "Learning to Reason under Off-Policy Guidance", arXiv 2504.14945 §3. Off-policy
traces from a stronger model pi_phi replace some members of a GRPO group; the advantages
are computed over the mixed group by the usual estimators (rl/advantages.py: the paper's
A_i = (R_i - mean(G_on u G_off)) / std(G_on u G_off)), so this loss receives them as input.

  on-policy token    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)
                     r_t = pi_theta / pi_old, exactly objectives/grpo.py (every ratio mode)
  off-policy token   l_t = -f(rhat_t) A,   rhat_t = pi_theta(y_t) / pi_phi(y_t),
                     f(x) = x / (x + gamma)
                     §3.1 (Mixed-Policy GRPO: importance sampling of the off-policy traces
                     against pi_phi) with §3.2's policy shaping by regularised importance
                     sampling (the J^SHAPING objective, gamma = 0.1 in the paper). No clipping
                     of off-policy tokens: f is bounded by 1 already, and the paper drops it.
  both               + kl_beta * KL_t(pi || ref), as grpo.py
  aggregation        grpo.py's, over all valid tokens of both kinds (the paper's 1/Z over the
                     tokens of both sets is "token_mean").

(Equation numbers differ between the paper's arXiv versions, hence the section names.)

Behaviour log-probs: the paper sets pi_phi = 1 (§3.2: the traces' token probabilities are
often unavailable, or under another tokenizer), so the off-policy weight is f(pi_theta).
Here an off-policy token's `old_logprobs` entry is log pi_phi: pass the trace model's
log-probs where a trace has them and 0 (log 1) where it does not; both can sit in one batch.
(The authors' code, when it has target probabilities, uses the raw unshaped ratio instead;
we follow the paper's formula, f of the ratio, so gamma means the same thing for both.)

Why the shaping: d f(pi) / d theta = gamma / (pi + gamma)^2 * grad pi
= [gamma pi / (pi + gamma)^2] * grad log pi. The weight vanishes for tokens the policy already
predicts (pi >> gamma) and for pi -> 0, and peaks at pi = gamma: low-probability tokens of
the trace get a larger share of the gradient than under plain imitation (grad log pi with
weight pi for the unshaped ratio), which §3.2 argues keeps the policy from collapsing onto
the trace's surface form. We compute f(x) = sigmoid(log x - log gamma), identical in value,
with no overflow for large ratios.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import Array

from wakea_jax.objectives import grpo as grpo_lib
from wakea_jax.objectives.kl import kl_per_token


@dataclasses.dataclass(frozen=True)
class OffPolicyLossConfig:
  """Static configuration of the off-policy half of `mixed_policy_loss` (hashable)."""

  gamma: float = 0.1  # LUFFY §3.2's choice; smaller gamma, sharper reweighting

  def __post_init__(self) -> None:
    value = self.gamma
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"gamma: must be a finite number, got {value!r}")
    if value <= 0:
      raise ValueError(f"gamma: must be > 0 (at gamma = 0, f(x) = x / (x + gamma) is the "
                       f"constant 1 and gives no gradient), got {value!r}")


def shaped_weight(log_ratio: Array, gamma: float) -> Array:
  """f(x) = x / (x + gamma) of x = exp(log_ratio), as sigmoid(log_ratio - log gamma)."""
  return jax.nn.sigmoid(log_ratio - math.log(gamma))


def _off_policy_tokens(off_policy: Array, valid: Array) -> Array:
  off_policy = jnp.asarray(off_policy)
  if off_policy.shape == valid.shape[:1]:
    off_policy = off_policy[:, None]
  elif off_policy.shape != valid.shape:
    raise ValueError(f"off_policy: expected shape {valid.shape[:1]} (rows) or {valid.shape} "
                     f"(tokens), got {off_policy.shape}")
  return (off_policy > 0) & valid


def mixed_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                      off_policy: Array, config: grpo_lib.LossConfig,
                      offpolicy: OffPolicyLossConfig,
                      ref_logprobs: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """LUFFY loss sum and metric sums.

  logprobs      [b, t] log pi_theta of the tokens (differentiated)
  old_logprobs  [b, t] on on-policy tokens log pi_old (the sampling params); on off-policy
                tokens log pi_phi of the trace model, 0 where unknown (pi_phi = 1)
  advantages    [b] or [b, t], over the mixed groups
  mask          [b, t] 1 on tokens the loss counts (generated, or trace, tokens)
  off_policy    [b] (whole rows are traces) or [b, t] (token mask, e.g. a trace prefix)
  config        grpo.py's LossConfig: clipping and ratio mode of the on-policy tokens, and
                the aggregation and KL term of all
  ref_logprobs  [b, t], required when config.kl_beta > 0

  Returns (loss_sum, sums) like grpo.policy_loss, with the same "weight" and "tokens" (all
  valid tokens); "clipped", "approx_kl" and "ratio" sum over on-policy tokens only, and
  "off_tokens" (off-policy valid tokens), "off_weight" (sum of f(rhat)) and "off_ratio" (sum
  of rhat, each capped at e^60) over off-policy tokens. Without off-policy tokens the loss,
  its gradient and the shared sums equal grpo.policy_loss's exactly (the off_* sums are 0).
  """
  valid, maskf, logprobs, old_logprobs, advantages = grpo_lib.checked_inputs(
      logprobs, old_logprobs, advantages, mask, config, ref_logprobs)
  off = _off_policy_tokens(off_policy, valid)
  on = valid & ~off
  on_f, off_f = on.astype(jnp.float32), off.astype(jnp.float32)

  # Each branch sees neutral inputs at the other's tokens, so that neither can overflow there
  # and leak NaN through jnp.where's gradient (a tiny pi_phi would give exp(huge) on-policy).
  on_loss, ratio, clip_active = grpo_lib.clipped_surrogate(
      logprobs, jnp.where(off, logprobs, old_logprobs), jnp.where(off, 0.0, advantages), on_f,
      config)
  off_log_ratio = jnp.where(off, logprobs - old_logprobs, 0.0)
  off_weight = shaped_weight(off_log_ratio, offpolicy.gamma)
  token_loss = jnp.where(off, -off_weight * advantages, on_loss)

  sums: dict[str, Array] = {}
  if config.kl_beta > 0:
    ref_logprobs = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
    ref_kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator)
    token_loss = token_loss + config.kl_beta * ref_kl
    sums["ref_kl"] = jnp.sum(jax.lax.stop_gradient(ref_kl) * maskf)

  loss_sum, weight = grpo_lib.aggregate(token_loss, maskf, config)

  sg = jax.lax.stop_gradient
  approx_kl = kl_per_token(sg(logprobs), old_logprobs, "k3")
  sums.update({
      "weight": weight,
      "tokens": jnp.sum(maskf),
      "clipped": jnp.sum(sg(clip_active).astype(jnp.float32) * on_f),
      "approx_kl": jnp.sum(approx_kl * on_f),
      "ratio": jnp.sum(sg(ratio) * on_f),
      "off_tokens": jnp.sum(off_f),
      "off_weight": jnp.sum(sg(off_weight) * off_f),
      # Capped at e^60 so that a trace token the behaviour model found nearly impossible
      # cannot turn the metric into inf (the loss only ever sees f(rhat) <= 1).
      "off_ratio": jnp.sum(jnp.exp(jnp.minimum(sg(off_log_ratio), 60.0)) * off_f),
  })
  return loss_sum, sums
