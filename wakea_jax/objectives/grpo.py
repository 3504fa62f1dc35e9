"""Clipped policy-gradient loss for GRPO and its variants (DAPO, Dr. GRPO, GSPO).

One pure function, `policy_loss`, configured by a frozen `LossConfig`:

  per token      l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
                       (+ kl_beta * KL_t(pi || ref))
                 PPO arXiv 1707.06347 eq. 7; GRPO arXiv 2402.03300 eq. 3 (with eq. 4 KL);
                 asymmetric eps_low/eps_high is DAPO's clip-higher, arXiv 2503.14476 eq. 10.
  ratio          "token":    r_t = pi(y_t) / pi_old(y_t)
                 "sequence": GSPO arXiv 2507.18071 eq. 7, s_i = exp(mean_t log(pi / pi_old))
                             over the sequence's valid tokens, in the GSPO-token form (eq. 13)
                             s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)], which equals s_i in value
                             and whose gradient under "seq_mean_token_mean" equals that of the
                             sequence-level objective, while still allowing per-token A_t.
  aggregation    "seq_mean_token_mean"  GRPO eq. 3: (1/G) sum_i (1/|y_i|) sum_t l_it
                 "token_mean"           DAPO eq. 8: sum_i sum_t l_it / sum_i |y_i|
                 "seq_sum_constant"     Dr. GRPO arXiv 2503.20783 eq. 2 (as implemented
                                        there): (1/G) sum_i sum_t l_it / loss_constant

Every aggregation is returned as (loss_sum, sums["weight"]): the train step divides the loss
and gradient sums of all accumulated micro-batches by the total weight once, which gives the
exact large-batch value. Rows with no valid token contribute to neither.

`clipped_surrogate` (the per-token term) and `aggregate` are public so that LUFFY's mixed
loss (objectives/offpolicy.py) shares them and equals this loss exactly without off-policy rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import Array

from wakea_jax.objectives.kl import check_kl_estimator, kl_per_token

LOSS_AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "seq_sum_constant")
RATIO_MODES: tuple[str, ...] = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static configuration of `policy_loss` (hashable, safe to close over under jit)."""

  ratio: str = "token"
  eps_low: float = 0.2
  eps_high: float = 0.2  # DAPO clip-higher uses 0.28.
  aggregation: str = "seq_mean_token_mean"
  loss_constant: float = 0.0  # Dr. GRPO: usually the maximum generation length.
  kl_beta: float = 0.0
  kl_estimator: str = "k3"

  def __post_init__(self) -> None:
    if self.ratio not in RATIO_MODES:
      raise ValueError(f"ratio: unknown ratio mode {self.ratio!r}; valid: {list(RATIO_MODES)}")
    for name in ("eps_low", "eps_high", "loss_constant", "kl_beta"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
      if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")
    if self.eps_low > 1:
      raise ValueError(f"eps_low: must be in [0, 1] (the lower clip bound is 1 - eps_low), "
                       f"got {self.eps_low!r}")
    if self.aggregation not in LOSS_AGGREGATIONS:
      raise ValueError(f"aggregation: unknown aggregation {self.aggregation!r}; "
                       f"valid: {list(LOSS_AGGREGATIONS)}")
    if self.aggregation == "seq_sum_constant" and not self.loss_constant > 0:
      raise ValueError(f"loss_constant: must be > 0 for aggregation 'seq_sum_constant' "
                       f"(usually the maximum generation length), got {self.loss_constant!r}")
    check_kl_estimator(self.kl_estimator, field="kl_estimator")


def _check_shapes(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                  ref_logprobs: Array | None) -> None:
  if logprobs.ndim != 2:
    raise ValueError(f"logprobs: expected shape [batch, seq], got {logprobs.shape}")
  named = {"old_logprobs": old_logprobs, "mask": mask}
  if ref_logprobs is not None:
    named["ref_logprobs"] = ref_logprobs
  for name, x in named.items():
    if x.shape != logprobs.shape:
      raise ValueError(f"{name}: expected shape {logprobs.shape} like logprobs, got {x.shape}")
  if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
    raise ValueError(f"advantages: expected shape {logprobs.shape[:1]} or {logprobs.shape}, "
                     f"got {advantages.shape}")


def checked_inputs(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                   config: LossConfig, ref_logprobs: Array | None
                   ) -> tuple[Array, Array, Array, Array, Array]:
  """Validated float32 inputs -> (valid, maskf, logprobs, old_logprobs, advantages [b, t]).

  Zeroes the inputs at invalid positions so garbage there (e.g. -inf) cannot reach exp()
  and turn `x * 0` into NaN, in the value or the gradient.
  """
  if config.kl_beta > 0 and ref_logprobs is None:
    raise ValueError("ref_logprobs: required when config.kl_beta > 0")
  advantages = jnp.asarray(advantages)
  _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs)
  valid = mask > 0
  maskf = valid.astype(jnp.float32)
  logprobs = jnp.where(valid, logprobs.astype(jnp.float32), 0.0)
  old_logprobs = jnp.where(valid, old_logprobs.astype(jnp.float32), 0.0)
  advantages = advantages.astype(jnp.float32)
  if advantages.ndim == 1:
    advantages = advantages[:, None]
  advantages = jnp.where(valid, advantages, 0.0)
  return valid, maskf, logprobs, old_logprobs, advantages


