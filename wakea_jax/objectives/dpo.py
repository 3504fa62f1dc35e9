"""Preference objectives (DPO, IPO, SimPO, ORPO): pure losses over per-sequence log-probs.

Every loss takes, per preference pair, the policy's *summed* log-probability of the chosen
and rejected responses (log pi(y|x) = sum of token log-probs over the response tokens), the
same for the frozen reference model where the loss needs one, and the response lengths in
tokens. Like the SFT loss it returns a SUM over pairs plus metric sums whose denominator is
`sums["weight"]` (the number of pairs), so the train step (train/step.py) divides once and
gradient accumulation stays exact:

  weight          number of (unmasked) pairs
  nll_sum         the loss sum again, so the train loop's eval_loss is the preference loss
  correct         pairs whose implicit reward margin is > 0 (reward accuracy)
  margin          sum of chosen_reward - rejected_reward
  chosen_reward, rejected_reward   sums of the implicit rewards (definitions per loss below)

Losses (h is the margin the sigmoid / square acts on):
  dpo    arXiv 2305.18290 eq. 7: -log sigmoid(h), h = beta * ((pi_c - ref_c) - (pi_r - ref_r)),
         with conservative label smoothing eps (cDPO; TRL's `label_smoothing`):
         -(1 - eps) log sigmoid(h) - eps log sigmoid(-h). rewards: beta * (pi - ref).
  ipo    arXiv 2310.12036 eq. 17: (h - 1/(2 beta))^2 with h = (pi_c - ref_c) - (pi_r - ref_r).
         With `ipo_length_normalize` (default, as TRL does) every log-prob, policy and
         reference, is first divided by its response length, i.e. h uses mean per-token
         log-probs; the paper's eq. 17 is the summed form (ipo_length_normalize=False).
         rewards: beta * (pi - ref) on the same (normalised or summed) log-probs.
  simpo  arXiv 2405.14734 eq. 6: -log sigmoid(beta/|y_c| pi_c - beta/|y_r| pi_r - gamma),
         no reference; gamma = `simpo_gamma` is the paper's target reward margin (TRL's
         `simpo_gamma` too). Label smoothing applies as for DPO. The paper uses beta ~2-2.5,
         much larger than DPO's 0.1. rewards: beta * mean per-token log-prob.
  orpo   arXiv 2403.07691 eq. 6-7: NLL_c + lambda * -log sigmoid(log odds(y_c) - log odds(y_r)),
         odds(y) = P / (1 - P) with P = exp(mean per-token log-prob) (the paper's
         length-normalised likelihood), NLL_c = the chosen response's mean per-token NLL;
         no reference. rewards: lambda * mean per-token log-prob (TRL's), so the margin is
         > 0 exactly when the odds ratio is > 1.

`pair_logps` turns a model and stacked pair rows into the per-sequence sums (through
`models/scoring.py`, chunked over the sequence so the logits never exist whole), and
`dpo_loss_fn` is the `loss_fn(model, batch, rng)` for `train.step.make_train_step`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.scoring import sequence_logps

# Per pair: (loss [b], chosen_reward [b], rejected_reward [b]).
LossTerms = tuple[Array, Array, Array]


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """config.preference: the loss and its hyperparameters (module docstring)."""

  loss: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0   # cDPO eps in [0, 0.5): probability that a label is flipped
  simpo_gamma: float = 0.5       # SimPO target reward margin (arXiv 2405.14734 eq. 6)
  orpo_lambda: float = 0.1       # weight of the odds-ratio term (arXiv 2403.07691 eq. 6)
  ipo_length_normalize: bool = True

  def __post_init__(self) -> None:
    if self.loss not in PREFERENCE_LOSSES:
      raise ValueError(f"preference.loss={self.loss!r} is not one of {sorted(PREFERENCE_LOSSES)}")
    if not self.beta > 0:
      raise ValueError(f"preference.beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"preference.label_smoothing must be in [0, 0.5), got "
                       f"{self.label_smoothing}")
    if self.label_smoothing and self.loss not in ("dpo", "simpo"):
      raise ValueError(f"preference.label_smoothing applies to the sigmoid losses (dpo, simpo), "
                       f"not {self.loss!r}")
    if self.simpo_gamma < 0:
      raise ValueError(f"preference.simpo_gamma must be >= 0, got {self.simpo_gamma}")
    if self.orpo_lambda < 0:
      raise ValueError(f"preference.orpo_lambda must be >= 0, got {self.orpo_lambda}")

  @property
  def needs_reference(self) -> bool:
    """Whether the loss compares against a reference model's log-probs (dpo, ipo)."""
    return self.loss in NEEDS_REFERENCE


