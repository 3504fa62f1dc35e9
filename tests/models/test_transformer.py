"""Decoder LM behaviour: shapes, KV cache, padding, packing, remat, dtypes, value head.

Parity with `transformers` lives in tests/checkpoints/test_hf_parity.py; these tests pin the
model against itself under transformations that must not change the result.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import decoder_checks
from wakea_jax.models import transformer
from wakea_jax.models.config import ModelConfig, RopeScaling, get_preset
from wakea_jax.models.layers import KVCache, rope_inv_freq

TINY = get_preset("tiny", qkv_bias=True, qk_norm=True)


_apply = jax.jit(transformer.apply, static_argnums=0)


def run(model, ids, **kwargs):
  """model(ids, **kwargs), compiled: eager op-by-op dispatch is slow on CPU."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, ids, **kwargs)


def _ids(batch, length, seed=0, vocab=256):
  return jnp.asarray(np.random.RandomState(seed).randint(1, vocab, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def model():
  m = transformer.create_model(TINY, seed=0)
  # Randomise norms and biases: their defaults (ones/zeros) would hide wiring bugs.
  state = nnx.state(m, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(m, jax.tree.unflatten(treedef, leaves))
  return m


def test_shapes_and_param_count(model):
  logits = run(model, _ids(3, 7))
  assert logits.shape == (3, 7, TINY.vocab_size) and logits.dtype == jnp.float32
  assert transformer.count_params(model) == TINY.num_params()
  for preset in ("tiny", "bench56m"):
    cfg = get_preset(preset)
    abstract = transformer.abstract_model(cfg)
    assert transformer.count_params(abstract) == cfg.num_params()


def test_causality(model):
  ids = _ids(2, 12)
  changed = ids.at[:, 8:].set(5)
  np.testing.assert_allclose(run(model, ids)[:, :8], run(model, changed)[:, :8], atol=1e-6)
  assert np.abs(run(model, ids)[:, 8:] - run(model, changed)[:, 8:]).max() > 1e-3


def test_kv_cache_matches_full_forward(model):
  cache = decoder_checks.assert_cache_chunks_match_full(run, model, TINY, _ids(2, 12))
  np.testing.assert_array_equal(cache.end_index, [12, 12])


def test_kv_cache_with_right_padded_prompts(model):
  """Prompts of different lengths in one prefill; each decodes as if alone."""
  cache = decoder_checks.assert_right_padded_decode_matches_alone(run, model, TINY, _ids(2, 10),
                                                                  [10, 6])
  np.testing.assert_array_equal(cache.end_index, [10, 6])


def test_padding_mask_leaves_valid_positions_unchanged(model):
  ids = _ids(2, 9)
  lengths = [9, 5]
  mask = jnp.asarray(np.arange(9)[None] < np.array(lengths)[:, None], jnp.int32)
  padded = jnp.where(mask == 1, ids, 0)
  out = run(model, padded, attention_mask=mask)
  assert np.isfinite(np.asarray(out)).all()
  for row, length in enumerate(lengths):
    alone = run(model, ids[row:row + 1, :length])
    np.testing.assert_allclose(out[row, :length], alone[0], atol=2e-5)


def test_packed_segments_equal_separate_sequences(model):
  a, b, c = _ids(1, 5, seed=1), _ids(1, 4, seed=2), _ids(1, 3, seed=3)
  packed = jnp.concatenate([a, b, c, jnp.zeros((1, 4), jnp.int32)], axis=1)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3 + [0] * 4], jnp.int32)
  out = run(model, packed, segment_ids=segment_ids)
  np.testing.assert_allclose(out[0, :5], run(model, a)[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 5:9], run(model, b)[0], atol=2e-5)
  np.testing.assert_allclose(out[0, 9:12], run(model, c)[0], atol=2e-5)
  # Default positions restart at every segment.
  positions = transformer.default_positions(1, 16, segment_ids)
  np.testing.assert_array_equal(positions[0, :12], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2])


