"""models/scoring.py: chunked token log-probs against full logits and a NumPy log-softmax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.models import scoring, transformer
from wakea_jax.models.config import get_preset


def _tiny_model(value_head=False):
  config = get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64,
                      value_head=value_head)
  return transformer.create_model(config, seed=0)


def _log_softmax64(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_sequence_logps_equals_numpy_log_softmax():
  model = _tiny_model()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, (3, 12)).astype(np.int32)
  targets = rng.integers(1, 64, (3, 12)).astype(np.int32)
  mask = (rng.random((3, 12)) < 0.6).astype(np.float32)
  logp, tokens = scoring.sequence_logps(model, jnp.asarray(ids), jnp.asarray(targets),
                                        jnp.asarray(mask))
  logprobs = _log_softmax64(np.asarray(model(jnp.asarray(ids))))
  expected = np.zeros(3)
  for b in range(3):
    for t in range(12):
      if mask[b, t]:
        expected[b] += logprobs[b, t, targets[b, t]]
  np.testing.assert_allclose(np.asarray(logp), expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(tokens), mask.sum(-1))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 24, 4096])
def test_chunks_equal_full_logits_log_probs_entropy_and_gradients(chunk_tokens):
  """Any chunking (one token, a size that divides nothing, everything at once) gives the
  log-probs, entropies and gradients of the full [b, t, vocab] logits."""
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(3, 10, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 40)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, (3, 10)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)

  logits64 = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
  logp64 = _log_softmax64(logits64)
  want_logprobs = np.take_along_axis(logp64, np.asarray(targets)[..., None], -1)[..., 0]
  want_entropy = -(np.exp(logp64) * logp64).sum(-1)

  logprobs, entropy = scoring.hidden_token_logprobs(hidden, head, targets,
                                                    chunk_tokens=chunk_tokens,
                                                    with_entropy=True)
  chex.assert_shape([logprobs, entropy], (3, 10))
  chex.assert_type([logprobs, entropy], jnp.float32)
  np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)

  def chunked(h, w):
    return jnp.sum(scoring.hidden_token_logprobs(h, w, targets,
                                                 chunk_tokens=chunk_tokens)[0] * weights)

  def full(h, w):
    return jnp.sum(scoring.token_logprobs(jnp.einsum("bte,ev->btv", h, w), targets) * weights)

  chex.assert_trees_all_close(jax.grad(chunked, argnums=(0, 1))(hidden, head),
                              jax.grad(full, argnums=(0, 1))(hidden, head),
                              rtol=1e-4, atol=1e-5)


def test_entropy_carries_no_gradient():
  rng = np.random.default_rng(2)
  hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
  targets = jnp.zeros((2, 5), jnp.int32)
  grad = jax.grad(lambda h: jnp.sum(scoring.hidden_token_logprobs(
      h, head, targets, with_entropy=True)[1]))(hidden)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_score_tokens_matches_the_model_forward():
  model = _tiny_model(value_head=True)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(1, 64, (2, 9)), jnp.int32)
  targets = jnp.asarray(rng.integers(1, 64, (2, 9)), jnp.int32)
  segment_ids = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
  batch = {"input_ids": ids, "targets": targets, "segment_ids": segment_ids}
  scores = scoring.score_tokens(model, batch, chunk_tokens=4)
  out = model.forward(ids, segment_ids=segment_ids)
  np.testing.assert_allclose(scores.logprobs, scoring.token_logprobs(out.logits, targets),
                             rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(scores.values, out.values)
  chex.assert_trees_all_close(scores.hidden, out.hidden)
  assert scores.entropy is None