def _smoothed_sigmoid_loss(h: Array, eps: float) -> Array:
  """-(1 - eps) log sigmoid(h) - eps log sigmoid(-h) (cDPO; TRL's sigmoid loss)."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)


def _per_token(logps: Array, tokens: Array) -> Array:
  return logps / jnp.maximum(tokens, 1.0)


def _dpo(c: PreferenceConfig, pc, pr, rc, rr, nc, nr, nll) -> LossTerms:
  del nc, nr, nll
  chosen_reward = c.beta * (pc - rc)
  rejected_reward = c.beta * (pr - rr)
  loss = _smoothed_sigmoid_loss(chosen_reward - rejected_reward, c.label_smoothing)
  return loss, chosen_reward, rejected_reward


def _ipo(c: PreferenceConfig, pc, pr, rc, rr, nc, nr, nll) -> LossTerms:
  del nll
  if c.ipo_length_normalize:
    pc, rc = _per_token(pc, nc), _per_token(rc, nc)
    pr, rr = _per_token(pr, nr), _per_token(rr, nr)
  h = (pc - rc) - (pr - rr)
  loss = jnp.square(h - 1.0 / (2.0 * c.beta))
  return loss, c.beta * (pc - rc), c.beta * (pr - rr)


def _simpo(c: PreferenceConfig, pc, pr, rc, rr, nc, nr, nll) -> LossTerms:
  del rc, rr, nll
  chosen_reward = c.beta * _per_token(pc, nc)
  rejected_reward = c.beta * _per_token(pr, nr)
  loss = _smoothed_sigmoid_loss(chosen_reward - rejected_reward - c.simpo_gamma,
                                c.label_smoothing)
  return loss, chosen_reward, rejected_reward


def _log_odds(mean_logp: Array) -> Array:
  """log(P / (1 - P)) for P = exp(mean_logp) <= 1, stably: log P - log(1 - exp(log P)).

  A sequence with P == 1 has infinite odds; the mean log-prob is capped just below 0.
  """
  x = jnp.minimum(mean_logp, -1e-6)
  # log(1 - e^x): expm1 near 0, log1p far from it (Maechler, "log1mexp").
  log1mexp = jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
  return x - log1mexp


def _orpo(c: PreferenceConfig, pc, pr, rc, rr, nc, nr, nll) -> LossTerms:
  del rc, rr
  mean_c, mean_r = _per_token(pc, nc), _per_token(pr, nr)
  sft = -mean_c if nll is None else nll
  odds_term = -jax.nn.log_sigmoid(_log_odds(mean_c) - _log_odds(mean_r))
  loss = sft + c.orpo_lambda * odds_term
  return loss, c.orpo_lambda * mean_c, c.orpo_lambda * mean_r


PREFERENCE_LOSSES: dict[str, Callable[..., LossTerms]] = {
    "dpo": _dpo,
    "ipo": _ipo,
    "simpo": _simpo,
    "orpo": _orpo,
}
NEEDS_REFERENCE = frozenset({"dpo", "ipo"})


def preference_loss(chosen_logps: Array, rejected_logps: Array,
                    ref_chosen_logps: Array | None, ref_rejected_logps: Array | None, *,
                    config: PreferenceConfig, chosen_tokens: Array, rejected_tokens: Array,
                    chosen_nll: Array | None = None, pair_mask: Array | None = None
                    ) -> tuple[Array, dict[str, Array]]:
  """Sum over pairs of the configured preference loss, and metric sums (module docstring).

  All inputs are float32 [b]: log-probs are sums over the response tokens, `*_tokens` the
  response lengths. The reference log-probs may be None for losses without a reference
  (simpo, orpo). `chosen_nll` [b] replaces ORPO's SFT term (default: the chosen response's
  mean per-token NLL, -chosen_logps / chosen_tokens). `pair_mask` [b] (1 = real pair,
  0 = padding) defaults to all ones.
  """
  if config.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
    raise ValueError(f"preference loss {config.loss!r} needs reference log-probs "
                     "(ref_chosen_logps, ref_rejected_logps)")
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  pc, pr = f32(chosen_logps), f32(rejected_logps)
  chex.assert_rank(pc, 1)
  chex.assert_equal_shape([x for x in (pc, pr, f32(chosen_tokens), f32(rejected_tokens),
                                       f32(ref_chosen_logps), f32(ref_rejected_logps))
                           if x is not None])
  if ref_chosen_logps is None:
    rc = rr = jnp.zeros_like(pc)
  else:
    rc, rr = f32(ref_chosen_logps), f32(ref_rejected_logps)
  nc, nr = f32(chosen_tokens), f32(rejected_tokens)
  mask = jnp.ones_like(pc) if pair_mask is None else f32(pair_mask)
  loss, chosen_reward, rejected_reward = PREFERENCE_LOSSES[config.loss](
      config, pc, pr, rc, rr, nc, nr, f32(chosen_nll))
  # where, not multiply: a padding row's loss may be non-finite (e.g. zero tokens).
  masked = lambda x: jnp.sum(jnp.where(mask > 0, x, 0.0))
  loss_sum = masked(loss)
  chosen_reward = jax.lax.stop_gradient(chosen_reward)
  rejected_reward = jax.lax.stop_gradient(rejected_reward)
  margin = chosen_reward - rejected_reward
  sums = {
      "weight": jnp.sum(mask),
      "nll_sum": loss_sum,
      "correct": masked((margin > 0).astype(jnp.float32)),
      "margin": masked(margin),
      "chosen_reward": masked(chosen_reward),
      "rejected_reward": masked(rejected_reward),
  }
  return loss_sum, sums


def pair_logps(model: nnx.Module, batch: dict[str, Array], *, chunk_tokens: int | None = None
               ) -> tuple[Array, Array, Array, Array]:
  """(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens), each [b].

  `batch` holds input_ids, targets, loss_mask [2b, t]: rows [:b] are the chosen responses,
  rows [b:] the rejected ones of the same pairs, in the same order; one forward pass.
  `chunk_tokens` (default: scoring's logits budget) bounds the tokens whose logits exist at
  once.
  """
  logps, tokens = sequence_logps(model, batch["input_ids"], batch["targets"],
                                 batch["loss_mask"], chunk_tokens=chunk_tokens)
  b = batch["input_ids"].shape[0] // 2
  return logps[:b], logps[b:], tokens[:b], tokens[b:]


def dpo_loss_fn(model: nnx.Module, batch: dict[str, Array], rng: Array, *,
                config: PreferenceConfig, chunk_tokens: int | None = None
                ) -> tuple[Array, dict[str, Array]]:
  """`loss_fn(model, batch, rng)` for `make_train_step` / `make_eval_step`.

  The batch stacks each pair's two sides (see data/preferences.py):
    input_ids, targets, loss_mask        [2b, t]: rows [:b] chosen, rows [b:] rejected
    pair_mask                            [b] float32, 1 = real pair (optional)
    ref_chosen_logps, ref_rejected_logps [b] float32 (needed by dpo and ipo)
  Stacked halves keep the train loop's token count (input_ids) right, and stay paired under
  `split_microbatches`' strided split whenever b is divisible by the number of
  micro-batches: micro-batch j then gets chosen rows j, j+k, ... and rejected rows b+j,
  b+j+k, ..., i.e. its own pairs j, j+k, ... in both halves, matching the [b] fields.
  """
  del rng
  pc, pr, nc, nr = pair_logps(model, batch, chunk_tokens=chunk_tokens)
  return preference_loss(pc, pr, batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps"),
                         config=config, chosen_tokens=nc, rejected_tokens=nr,
                         pair_mask=batch.get("pair_mask"))


def make_loss_fn(config: PreferenceConfig) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """`dpo_loss_fn` bound to `config`: the train step's loss_fn(model, batch, rng)."""
  return functools.partial(dpo_loss_fn, config=config)
