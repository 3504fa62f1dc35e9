"""Supervised fine-tuning objective: masked next-token cross-entropy.

Pure functions of arrays. Losses are returned as sums with their denominators so that they
stay exact under gradient accumulation and across data-parallel shards (token-weighted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(target) per position: [batch, seq, vocab], [batch, seq] -> [batch, seq] float32."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(logits: Array, targets: Array, loss_mask: Array, *, z_loss: float = 0.0
             ) -> tuple[Array, dict[str, Array]]:
  """Sum of masked NLL (plus optional z-loss, arXiv 2204.02311 §5) and metric sums.

  Returns (loss_sum, metrics) where metrics hold sums: `nll_sum`, `tokens`, `correct`.
  Divide by the total `tokens` of the whole (accumulated) batch to get the mean loss.
  """
  mask = loss_mask.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - picked
  loss_sum = jnp.sum(nll * mask)
  if z_loss:
    loss_sum = loss_sum + z_loss * jnp.sum(jnp.square(log_z) * mask)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
  return loss_sum, {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask), "correct": correct}