def test_inputs_embeds_take_the_token_path(model):
  """inputs_embeds = embed_tokens(ids) gives the ids' results exactly: packed (segments and
  positions as for ids), and as the sampler will use it, a right-padded embeddings prefill
  into the cache followed by an ids decode step."""
  graphdef, state = nnx.split(model)
  embed = jax.jit(lambda s, ids: nnx.merge(graphdef, s).embed_tokens(ids))
  # The packed layout of test_packed_segments_equal_separate_sequences (its compile reused).
  packed = _ids(1, 16, seed=4)
  segment_ids = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3 + [0] * 4], jnp.int32)
  np.testing.assert_array_equal(
      run(model, None, inputs_embeds=embed(state, packed), segment_ids=segment_ids),
      run(model, packed, segment_ids=segment_ids))
  ids = _ids(2, 10, seed=4)
  embeds = embed(state, ids)
  assert embeds.shape == (2, 10, TINY.embed_dim)
  mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]), jnp.int32)
  nxt = jnp.asarray([[7], [9]], jnp.int32)
  results = []
  for kwargs in ({"inputs_embeds": embeds}, {"input_ids": ids}):
    cache = KVCache.create(TINY, batch=2, capacity=16)
    ids_arg = kwargs.pop("input_ids", None)
    logits, cache = run(model, ids_arg, attention_mask=mask, cache=cache, **kwargs)
    step, cache = run(model, nxt, cache=cache)
    results.append((logits, step, cache.end_index))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.forward(ids, inputs_embeds=embeds)
  with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq, 64\]"):
    model.forward(inputs_embeds=embeds[..., :8])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_saveable"])
