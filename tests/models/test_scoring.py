"""models/scoring.py: chunked token log-probs against full logits and a NumPy log-softmax."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.models import scoring, transformer
from wakea_jax.models.config import get_preset


def _tiny_model(value_head=False, tie_embeddings=False):
  config = get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=64,
                      value_head=value_head, tie_embeddings=tie_embeddings)
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


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_score_tokens_matches_the_model_forward(tied):
  # Tied: the scorer contracts against the embedding [vocab, embed] directly.
  model = _tiny_model(value_head=True, tie_embeddings=tied)
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
  limited = scoring.score_tokens(model, {**batch, "targets": targets % 50}, chunk_tokens=4,
                                 vocab_limit=50)
  np.testing.assert_allclose(
      limited.logprobs, scoring.token_logprobs(out.logits[..., :50], targets % 50), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Every consumer, as the trainers call it: no [b, t, vocab] buffer in the compiled gradient.
# ------------------------------------------------------------------------------------------

_VOCAB, _B, _T = 1000, 4, 13


def _logits_rows(hlo: str, vocab: int) -> list[int]:
  """Rows (product of the leading dims) of every f32 buffer of the optimised HLO whose last
  dim is the vocabulary."""
  rows = []
  for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
    shape = [int(d) for d in dims.split(",")]
    if len(shape) >= 2 and shape[-1] == vocab:
      rows.append(math.prod(shape[:-1]))
  return rows


def _consumer_batch(rows):
  rng = np.random.default_rng(7)
  mask = np.zeros((rows, _T), np.float32)
  mask[:, 4:] = 1.0
  return {"input_ids": rng.integers(1, _VOCAB, (rows, _T)).astype(np.int32),
          "targets": rng.integers(1, _VOCAB, (rows, _T)).astype(np.int32),
          "loss_mask": mask, "segment_ids": np.ones((rows, _T), np.int32),
          "positions": np.tile(np.arange(_T, dtype=np.int32), (rows, 1)),
          "old_logprobs": np.full((rows, _T), -7.0, np.float32),
          "ref_logprobs": np.full((rows, _T), -7.0, np.float32),
          "advantages": rng.normal(size=(rows, _T)).astype(np.float32),
          "old_values": np.zeros((rows, _T), np.float32),
          "returns": np.ones((rows, _T), np.float32),
          "pair_mask": np.ones(rows // 2, np.float32),
          "ref_chosen_logps": np.full(rows // 2, -60.0, np.float32),
          "ref_rejected_logps": np.full(rows // 2, -60.0, np.float32)}


def _full_logits_loss_fn(model, batch, rng):
  """The unchunked form, to show the check detects [b, t, vocab] logits."""
  del rng
  logits = model.forward(batch["input_ids"]).logits
  logprobs = scoring.token_logprobs(logits, batch["targets"])
  return jnp.sum(logprobs * batch["loss_mask"]), {}


def _consumers():
  from wakea_jax.objectives import dpo, grpo, ppo, sft
  from wakea_jax.rl import update

  loss_config = grpo.LossConfig(kl_beta=0.05)
  return {
      "grpo": functools.partial(update.policy_loss_fn, loss_config=loss_config),
      "ppo": functools.partial(update.ppo_loss_fn, loss_config=grpo.LossConfig(),
                               ppo_config=ppo.PPOConfig()),
      "dpo": dpo.make_loss_fn(dpo.PreferenceConfig()),
      "orpo": dpo.make_loss_fn(dpo.PreferenceConfig(loss="orpo")),
      # SFT's chunk size is its own argument (default 1024 tokens), not the logits budget.
      "sft": functools.partial(sft.sft_loss_fn, chunk_tokens=8),
      "scorer": lambda model, batch, rng: (jnp.sum(scoring.score_tokens(
          model, batch, with_entropy=True).logprobs), {}),
      "full_logits": _full_logits_loss_fn,
  }


@pytest.mark.parametrize("name", ["grpo", "ppo", "dpo", "orpo", "sft", "scorer",
                                  "full_logits"])
def test_no_consumer_materialises_the_whole_logits(name, monkeypatch):
  """With the logits budget at 8 tokens' worth, the loss functions the trainers use (default
  chunking) compile, value and gradient, with no f32 buffer of >= b*t rows of vocabulary
  entries; only the deliberately unchunked loss has one (the check can fail)."""
  monkeypatch.setattr(scoring, "LOGITS_BUDGET", 8 * _VOCAB)
  config = get_preset("tiny", vocab_size=_VOCAB, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32,
                      value_head=name == "ppo")
  model = transformer.create_model(config, seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, _consumer_batch(_B))
  loss_fn = _consumers()[name]

  def loss(p):
    return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))[0]

  hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
  rows = _logits_rows(hlo, _VOCAB)
  assert rows, "no logits found in the HLO: the check would pass vacuously"
  if name == "full_logits":
    assert max(rows) >= _B * _T
  else:
    assert max(rows) < _B * _T, f"{name}: a logits buffer of {max(rows)} rows"
