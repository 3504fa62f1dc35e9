"""Decoder invariants shared by the model tests of several configs: a KV cache filled in
chunks gives the full forward's logits, and right-padded prompts decode as if each were alone.
`run(model, ids, **kwargs)` is the caller's compiled forward."""

import jax.numpy as jnp
import numpy as np

from wakea_jax.models.layers import KVCache

CHUNKS = ((0, 5), (5, 6), (6, 7), (7, 12))


def assert_cache_chunks_match_full(run, model, config, ids):
  """Prefill and decode `ids` [b, 12] in CHUNKS through one cache; returns the cache."""
  full = run(model, ids)
  cache = KVCache.create(config, batch=ids.shape[0], capacity=16)
  pieces = []
  for start, stop in CHUNKS:
    logits, cache = run(model, ids[:, start:stop], cache=cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5)
  return cache


def assert_right_padded_decode_matches_alone(run, model, config, ids, lengths):
  """One prefill of right-padded prompts (`ids` [b, t] cut to `lengths`), then one decode
  step: every row's logits equal the row run alone. Returns the cache after the prefill."""
  lengths = np.asarray(lengths)
  t = ids.shape[1]
  mask = jnp.asarray(np.arange(t)[None] < lengths[:, None], jnp.int32)
  prompt = jnp.where(mask == 1, ids, 0)
  cache = KVCache.create(config, batch=ids.shape[0], capacity=t + 6)
  logits, cache = run(model, prompt, attention_mask=mask, cache=cache)
  nxt = jnp.asarray(np.arange(7, 7 + 2 * ids.shape[0], 2)[:, None], jnp.int32)
  step_logits, _ = run(model, nxt, cache=cache)
  for row, length in enumerate(lengths):
    alone = run(model, jnp.concatenate([ids[row:row + 1, :length], nxt[row:row + 1]], axis=1))
    np.testing.assert_allclose(logits[row, :length], alone[0, :length], atol=2e-5)
    np.testing.assert_allclose(step_logits[row, 0], alone[0, length], atol=2e-5)
  return cache