def test_remat_policies_give_same_loss_and_grads(model, policy):
  ids = _ids(2, 8)
  graphdef, state = nnx.split(model)

  def loss(state, graphdef):
    logits = nnx.merge(graphdef, state)(ids)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, ids[..., None], -1)[..., 0])

  base_loss, base_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, graphdef)
  remat_model = nnx.merge(graphdef, state)
  remat_model.config = TINY.replace(remat_policy=policy)
  for layer in remat_model.layers:
    layer.attn.config = remat_model.config
  g2, s2 = nnx.split(remat_model)
  r_loss, r_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(s2, g2)
  np.testing.assert_allclose(r_loss, base_loss, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(r_grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_full_remat_really_frees_activations_on_cpu():
  """XLA:CPU drops jax.checkpoint's recomputation (CSE merges it with the forward); the
  model's own full remat must keep it: the compiled gradient's temporaries shrink."""
  config = get_preset("tiny").replace(num_layers=6, embed_dim=64, mlp_dim=1024, num_heads=4,
                                      num_kv_heads=2, head_dim=16, vocab_size=64)
  ids = jax.random.randint(jax.random.key(0), (8, 256), 0, 64)

  def temp_bytes(policy):
    model = transformer.create_model(config.replace(remat_policy=policy), seed=0)
    graphdef, state = nnx.split(model)

    def loss(state):
      return jnp.mean(nnx.merge(graphdef, state).forward(ids).hidden ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, full = temp_bytes("none"), temp_bytes("full")
  assert full < 0.6 * none, (full, none)


def test_bfloat16_compute_with_float32_master_weights():
  cfg32 = get_preset("tiny")
  cfg16 = cfg32.replace(dtype="bfloat16")
  m32 = transformer.create_model(cfg32, seed=3)
  m16 = transformer.create_model(cfg16, seed=3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  ids = _ids(2, 8)
  out16, out32 = run(m16, ids), run(m32, ids)
  assert out16.dtype == jnp.float32
  assert np.abs(out16 - out32).max() < 0.05
  assert np.abs(out16 - out32).max() > 0  # really ran in bfloat16
  m_bf16_params = transformer.create_model(cfg16.replace(param_dtype="bfloat16"), seed=3)
  assert all(x.dtype == jnp.bfloat16
             for x in jax.tree.leaves(nnx.state(m_bf16_params, nnx.Param)))


def test_value_head_and_tied_embeddings():
  cfg = get_preset("tiny", value_head=True, tie_embeddings=True)
  m = transformer.create_model(cfg)
  out = m.forward(_ids(2, 5))
  assert out.values.shape == (2, 5) and out.values.dtype == jnp.float32
  assert not hasattr(m, "lm_head")
  assert transformer.count_params(m) == cfg.num_params()


def test_llama3_rope_scaling_matches_reference_formula():
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64)
  got = rope_inv_freq(32, 10_000.0, scaling)
  base = 1.0 / 10_000.0 ** (np.arange(0, 32, 2) / 32)
  expected = []
  for f in base:  # The Llama 3.1 reference loop (meta-llama/llama-models apply_scaling).
    wavelen = 2 * np.pi / f
    if wavelen < 64 / 4.0:
      expected.append(f)
    elif wavelen > 64 / 1.0:
      expected.append(f / 8.0)
    else:
      smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert not np.allclose(got, base)


@pytest.mark.parametrize("field,value,match", [
    ("num_kv_heads", 3, "multiple"),
    ("head_dim", 7, "even"),
    ("dtype", "float64", "dtype"),
    ("remat_policy", "some", "remat_policy"),
    ("embed_dim", 0, "positive"),
])
def test_config_validation(field, value, match):
  with pytest.raises(ValueError, match=match):
    get_preset("tiny").replace(**{field: value})


def test_preset_and_dict_round_trip():
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("gpt5")
  cfg = get_preset("llama3.2-1b")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_blocked_causal_attention_equals_full_attention():
  """Long sequences take the blocked causal path; it must equal plain masked attention."""
  from wakea_jax.models.layers import dot_product_attention
  rng = np.random.RandomState(0)
  b, t, n, kv, h = 2, 300, 4, 2, 8
  q = jnp.asarray(rng.randn(b, t, n, h).astype(np.float32))
  k = jnp.asarray(rng.randn(b, t, kv, h).astype(np.float32))
  v = jnp.asarray(rng.randn(b, t, kv, h).astype(np.float32))
  segment_ids = jnp.asarray(np.repeat([[1] * 130 + [2] * 150 + [0] * 20], b, axis=0))
  mask = transformer.attention_mask_for(t, segment_ids, None, b)
  blocked = jax.jit(lambda *a: dot_product_attention(*a, kv, causal=True, block=64))
  full = jax.jit(lambda *a: dot_product_attention(*a, kv, causal=False))
  np.testing.assert_allclose(blocked(q, k, v, mask), full(q, k, v, mask), atol=1e-5)
  g_blocked = jax.grad(lambda q: jnp.sum(blocked(q, k, v, mask) ** 2))(q)
  g_full = jax.grad(lambda q: jnp.sum(full(q, k, v, mask) ** 2))(q)
  np.testing.assert_allclose(g_blocked, g_full, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_attention_matches_numpy(dtype):
  """One query per row over a head-major cache (a decode step): float32 scores take one
  matrix-vector product per query head of a group (layers._scores), 16-bit ones the batched
  product. Both against a NumPy transcription of grouped softmax attention; a row that sees no
  key gives 0."""
  from wakea_jax.models.layers import dot_product_attention
  rng = np.random.RandomState(1)
  b, n, kv, s, h = 3, 6, 2, 40, 16
  q = rng.randn(b, 1, n, h).astype(np.float32)
  k = rng.randn(b, kv, s, h).astype(np.float32)
  v = rng.randn(b, kv, s, h).astype(np.float32)
  lengths = np.array([40, 17, 0])
  mask = np.arange(s)[None, None, :] < lengths[:, None, None]          # [b, 1, s]
  cast = lambda x: jnp.asarray(x, dtype)   # noqa: E731
  got = jax.jit(lambda *a: dot_product_attention(*a, kv, kv_layout="bksh"))(
      cast(q), cast(k), cast(v), jnp.asarray(mask))
  qr, kr, vr = (np.asarray(cast(x).astype(jnp.float32)) for x in (q, k, v))
  want = np.zeros((b, 1, n, h), np.float32)
  for i in range(b):
    for head in range(n):
      j = head // (n // kv)
      scores = kr[i, j, :lengths[i]] @ qr[i, 0, head] / np.sqrt(h)
      if lengths[i]:
        p = np.exp(scores - scores.max())
        want[i, 0, head] = (p / p.sum()) @ vr[i, j, :lengths[i]]
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, atol=tol, rtol=tol)
