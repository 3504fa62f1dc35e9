"""Smeared keys (ModelConfig.smeared_keys, arXiv 2209.11895 appendix): the attention against a
NumPy transcription that builds the smeared keys k'_j = (1 - s) k_j + s k_{j-1} explicitly,
and the decoder's cache, padding, packing, sampler and continuous-batching invariants with
them on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import decoder_checks
from tests.randomise import randomise
from wakea_jax.checkpoints import hf
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.models.layers import dot_product_attention
from wakea_jax.objectives.sft import token_logprobs
from wakea_jax.sampling import Sampler
from wakea_jax.sampling.batching import ContinuousBatcher

CONFIG = get_preset("tiny", smeared_keys=True)


def _numpy_smeared_attention(q, k, v, segments, smear, num_kv_heads):
  """q [b, t, n, h], k/v [b, t, kv, h], segments [b, t] (0 = padding), smear [n]: causal
  attention within segments over keys smeared with the previous key of the same segment."""
  b, t, n, h = q.shape
  g = n // num_kv_heads
  out = np.zeros_like(q)
  for row in range(b):
    for head in range(n):
      kv = head // g
      s = smear[head]
      keys = np.array(k[row, :, kv], np.float64)
      smeared = (1 - s) * keys
      for j in range(1, t):
        if segments[row, j] == segments[row, j - 1]:
          smeared[j] += s * keys[j - 1]
      for i in range(t):
        if segments[row, i] == 0:
          continue
        allowed = [j for j in range(i + 1) if segments[row, j] == segments[row, i]]
        scores = smeared[allowed] @ q[row, i, head] / np.sqrt(h)
        weights = np.exp(scores - scores.max())
        out[row, i, head] = (weights / weights.sum()) @ v[row, allowed, kv]
  return out


# Causal (no cache: keys smeared per query head, one block and the blocked path) and not
# (the cache's path: the scores mixed with themselves shifted).
@pytest.mark.parametrize("causal,block", [(True, 128), (True, 4), (False, 128)])
def test_attention_against_numpy_transcription(causal, block):
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 11, 4, 2, 8
  q, k, v = (rng.standard_normal((b, t, heads, h)).astype(np.float32)
             for heads in (n, kv, kv))
  segments = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11])
  smear = np.array([0.1, 0.5, 0.9, 0.3], np.float32)
  same = segments[:, :, None] == segments[:, None, :]
  mask = same & (segments[:, :, None] > 0) & np.tril(np.ones((t, t), bool))[None]
  out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                              kv, causal=causal, block=block, smear=jnp.asarray(smear))
  ref = _numpy_smeared_attention(q, k, v, segments, smear, kv)
  valid = segments > 0
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-5)
  plain = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(mask), kv, causal=True, block=block)
  assert np.abs(np.asarray(plain)[valid] - ref[valid]).max() > 1e-2   # the smear matters


def test_per_key_smearing_has_the_gradients_of_mixed_scores():
  """Training's path (keys smeared per query head, the plain attention's written-out
  backward pass) against the cache's (mixed scores, autodiff): the same gradients for q, k,
  v and the smear shares, with packing and padding."""
  rng = np.random.default_rng(1)
  b, t, n, kv, h = 2, 24, 4, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32)
             for heads in (n, kv, kv))
  segments = jnp.asarray([[1] * 9 + [2] * 12 + [0] * 3, [1] * 24])
  mask = transformer.attention_mask_for(t, segments, None, b)
  smear = jax.nn.sigmoid(jnp.asarray(rng.standard_normal(n), jnp.float32))
  weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

  def grads(causal):
    def loss(q, k, v, smear):
      out = dot_product_attention(q, k, v, mask, kv, causal=causal, block=8, smear=smear)
      return jnp.sum(out * weights)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, smear)

  for per_key, mixed in zip(grads(True), grads(False)):
    np.testing.assert_allclose(np.asarray(per_key), np.asarray(mixed), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def model():
  m = transformer.create_model(CONFIG, seed=0)
  randomise(m, seed=2)
  for i, layer in enumerate(m.layers):   # distinct shares per head and layer: order bugs show
    layer.attn.key_smear[...] = jnp.linspace(-2.0, 2.0, CONFIG.num_heads) * (1 - 2 * i)
  return m


_apply = jax.jit(transformer.apply, static_argnums=0)


def run(m, ids, **kwargs):
  graphdef, state = nnx.split(m)
  return _apply(graphdef, state, ids, **kwargs)


def _ids(batch, length, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(1, 256, (batch, length)), jnp.int32)


def test_params_config_and_export(model):
  assert transformer.count_params(model) == CONFIG.num_params()
  assert CONFIG.num_params() == get_preset("tiny").num_params() + 2 * CONFIG.num_heads
  with pytest.raises(ValueError, match="smeared_keys needs the native attention"):
    get_preset("tiny", smeared_keys=True, attention="xla")
  with pytest.raises(ValueError, match="smeared_keys has no transformers architecture"):
    hf.config_to_hf(CONFIG)
  plain = transformer.create_model(get_preset("tiny"), seed=0)
  randomise(plain, seed=2)
  assert np.abs(run(model, _ids(1, 9)) - run(plain, _ids(1, 9))).max() > 1e-2


def test_kv_cache_chunks_padding_and_packing_match_full_forward(model):
  decoder_checks.assert_cache_chunks_match_full(run, model, CONFIG, _ids(2, 12))
  decoder_checks.assert_right_padded_decode_matches_alone(run, model, CONFIG, _ids(2, 10), [10, 6])
  # Packed segments: a segment's first key has no previous key.
  a, b = _ids(1, 5, seed=1), _ids(1, 4, seed=2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  out = run(model, packed, segment_ids=segment_ids)
  np.testing.assert_allclose(out[0, :5], run(model, a)[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 5:9], run(model, b)[0], atol=2e-5)


PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55],
           [9], [77, 78, 79, 80]]
LIMITS = [3, 12, 7, 1, 9]


def test_sampler_logprobs_and_continuous_batching(model):
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, CONFIG, temperature=1.0, top_k=20)
  static = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(1))
  forward = jax.jit(lambda m, ids: m(ids))
  for prompt, tokens, logprobs in zip(PROMPTS, static.tokens, static.logprobs):
    n = len(prompt) + len(tokens)
    ids = jnp.asarray([prompt + tokens + [0] * (32 - n)], jnp.int32)
    ref = token_logprobs(forward(model, ids)[:, :-1], ids[:, 1:])[0, len(prompt) - 1:n - 1]
    np.testing.assert_allclose(logprobs, ref, atol=1e-4)
  out = ContinuousBatcher(sampler, slots=2, chunk_steps=4).generate(
      params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(1))
  assert out.tokens == static.tokens
  for a, b in zip(static.logprobs, out.logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)
