"""Sampler: greedy == full-forward argmax, trainer log-prob parity, padding invariance,
transformers `generate` parity, sampling modes, stops and compile-once bucketing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax.models.config import get_preset
from wakea_jax.models.transformer import create_model
from wakea_jax.objectives.sft import token_logprobs
from wakea_jax.sampling import Sampler
from wakea_jax.sampling.sampler import (
  _nucleus_mask,
  first_argmax,
  inverse_cdf_sample,
  nucleus_sample,
)

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55]]


@pytest.fixture(scope="module")
def tiny():
  config = get_preset("tiny")
  model = create_model(config)
  randomise(model, seed=3)
  graphdef, params = nnx.split(model)
  return config, graphdef, params, model


def _sampler(tiny, **kwargs) -> Sampler:
  config, graphdef, _, _ = tiny
  return Sampler(graphdef, config, **kwargs)


@jax.jit
def _full_forward(model, ids):
  return model(ids)


def _reference_greedy(model, prompt, n, width=48):
  """Step-by-step argmax of a full forward without cache (right padding to one width keeps
  it to one compilation; the causal mask makes the padding invisible to earlier tokens)."""
  ids = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32)
    ids.append(int(jnp.argmax(_full_forward(model, padded)[0, len(ids) - 1])))
  return ids[len(prompt):]


def test_greedy_matches_full_forward_argmax_and_padding_is_invisible(tiny):
  _, _, params, model = tiny
  sampler = _sampler(tiny, temperature=0.0)
  batched = sampler.generate(params, PROMPTS, max_new_tokens=10, rng=jax.random.key(0))
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.generate(params, [prompt], max_new_tokens=10, rng=jax.random.key(0))
    assert alone.tokens[0] == batched.tokens[i] == _reference_greedy(model, prompt, 10)
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[i], atol=1e-5)
  assert batched.lengths == [10, 10, 10] and batched.stop_reason == ["length"] * 3
  assert len(set(map(tuple, batched.tokens))) == 3   # non-trivial model


def test_logprobs_match_trainer_recomputation(tiny):
  _, _, params, model = tiny
  sampler = _sampler(tiny, temperature=0.8, top_k=40)
  out = sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(1))
  worst = 0.0
  for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
    n = len(prompt) + len(tokens)
    ids = jnp.asarray([prompt + tokens + [0] * (48 - n)], jnp.int32)
    ref = token_logprobs(_full_forward(model, ids)[:, :-1], ids[:, 1:])[0, len(prompt) - 1:n - 1]
    worst = max(worst, float(np.abs(np.asarray(ref) - logprobs).max()))
  print(f"max |sampler logprob - trainer logprob| = {worst:.2e}")
  assert worst < 1e-4


def test_sampling_modes(tiny):
  _, _, params, _ = tiny
  kw = dict(max_new_tokens=8)
  greedy = _sampler(tiny, temperature=0.0).generate(params, PROMPTS, rng=jax.random.key(0), **kw)
  for sampler in (_sampler(tiny, top_k=1), _sampler(tiny, top_p=1e-6),
                  _sampler(tiny, temperature=0.7, top_k=5, top_p=1e-6)):
    assert sampler.generate(params, PROMPTS, rng=jax.random.key(9), **kw).tokens == greedy.tokens
  sampler = _sampler(tiny, temperature=1.5, top_p=0.95)
  a = sampler.generate(params, PROMPTS, rng=jax.random.key(4), **kw)
  b = sampler.generate(params, PROMPTS, rng=jax.random.key(4), **kw)
  c = sampler.generate(params, PROMPTS, rng=jax.random.key(5), **kw)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  # The processed log-prob is of the tempered, truncated distribution, so it differs.
  assert not np.allclose(np.concatenate(a.logprobs), np.concatenate(a.processed_logprobs))


def test_stops_and_max_new_tokens(tiny):
  _, _, params, _ = tiny
  greedy = _sampler(tiny, temperature=0.0)
  free = greedy.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0)).tokens
  stop = free[0][4]
  first = [row.index(stop) + 1 if stop in row else 12 for row in free]
  out = _sampler(tiny, temperature=0.0, stop_ids=(stop,)).generate(
      params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0))
  assert out.lengths == first and out.tokens[0] == free[0][:first[0]]
  assert out.stop_reason[0] == "stop_id"
  short = greedy.generate(params, PROMPTS, max_new_tokens=[3, 5, 12], rng=jax.random.key(0))
  assert short.lengths == [3, 5, 12] and short.tokens[1] == free[1][:5]

  class CharTokenizer:   # token t decodes to chr(ord('a') + t % 26): strings span tokens
    def decode(self, ids):
      return "".join(chr(ord("a") + t % 26) for t in ids)

  text = CharTokenizer().decode(free[2])
  target = text[5:7]                      # straddles tokens 5 and 6
  expected = text.index(target) + 2
  out = _sampler(tiny, temperature=0.0, chunk_steps=4).generate(
      params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0), stop_strings=[target],
      tokenizer=CharTokenizer())
  assert out.tokens[2] == free[2][:expected] and out.stop_reason[2] == "stop_string"
  assert len(out.logprobs[2]) == expected
  # A predicate on the text (sampler.StopRule) cuts where the string it tests for does.
  by_rule = _sampler(tiny, temperature=0.0, chunk_steps=4).generate(
      params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0),
      stop_strings=[lambda text: target in text], tokenizer=CharTokenizer())
  assert by_rule.tokens == out.tokens and by_rule.stop_reason == out.stop_reason
  # Driven by hand: the cut row's cache end index is rewound to prompt + kept tokens.
  sampler = _sampler(tiny, temperature=0.0)
  state = sampler.start(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0))
  state = sampler.decode(params, state, jnp.asarray(12, jnp.int32))
  state, cut = sampler.apply_stop_strings(state, [target], CharTokenizer())
  assert cut[2] == expected and bool(state.done[2])
  assert int(state.cache.end_index[2]) == len(PROMPTS[2]) + expected
  for row in set(range(3)) - set(cut):
    assert int(state.cache.end_index[row]) == len(PROMPTS[row]) + 12


def test_prefill_appends_to_a_subset_and_resumes(tiny):
  _, _, params, model = tiny
  sampler = _sampler(tiny, temperature=0.0)
  state = sampler.start(params, PROMPTS[:2], max_new_tokens=6, rng=jax.random.key(0))
  state = sampler.decode(params, state, jnp.asarray(3, jnp.int32))
  first = np.asarray(state.tokens)[:, :3].tolist()
  # Append two "tool" tokens to row 1 only, then continue decoding both rows.
  extra = jnp.asarray([[0, 0], [77, 78]], jnp.int32)
  mask = jnp.asarray([[0, 0], [1, 1]], jnp.int32)
  cache, logits = sampler.prefill(params, state.cache, extra, mask)
  state = state.replace(cache=cache, logits=jnp.where(mask.any(1)[:, None], logits,
                                                      state.logits))
  state = sampler.decode(params, state, jnp.asarray(3, jnp.int32))
  tokens = np.asarray(state.tokens)[:, :6].tolist()
  assert tokens[0] == _reference_greedy(model, PROMPTS[0], 6)
  row1 = PROMPTS[1] + first[1] + [77, 78]
  assert tokens[1][3:] == _reference_greedy(model, row1, 3)


def test_prompt_lengths_in_one_bucket_compile_once(tiny):
  _, _, params, _ = tiny
  sampler = _sampler(tiny, temperature=0.0, min_prompt_bucket=32)
  sampler.generate(params, [[1] * 20, [2] * 3], max_new_tokens=5, rng=jax.random.key(0))
  before = sampler.compile_count()
  assert before > 0
  sampler.generate(params, [[1] * 9, [3] * 30], max_new_tokens=7, rng=jax.random.key(0))
  assert sampler.compile_count() == before


def test_greedy_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from wakea_jax.checkpoints import hf

  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rms_norm_eps=1e-6, attn_implementation="eager")
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(cfg).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
  ref.save_pretrained(tmp_path)
  model = hf.load_model(tmp_path)
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, model.config, temperature=0.0)
  out = sampler.generate(params, PROMPTS, max_new_tokens=16, rng=jax.random.key(0))
  for prompt, tokens in zip(PROMPTS, out.tokens):
    with torch.no_grad():
      hf_out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                            min_new_tokens=16, eos_token_id=None, pad_token_id=0)
    assert tokens == hf_out[0, len(prompt):].tolist()


def test_inverse_cdf_sampling_draws_the_softmax_and_never_a_masked_id():
  # 1,000 ids: not a multiple of the 256-id blocks (padding), -inf ids scattered and at the
  # end (a block of no mass), one row per key.
  rng = np.random.default_rng(0)
  values = rng.normal(size=1000).astype(np.float32) * 2
  values[::7] = -np.inf
  values[990:] = -np.inf
  n = 100_000
  tokens, logq = jax.jit(inverse_cdf_sample)(
      jnp.broadcast_to(jnp.asarray(values), (n, 1000)), jax.random.split(jax.random.key(0), n))
  tokens = np.asarray(tokens)
  assert np.isfinite(values[tokens]).all()
  probs = np.asarray(jax.nn.softmax(jnp.asarray(values)))
  np.testing.assert_allclose(np.bincount(tokens, minlength=1000) / n, probs, atol=4e-3)
  np.testing.assert_allclose(np.asarray(logq), np.log(probs[tokens]), atol=1e-5)
  # One id of all the mass, first or last, and a tie: always one of them.
  edge = np.full((3, 600), -np.inf, np.float32)
  edge[0, 0] = edge[1, 599] = 0.0
  edge[2, 300] = edge[2, 301] = 5.0
  for seed in range(20):
    tokens, _ = inverse_cdf_sample(jnp.asarray(edge), jax.random.split(jax.random.key(seed), 3))
    assert tokens[0] == 0 and tokens[1] == 599 and int(tokens[2]) in (300, 301)


def _numpy_nucleus(values, p):
  """The nucleus of arXiv 1904.09751 §3.1 written out: sort descending (stable: ties keep
  the lower id first), keep a token while the mass strictly before it is below p ->
  the truncated distribution over the vocabulary (0 outside the nucleus)."""
  values = values.astype(np.float64)
  probs = np.exp(values - values.max())
  probs /= probs.sum()
  order = np.argsort(-values, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  q = np.zeros_like(probs)
  q[order[before < p]] = probs[order[before < p]]
  return q / q.sum()


def test_nucleus_sampling_draws_the_truncated_softmax_without_sorting_every_row():
  """nucleus_sample against the NumPy nucleus: draws (frequencies over 40,000 keys) and
  log q. Row 0 is peaked (its nucleus ends among the 16 candidates), row 1 flat (it does not:
  the full sort), row 2 has a tie at the nucleus edge, row 3 p = 1 (no truncation). A row's
  draw is the same alone as beside a row that needs the full sort."""
  rng = np.random.default_rng(0)
  n_vocab = 600
  values = np.stack([rng.normal(size=n_vocab) * 4, rng.normal(size=n_vocab) * 0.1,
                     np.full(n_vocab, -3.0), rng.normal(size=n_vocab)]).astype(np.float32)
  values[2, [10, 20, 30, 40]] = [2.0, 1.0, 1.0, 1.0]   # ties at 1.0 straddle p = 0.7
  top_p = np.array([0.9, 0.9, 0.7, 1.0], np.float32)
  n = 40_000
  draw = jax.jit(lambda v, k, p: nucleus_sample(v, k, p, candidates=16))
  keys = jax.random.split(jax.random.key(0), n)
  for row in range(4):
    want = _numpy_nucleus(values[row], top_p[row])
    tokens, logq = draw(jnp.broadcast_to(jnp.asarray(values[row]), (n, n_vocab)), keys,
                        jnp.full((n,), top_p[row]))
    tokens = np.asarray(tokens)
    assert (want[tokens] > 0).all(), row
    np.testing.assert_allclose(np.bincount(tokens, minlength=n_vocab) / n, want, atol=8e-3)
    np.testing.assert_allclose(np.asarray(logq), np.log(want[tokens]), atol=1e-4)
  kept = [(_numpy_nucleus(values[row], 0.9) > 0).sum() for row in (0, 1)]
  assert kept[0] < 16 < kept[1]   # one row within the candidates, one beyond them
  # Rows side by side (the flat row sends the batch through the full sort) draw what each
  # draws alone.
  row_keys = jax.random.split(jax.random.key(3), 4)
  together = draw(jnp.asarray(values), row_keys, jnp.asarray(top_p))
  for row in range(4):
    alone = draw(jnp.asarray(values[row:row + 1]), row_keys[row:row + 1],
                 jnp.asarray(top_p[row:row + 1]))
    assert int(together[0][row]) == int(alone[0][0])
    np.testing.assert_allclose(float(together[1][row]), float(alone[1][0]), atol=1e-6)


def test_nucleus_mask_is_the_sorted_prefix_without_a_sort():
  """_nucleus_mask (bisection over value keys, then over the ids of a tie) keeps exactly the
  stable sort's nucleus: flat, peaked, half-step values with many ties at the edge, all
  values equal, and a tail of -inf, at a vocabulary that is not a power of two."""
  rng = np.random.default_rng(1)
  n_vocab = 3000
  values = np.stack([rng.normal(size=n_vocab) * 0.1, rng.normal(size=n_vocab) * 3,
                     np.round(rng.normal(size=n_vocab) * 2) / 2, np.full(n_vocab, 1.0),
                     rng.normal(size=n_vocab)]).astype(np.float32)
  values[4, 100:] = -np.inf
  top_p = np.array([[0.95], [0.9], [0.5], [0.3], [0.99]], np.float32)
  lse = jax.nn.logsumexp(jnp.asarray(values), axis=-1, keepdims=True)
  got = np.asarray(jax.jit(_nucleus_mask)(jnp.asarray(values), lse, jnp.asarray(top_p)))
  for row in range(len(values)):
    want = _numpy_nucleus(values[row], top_p[row, 0]) > 0
    np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}")
  # Rows 2 and 3 keep part of a tie (the second bisection ran); row 3's edge is its 901st id.
  assert 1 < got[2].sum() < n_vocab and got[3].sum() == 901 and got[3, :901].all()


def test_first_argmax_is_argmax():
  x = np.random.default_rng(1).normal(size=(16, 3000)).astype(np.float32)
  x[3, 10] = x[3, 2000] = 100.0    # ties: the first index, as argmax
  np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))


@pytest.mark.parametrize("layout", ["packed", "fused", "head"])
def test_packed_decode_layout_matches_the_stored_one(tiny, layout):
  """weight_layout="packed" or "fused" (decode_layout.pack_for_decode's layers) or "head" (the
  LM head vocabulary-major; "auto" picks one of them on CPU) and "stored" give the same tokens, and
  log-probs within float32 rounding, greedy and sampled, in one decode call and chunked
  (with_packed_weights)."""
  _, _, params, _ = tiny
  before = jax.tree.map(np.asarray, params)
  for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=40)):
    stored = _sampler(tiny, weight_layout="stored", **kwargs)
    packed = _sampler(tiny, weight_layout=layout, **kwargs)
    assert not stored.packs_weights and packed.packs_weights
    assert _sampler(tiny, **kwargs).packs_weights   # "auto" on the CPU backend, no mesh
    want = stored.generate(params, PROMPTS, max_new_tokens=10, rng=jax.random.key(2))
    got = packed.generate(params, PROMPTS, max_new_tokens=10, rng=jax.random.key(2))
    assert got.tokens == want.tokens
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(want.logprobs),
                               atol=1e-5)
    # The chunked path packs once up front: a packed graphdef over packed params.
    repacked, packed_params = packed.with_packed_weights(params)
    assert repacked.weight_layout == "stored" and repacked.graphdef != packed.graphdef
    rewritten = "lm_head/kernel" if layout == "head" else "qkv_proj"
    assert any(rewritten in "/".join(map(str, path))
               for path, _ in nnx.to_flat_state(packed_params))
    state = repacked.start(packed_params, PROMPTS, max_new_tokens=10, rng=jax.random.key(2))
    for _ in range(4):   # 3 + 3 + 3 + 1 steps
      state = repacked.decode(packed_params, state, jnp.asarray(3, jnp.int32))
    assert np.asarray(state.tokens)[:, :10].tolist() == want.tokens
    assert stored.with_packed_weights(params) == (stored, params)
  # The caller's params are never rewritten.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)
  with pytest.raises(ValueError, match="weight_layout must be"):
    _sampler(tiny, weight_layout="transposed")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_inject_leaves_rows_without_tokens_untouched_near_capacity(scan_layers):
  """A tool turn injected into one row writes (masked) padding into the others at their end
  index; a row whose end index + the injection's width passes the capacity must not have
  that write clamped back onto its valid slots (per-layer and stacked caches)."""
  config = get_preset("tiny").replace(scan_layers=scan_layers)
  graphdef, params = nnx.split(create_model(config))
  sampler = Sampler(graphdef, config, temperature=0.0)
  state = sampler.start(params, PROMPTS[:2], max_new_tokens=8, rng=jax.random.key(0))
  capacity = state.cache.capacity
  near = capacity - 3      # row 1 holds near-full context (stale slots count as its tokens)
  state = state.replace(cache=dataclasses.replace(
      state.cache, end_index=state.cache.end_index.at[1].set(near)))
  before = jax.tree.map(np.asarray, (state.cache.keys, state.cache.values))
  width = 16
  tokens = jnp.zeros((2, width), jnp.int32).at[0, :4].set(jnp.asarray([7, 8, 9, 10]))
  mask = jnp.zeros((2, width), jnp.int32).at[0, :4].set(1)
  state = sampler.inject(params, state, tokens, mask)
  after = jax.tree.map(np.asarray, (state.cache.keys, state.cache.values))
  row = (lambda x, i: x[:, i]) if scan_layers else (lambda x, i: x[i])   # [layers, b, ...]
  for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(row(a, 1), row(b, 1))   # row 1: not a slot changed
    assert not np.array_equal(row(a, 0), row(b, 0))       # row 0 got its tokens
  assert np.asarray(state.cache.end_index).tolist()[1] == near


def test_the_cache_holds_what_the_rows_can_fill(tiny):
  """Capacity = prompt bucket + max_new_tokens rounded up to a quarter of its steps bucket
  (at least 64): never below what a row can fill, never above bucket + steps, and at most
  two capacities per (width, steps) bucket (the executables a bucket compiles)."""
  sampler = _sampler(tiny, temperature=0.0, min_prompt_bucket=16)
  assert sampler.buckets(70, 192) == (128, 256, 320)   # the SRL demo's shape (was 384)
  assert sampler.buckets(128, 128) == (128, 128, 256)
  assert sampler.buckets(5, 3) == (16, 16, 32)
  for steps in (16, 32, 64, 128, 256, 512, 1024, 2048):
    capacities = set()
    for new in range(steps // 2 + 1, steps + 1):
      width, bucket, capacity = sampler.buckets(100, new)
      assert bucket == max(steps, 16)
      assert width + new <= capacity <= width + bucket
      capacities.add(capacity)
    assert len(capacities) <= 2, (steps, sorted(capacities))


def test_a_row_that_fills_the_cache_exactly(tiny):
  """Prompt bucket + decode steps = the capacity (no spare slot): the row that fills it
  still decodes what a full forward's argmax gives, with the trainer's log-probs, while a
  short row in the same batch is done early and feeds padding."""
  _, _, params, model = tiny
  sampler = _sampler(tiny, temperature=0.0, min_prompt_bucket=64)
  prompt = list(np.random.default_rng(4).integers(1, 256, 64))
  state = sampler.start(params, [prompt, [3, 4]], max_new_tokens=[64, 2], rng=jax.random.key(0))
  assert state.cache.capacity == 128
  out = sampler.generate(params, [prompt, [3, 4]], max_new_tokens=[64, 2], rng=jax.random.key(0))
  assert out.lengths == [64, 2]
  assert out.tokens[0] == _reference_greedy(model, prompt, 64, width=128)
  ids = jnp.asarray([prompt + out.tokens[0]], jnp.int32)
  ref = token_logprobs(_full_forward(model, ids)[:, :-1], ids[:, 1:])[0, 63:]
  np.testing.assert_allclose(out.logprobs[0], np.asarray(ref), atol=1e-4)
