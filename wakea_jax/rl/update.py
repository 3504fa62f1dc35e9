"""Model-level pieces of the RL update: scoring rollouts and the GRPO / PPO loss functions.

The loss functions have the train step's signature `loss_fn(model, batch, rng) ->
(loss_sum, sums)` (see train/step.py) and wrap the pure objectives in
`objectives/grpo.py`, `objectives/offpolicy.py` (LUFFY) and `objectives/ppo.py`. A batch
comes from `rollout.to_batch` plus:

  old_logprobs [b, t]   log-probs of the behaviour policy (the params that sampled): as the
                        trainer computes them (`make_score_fn`), or the sampler's own when
                        the rollouts feed a single update (rl.old_logprobs); either way the
                        sampler/trainer gap is measured, not assumed away
  advantages   [b] or [b, t]
  ref_logprobs [b, t]   only when a KL term is on
  off_policy   [b]      LUFFY only: 1 on off-policy trace rows
  old_values, returns [b, t]   PPO only
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models import scoring
from wakea_jax.objectives import grpo as grpo_lib
from wakea_jax.objectives import offpolicy as offpolicy_lib
from wakea_jax.objectives import ppo as ppo_lib


def _forward(model: nnx.Module, batch: dict[str, Array], chunk_tokens: int | None,
             vocab_limit: int | None = None) -> scoring.TokenScores:
  """Token log-probs, entropies (no gradient), values and hidden states of the rollout rows,
  from hidden states in sequence chunks (the [b, t, vocab] logits never exist whole).
  `chunk_tokens` (default: scoring's logits budget) bounds the tokens per chunk;
  `vocab_limit` (the tokenizer's vocab_size) restricts the softmax to the ids the sampler
  can produce."""
  return scoring.score_tokens(model, batch, with_entropy=True, chunk_tokens=chunk_tokens,
                              vocab_limit=vocab_limit)


def _common_sums(scores: scoring.TokenScores, batch: dict[str, Array]) -> dict[str, Array]:
  """Entropy, and |log p - old log p| summed: at a run's single on-policy update, whose
  params are the behaviour policy's, that is the sampler-trainer gap (the learner logs it
  when the old log-probs are the sampler's, rl.old_logprobs)."""
  mask = batch["loss_mask"]
  gap = jnp.abs(jax.lax.stop_gradient(scores.logprobs) - batch["old_logprobs"])
  return {"entropy": jnp.sum(scores.entropy * mask), "logprob_gap": jnp.sum(gap * mask)}


def policy_loss_fn(model: nnx.Module, batch: dict[str, Array], rng: Array, *,
                   loss_config: grpo_lib.LossConfig, chunk_tokens: int | None = None,
                   vocab_limit: int | None = None) -> tuple[Array, dict[str, Array]]:
  """GRPO-family loss (GRPO, Dr. GRPO, DAPO, GSPO per `loss_config`)."""
  del rng
  scores = _forward(model, batch, chunk_tokens, vocab_limit)
  mask = batch["loss_mask"]
  loss_sum, sums = grpo_lib.policy_loss(scores.logprobs, batch["old_logprobs"], batch["advantages"],
                                        mask, loss_config, ref_logprobs=batch.get("ref_logprobs"))
  return loss_sum, {**sums, **_common_sums(scores, batch)}


def mixed_policy_loss_fn(model: nnx.Module, batch: dict[str, Array], rng: Array, *,
                         loss_config: grpo_lib.LossConfig,
                         offpolicy_config: offpolicy_lib.OffPolicyLossConfig,
                         chunk_tokens: int | None = None, vocab_limit: int | None = None
                         ) -> tuple[Array, dict[str, Array]]:
  """LUFFY's mixed-policy loss (objectives/offpolicy.py): rows with batch["off_policy"] [b]
  set are traces, whose `old_logprobs` are the trace model's (0 where unknown)."""
  del rng
  scores = _forward(model, batch, chunk_tokens, vocab_limit)
  mask, off = batch["loss_mask"], batch["off_policy"]
  loss_sum, sums = offpolicy_lib.mixed_policy_loss(
      scores.logprobs, batch["old_logprobs"], batch["advantages"], mask, off, loss_config,
      offpolicy_config, ref_logprobs=batch.get("ref_logprobs"))
  # The sampler-trainer gap is a property of sampled rows; a trace's "old" log-probs are
  # another model's.
  on_batch = {**batch, "loss_mask": mask * (1.0 - off.astype(mask.dtype))[:, None]}
  return loss_sum, {**sums, **_common_sums(scores, on_batch)}


def ppo_loss_fn(model: nnx.Module, batch: dict[str, Array], rng: Array, *,
                loss_config: grpo_lib.LossConfig, ppo_config: ppo_lib.PPOConfig,
                chunk_tokens: int | None = None, vocab_limit: int | None = None
                ) -> tuple[Array, dict[str, Array]]:
  """Clipped policy loss on GAE advantages + vf_coef * clipped value loss, token-mean."""
  del rng
  if not model.config.value_head:
    raise ValueError("PPO needs a model with a value head (model.value_head=True)")
  scores = _forward(model, batch, chunk_tokens, vocab_limit)
  values = scores.values
  if not ppo_config.value_trunk_gradient:
    values = model.value_from(jax.lax.stop_gradient(scores.hidden))
  mask = batch["loss_mask"]
  p_sum, p_sums = grpo_lib.policy_loss(scores.logprobs, batch["old_logprobs"], batch["advantages"],
                                       mask, loss_config)
  v_sum, v_sums = ppo_lib.value_loss(values, batch["old_values"], batch["returns"], mask,
                                     clip=ppo_config.value_clip)
  v_sums.pop("weight")
  return (p_sum + ppo_config.vf_coef * v_sum,
          {**p_sums, **v_sums, "policy_loss": p_sum, "value_loss": v_sum,
           **_common_sums(scores, batch)})


def make_score_fn(graphdef: nnx.GraphDef, *, chunk_tokens: int | None = None,
                  vocab_limit: int | None = None) -> Callable[..., Any]:
  """Jitted `score(params, frozen, batch) -> (logprobs [b, t], values [b, t] or None)`."""

  @jax.jit
  def score(params: nnx.State, frozen: nnx.State, batch: dict[str, Array]
            ) -> tuple[Array, Array | None]:
    model = nnx.merge(graphdef, params, frozen)
    model.eval()
    scores = scoring.score_tokens(model, batch, chunk_tokens=chunk_tokens,
                                  vocab_limit=vocab_limit)
    return scores.logprobs * batch["loss_mask"], scores.values

  return score


def make_entropy_fn(graphdef: nnx.GraphDef, *, chunk_tokens: int | None = None,
                    vocab_limit: int | None = None) -> Callable[..., Any]:
  """Jitted `entropy(params, frozen, batch) -> [b]`: each row's mean token entropy of the
  policy over its loss mask (0 for an empty row), e.g. ExGRPO's trajectory choice."""

  @jax.jit
  def entropy(params: nnx.State, frozen: nnx.State, batch: dict[str, Array]) -> Array:
    model = nnx.merge(graphdef, params, frozen)
    model.eval()
    scores = scoring.score_tokens(model, batch, with_entropy=True, chunk_tokens=chunk_tokens,
                                  vocab_limit=vocab_limit)
    mask = batch["loss_mask"]
    return jnp.sum(scores.entropy * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

  return entropy


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "kl_beta", "kl_estimator",
                                             "whiten"))
def ppo_targets(scores: Array, old_logprobs: Array, ref_logprobs: Array, old_values: Array,
                mask: Array, *, gamma: float, lam: float, kl_beta: float, kl_estimator: str,
                whiten: bool) -> tuple[Array, Array, Array]:
  """(advantages, returns, token rewards) for PPO: KL-shaped rewards -> GAE -> whitening."""
  rewards = ppo_lib.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask,
                                         beta=kl_beta, estimator=kl_estimator)
  advantages, returns = ppo_lib.gae(rewards, old_values, mask, gamma=gamma, lam=lam)
  if whiten:
    advantages = ppo_lib.whiten(advantages, mask)
  return advantages, returns, rewards