def clipped_surrogate(logprobs: Array, old_logprobs: Array, advantages: Array, maskf: Array,
                      config: LossConfig) -> tuple[Array, Array, Array]:
  """Per-token clipped surrogate loss (before masking, without the KL term).

  Inputs are float32 [b, t] already zeroed where `maskf` is 0 (advantages broadcast to
  [b, t]); `maskf` also selects the tokens a GSPO sequence ratio averages over, so a loss
  that mixes in other tokens (objectives/offpolicy.py) passes only the clipped ones.
  Returns (token_loss, ratio, clip_active), each [b, t].
  """
  safe_len = jnp.maximum(jnp.sum(maskf, axis=1), 1.0)  # [b]
  log_ratio = logprobs - old_logprobs
  if config.ratio == "token":
    ratio = jnp.exp(log_ratio)
  else:
    # GSPO-token, arXiv 2507.18071 eq. 13-14: value s_i, gradient s_i * grad log pi(y_t).
    seq_log_ratio = jnp.sum(log_ratio * maskf, axis=1) / safe_len  # [b]
    seq_ratio = jax.lax.stop_gradient(jnp.exp(seq_log_ratio))[:, None]
    ratio = seq_ratio * jnp.exp(logprobs - jax.lax.stop_gradient(logprobs))

  clipped_ratio = jnp.clip(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high)
  unclipped_obj = ratio * advantages
  clipped_obj = clipped_ratio * advantages
  # min(r A, clip(r) A): the clipped term is selected exactly when it is strictly smaller;
  # it is then constant in theta (clip saturated), so the token's gradient is zero.
  clip_active = clipped_obj < unclipped_obj
  token_loss = -jnp.where(clip_active, clipped_obj, unclipped_obj)
  return token_loss, ratio, clip_active


def aggregate(token_loss: Array, maskf: Array, config: LossConfig) -> tuple[Array, Array]:
  """(loss_sum, weight) of per-token losses [b, t] under `config.aggregation`.

  `maskf` [b, t] is every token the loss counts; a row's length (seq_mean_token_mean) and
  whether it counts at all are taken from it.
  """
  token_loss = token_loss * maskf
  tokens_per_seq = jnp.sum(maskf, axis=1)  # [b]
  has_tokens = (tokens_per_seq > 0).astype(jnp.float32)
  if config.aggregation == "token_mean":
    return jnp.sum(token_loss), jnp.sum(maskf)
  if config.aggregation == "seq_mean_token_mean":
    safe_len = jnp.maximum(tokens_per_seq, 1.0)
    return jnp.sum(jnp.sum(token_loss, axis=1) / safe_len), jnp.sum(has_tokens)
  # seq_sum_constant
  return jnp.sum(token_loss) / config.loss_constant, jnp.sum(has_tokens)


def policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array,
                config: LossConfig, ref_logprobs: Array | None = None
                ) -> tuple[Array, dict[str, Array]]:
  """Clipped surrogate loss sum and metric sums.

  logprobs      [b, t] log pi_theta of the sampled tokens (differentiated)
  old_logprobs  [b, t] log pi_old, the behaviour policy that sampled them
  advantages    [b] (one per sequence) or [b, t] (per token)
  mask          [b, t] 1 on generated tokens; 0 on prompt, padding and tool-output tokens
  ref_logprobs  [b, t] log pi_ref, required when config.kl_beta > 0

  Returns (loss_sum, sums), all float32 scalars. sums: "weight" (the denominator for this
  aggregation), "tokens" (valid tokens), "clipped" (valid tokens where the clipped term was
  selected and differs), "approx_kl" (sum of k3 KL(pi || pi_old)), "ratio" (sum of ratios),
  and "ref_kl" (sum of the KL(pi || ref) estimate) when kl_beta > 0. Divide by the weight
  (or "tokens" for the token metrics) summed over the whole accumulated batch.
  """
  valid, maskf, logprobs, old_logprobs, advantages = checked_inputs(
      logprobs, old_logprobs, advantages, mask, config, ref_logprobs)
  token_loss, ratio, clip_active = clipped_surrogate(logprobs, old_logprobs, advantages,
                                                     maskf, config)

  sums: dict[str, Array] = {}
  if config.kl_beta > 0:
    ref_logprobs = jnp.where(valid, ref_logprobs.astype(jnp.float32), 0.0)
    ref_kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator)
    token_loss = token_loss + config.kl_beta * ref_kl
    sums["ref_kl"] = jnp.sum(jax.lax.stop_gradient(ref_kl) * maskf)

  loss_sum, weight = aggregate(token_loss, maskf, config)

  sg = jax.lax.stop_gradient
  approx_kl = kl_per_token(sg(logprobs), old_logprobs, "k3")
  sums.update({
      "weight": weight,
      "tokens": jnp.sum(maskf),
      "clipped": jnp.sum(sg(clip_active).astype(jnp.float32) * maskf),
      "approx_kl": jnp.sum(approx_kl * maskf),
      "ratio": jnp.sum(sg(ratio) * maskf),
  })
  return loss_sum, sums
