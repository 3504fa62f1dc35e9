"""Supervised fine-tuning objective: masked next-token cross-entropy.

Pure functions of arrays. Losses are returned as sums with their denominators so that they
stay exact under gradient accumulation and across data-parallel shards (token-weighted).

The vocabulary-sized work is written so XLA fuses it into few passes over the logits: the
target logit is picked with an iota comparison (a fused reduction whose gradient is an
elementwise select) rather than a gather (whose gradient is a scatter into a zeroed
[batch, seq, vocab] buffer), accuracy compares the target logit with the row maximum rather
than running argmax (a slow variadic reduction on CPU), and the log-partition uses a plain
max-shifted sum (jax.nn.logsumexp adds infinity handling that costs a full extra pass).
On the bench56m CPU benchmark this took the LM-head loss from ~3.8 s to ~2.8 s per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def _pick(logits: Array, targets: Array) -> Array:
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def _log_partition(logits: Array) -> tuple[Array, Array]:
  """(log sum exp, row max); the max is a constant for differentiation (exact gradient)."""
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_z = jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1)) + row_max
  return log_z, row_max


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(target) per position: [batch, seq, vocab], [batch, seq] -> [batch, seq] float32."""
  logits = logits.astype(jnp.float32)
  return _pick(logits, targets) - _log_partition(logits)[0]


def sft_loss(logits: Array, targets: Array, loss_mask: Array, *, z_loss: float = 0.0
             ) -> tuple[Array, dict[str, Array]]:
  """Sum of masked NLL (plus optional z-loss, arXiv 2204.02311 §5) and metric sums.

  Returns (loss_sum, metrics) where metrics hold sums: `nll_sum`, `tokens`, `correct`.
  Divide by the total `tokens` of the whole (accumulated) batch to get the mean loss.
  """
  mask = loss_mask.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  log_z, row_max = _log_partition(logits)
  picked = _pick(logits, targets)
  nll = log_z - picked
  nll_sum = jnp.sum(nll * mask)
  loss_sum = nll_sum
  if z_loss:
    loss_sum = loss_sum + z_loss * jnp.sum(jnp.square(log_z) * mask)
  # Ties with the maximum count as correct; with float logits they are vanishingly rare.
  correct = jnp.sum(jax.lax.stop_gradient(picked >= row_max) * mask)
  return loss_sum, {"nll_sum": nll_sum, "tokens": jnp.sum(mask), "correct": correct}


def chunked_sft_loss(hidden: Array, head: Array, targets: Array, loss_mask: Array, *,
                     chunk_tokens: int = 1024, z_loss: float = 0.0
                     ) -> tuple[Array, dict[str, Array]]:
  """`sft_loss(hidden @ head, ...)` without materialising the [batch, seq, vocab] logits.

  The sequence is cut into chunks (each spanning the whole batch, so data-parallel shards
  stay busy); each chunk's logits are computed, reduced to the loss sums and dropped, and
  recomputed in the backward pass (jax.checkpoint). Memory for logits falls from
  batch*seq*vocab to chunk*vocab floats, and on CPU the step is faster too (bench56m LM
  head fwd+bwd: 2.2 s -> 1.2 s) because the logits never round-trip through main memory.

  hidden [b, t, e] (compute dtype), head [e, v]; returns what `sft_loss` returns.
  """
  b, t, _ = hidden.shape
  seq_chunk = max(1, min(t, chunk_tokens // max(b, 1)))
  pad = (-t) % seq_chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
  n = (t + pad) // seq_chunk

  def chunks(x: Array) -> Array:  # [b, n*c, ...] -> [n, b, c, ...]
    return jnp.swapaxes(x.reshape((b, n, seq_chunk) + x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h: Array, tg: Array, m: Array) -> tuple[Array, dict[str, Array]]:
    # A 2-D matmul: XLA:CPU's backward for it is much faster than for the rank-3 einsum.
    logits = jnp.dot(h.reshape(-1, h.shape[-1]), head, preferred_element_type=jnp.float32)
    logits = logits.reshape(h.shape[:-1] + (head.shape[-1],))
    return sft_loss(logits, tg, m, z_loss=z_loss)

  def body(carry, xs):
    loss_sum, sums = one(*xs)
    return jax.tree.map(jnp.add, carry, (loss_sum, sums)), None

  zero = jnp.zeros((), jnp.float32)
  init = (zero, {"nll_sum": zero, "tokens": zero, "correct": zero})
  (loss_sum, sums), _ = jax.lax.scan(
      body, init, (chunks(hidden), chunks(targets), chunks(loss_mask.astype(jnp.float32))))
  return loss_sum, sums
