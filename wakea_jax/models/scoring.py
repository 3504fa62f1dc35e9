"""Scoring tokens under a model: log-probs (and entropies) of given targets.

One module serves every consumer that needs log p(target) from a model: the RL scorer
(behaviour and reference log-probs, `rl/update.py`), the RL and PPO losses, DPO's policy and
reference log-probs (`objectives/dpo.py`, `train/preference.py`) and the retrieval
reranker (`retrieval/hybrid.py`).

The log-probs are computed from the final hidden states in chunks of the sequence, each
spanning the whole batch: a chunk's logits ([batch, chunk, vocab]) are formed, reduced to
per-token log-probs and entropies, and dropped; under differentiation they are recomputed
in the backward pass (`jax.checkpoint`). Memory for logits is then at most LOGITS_BUDGET
floats (64 MiB) instead of batch x seq x vocab, which is what lets a 151,936-entry
vocabulary (Qwen) be scored and trained at useful lengths; a small vocabulary gets one
chunk and no rematerialisation, so it pays nothing for this.

The vocabulary-sized reductions are written so XLA fuses them into few passes: the target
logit is picked with an iota comparison (its gradient is an elementwise select, not a
scatter), and the log-partition uses a max-shifted sum whose max is a constant for
differentiation (exact gradient).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models import layers
from wakea_jax.models.media import bind_media

# How many float32 logits may exist at once when the chunk size is left to this module:
# 2**24 (64 MiB) is one chunk for a 1,024-entry vocabulary up to 16k tokens, and ~110
# tokens per chunk for Qwen's 151,936 entries.
LOGITS_BUDGET = 2**24


def default_chunk_tokens(vocab_size: int) -> int:
  """Tokens per chunk that keep one chunk's logits within LOGITS_BUDGET floats."""
  return max(1, LOGITS_BUDGET // max(vocab_size, 1))


def pick(logits: Array, targets: Array) -> Array:
  """logits[..., targets]: [..., vocab], [...] -> [...], as a fused masked sum."""
  vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def log_partition(logits: Array) -> tuple[Array, Array]:
  """(log sum exp, row max) over the last axis; the max is a constant for differentiation."""
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_z = jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1)) + row_max
  return log_z, row_max


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(target) per position: [batch, seq, vocab], [batch, seq] -> [batch, seq] float32."""
  logits = logits.astype(jnp.float32)
  return pick(logits, targets) - log_partition(logits)[0]


def seq_chunking(batch: int, length: int, chunk_tokens: int) -> tuple[int, int, int]:
  """(positions per chunk, number of chunks, right padding) for [batch, length] rows."""
  seq_chunk = max(1, min(length, chunk_tokens // max(batch, 1)))
  pad = (-length) % seq_chunk
  return seq_chunk, (length + pad) // seq_chunk, pad


def to_chunks(x: Array, num_chunks: int, seq_chunk: int, pad: int) -> Array:
  """[b, t, ...] -> [num_chunks, b, seq_chunk, ...], padding t on the right with zeros."""
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b, num_chunks, seq_chunk) + x.shape[2:]), 0, 1)


def chunk_logits(hidden: Array, head: Array, *, vocab_major: bool = False) -> Array:
  """hidden [b, c, e] @ head [e, v] (or head [v, e] with `vocab_major`, a tied embedding,
  contracted without a transposed copy) -> float32 [b, c, v] as one 2-D matmul (XLA:CPU's
  backward for it is much faster than for the rank-3 einsum)."""
  flat = hidden.reshape(-1, hidden.shape[-1])
  if flat.dtype.itemsize == 2:   # 16-bit compute: XLA:CPU's fast path (layers.lowp_matmul)
    logits = layers.lowp_matmul(flat, head, jnp.float32, vocab_major)
  else:
    logits = jax.lax.dot_general(flat, head, (((1, ), (1 if vocab_major else 0, )), ((), ())),
                                 preferred_element_type=jnp.float32)
  return logits.reshape(hidden.shape[:-1] + (logits.shape[-1], ))


def hidden_token_logprobs(hidden: Array, head: Array, targets: Array, *,
                          chunk_tokens: int | None = None, with_entropy: bool = False,
                          vocab_major: bool = False) -> tuple[Array, Array | None]:
  """(log p(targets) [b, t], entropy [b, t] or None) from hidden [b, t, e] and head [e, v]
  (or [v, e] with `vocab_major`: see `chunk_logits`).

  `chunk_tokens` (default: `default_chunk_tokens(vocab)`) bounds the tokens whose logits
  exist at once. When everything fits in one chunk, no scan or rematerialisation is added.
  The entropy of the full next-token distribution carries no gradient (a diagnostic).
  """
  chex.assert_rank(hidden, 3)
  chex.assert_rank(head, 2)
  chex.assert_equal_shape_prefix([hidden, targets], 2)
  b, t, _ = hidden.shape
  chunk_tokens = chunk_tokens or default_chunk_tokens(head.shape[0 if vocab_major else 1])
  seq_chunk, n, pad = seq_chunking(b, t, chunk_tokens)

  def one(h: Array, tg: Array) -> tuple[Array, Array]:
    logits = chunk_logits(h, head, vocab_major=vocab_major)
    log_z, _ = log_partition(logits)
    logprobs = pick(logits, tg) - log_z
    if not with_entropy:
      return logprobs, jnp.zeros_like(logprobs)
    fixed = jax.lax.stop_gradient(logits)
    fixed_z = jax.lax.stop_gradient(log_z)
    probs = jnp.exp(fixed - fixed_z[..., None])
    return logprobs, fixed_z - jnp.sum(probs * fixed, axis=-1)

  if n == 1:
    logprobs, entropy = one(hidden, targets)
    return logprobs, entropy if with_entropy else None
  remat = jax.checkpoint(one)

  def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, tuple[Array, Array]]:
    return carry, remat(*xs)

  _, (logprobs, entropy) = jax.lax.scan(
      body, None, (to_chunks(hidden, n, seq_chunk, pad), to_chunks(targets, n, seq_chunk, pad)))

  def unchunk(x: Array) -> Array:  # [n, b, c] -> [b, t]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * seq_chunk)[:, :t]

  return unchunk(logprobs), unchunk(entropy) if with_entropy else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenScores:
  """Per-token scores of next-token rows under a model."""

  logprobs: Array               # [b, t] float32, log p(targets[b, t])
  entropy: Array | None         # [b, t] float32 (no gradient), when asked for
  values: Array | None          # [b, t] float32, when the model has a value head
  hidden: Array                 # [b, t, e] final-normed hidden states


def score_tokens(model: nnx.Module, batch: dict[str, Array], *, with_entropy: bool = False,
                 chunk_tokens: int | None = None, vocab_limit: int | None = None
                 ) -> TokenScores:
  """Scores `batch` {input_ids, targets[, positions, segment_ids]} under `model`.

  The model's full logits are never used, so XLA drops them from the compiled graph.
  `vocab_limit` (the tokenizer's vocab_size when the embedding is padded past it, as
  Qwen's 151,936 rows for 151,665 ids) restricts the softmax to ids below it: the
  distribution the sampler draws from (`Sampler.vocab_limit`), so sampler and trainer
  log-probs agree even where the padded rows carry mass (a random init).
  """
  model = bind_media(model, batch)   # a multimodal model takes the batch's media
  out = model.forward(batch["input_ids"], positions=batch.get("positions"),
                      segment_ids=batch.get("segment_ids"))
  head, vocab_major = model.head_matrix()
  vocab_axis = 0 if vocab_major else 1
  if vocab_limit is not None and vocab_limit < head.shape[vocab_axis]:
    head = jax.lax.slice_in_dim(head, 0, vocab_limit, axis=vocab_axis)
  logprobs, entropy = hidden_token_logprobs(out.hidden, head, batch["targets"],
                                            chunk_tokens=chunk_tokens,
                                            with_entropy=with_entropy, vocab_major=vocab_major)
  return TokenScores(logprobs=logprobs, entropy=entropy, values=out.values, hidden=out.hidden)


def sequence_logps(model: nnx.Module, input_ids: Array, targets: Array, loss_mask: Array,
                   positions: Array | None = None, segment_ids: Array | None = None, *,
                   chunk_tokens: int | None = None) -> tuple[Array, Array]:
  """Per-row sums of the targets' log-probs over `loss_mask`.

  input_ids, targets [b, t] int32 (next-token rows: targets = ids[1:]), loss_mask [b, t]
  -> (logp_sum [b] float32, tokens [b] float32).
  """
  batch = {"input_ids": input_ids, "targets": targets}
  if positions is not None:
    batch["positions"] = positions
  if segment_ids is not None:
    batch["segment_ids"] = segment_ids
  scores = score_tokens(model, batch, chunk_tokens=chunk_tokens)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(scores.logprobs * mask, axis=-1), jnp.sum(mask, axis=-1)
