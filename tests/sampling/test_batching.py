"""Continuous batching: the same completions as static batching, whatever the slots."""

import jax
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomised_tiny
from tests.toy import CharTokenizer
from wakea_jax.models.config import get_preset
from wakea_jax.models.transformer import create_model
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling import Sampler
from wakea_jax.sampling.batching import ContinuousBatcher

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55],
           [9], [77, 78, 79, 80], [3, 1, 4, 1, 5, 9, 2, 6], [100, 101], [7] * 20, [250, 3]]
LIMITS = [3, 24, 7, 1, 16, 5, 30, 2, 12]     # widely varying lengths


@pytest.fixture(scope="module")
def model():
  return randomised_tiny(seed=5)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_k=20)])
@pytest.mark.parametrize("slots,chunk", [(2, 4), (3, 32), (16, 8)])
def test_continuous_equals_static(model, settings, slots, chunk):
  config, graphdef, params = model
  sampler = Sampler(graphdef, config, **settings)
  static = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(4))
  out = ContinuousBatcher(sampler, slots=slots, chunk_steps=chunk).generate(
      params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(4))
  assert out.lengths == LIMITS and out.stop_reason == static.stop_reason
  assert out.tokens == static.tokens
  for a, b in zip(static.logprobs, out.logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)
  for a, b in zip(static.processed_logprobs, out.processed_logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_a_request_samples_the_same_in_any_batch(model):
  """Per-request keys: request 0's draws do not depend on what else is in its batch."""
  config, graphdef, params = model
  sampler = Sampler(graphdef, config, temperature=1.0)
  alone = sampler.generate(params, PROMPTS[:1], max_new_tokens=12, rng=jax.random.key(9))
  crowd = sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(9))
  assert crowd.tokens[0] == alone.tokens[0]


def test_stop_ids_free_slots_and_the_mesh(model):
  config, graphdef, params = model
  free = Sampler(graphdef, config, temperature=0.0).generate(
      params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(0))
  stop = free.tokens[1][3]
  sampler = Sampler(graphdef, config, temperature=0.0, stop_ids=(stop,))
  static = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(0))
  assert "stop_id" in static.stop_reason
  mesh = mesh_lib.create_mesh((2, 2, 2))
  on_mesh = Sampler(graphdef, config, temperature=0.0, stop_ids=(stop,), mesh=mesh)
  out = ContinuousBatcher(on_mesh, slots=3, chunk_steps=8).generate(
      mesh_lib.shard_state(params, mesh), PROMPTS, max_new_tokens=LIMITS,
      rng=jax.random.key(0))
  assert out.tokens == static.tokens and out.stop_reason == static.stop_reason


def test_bad_requests():
  config = get_preset("tiny")
  graphdef, _ = nnx.split(create_model(config))
  batcher = ContinuousBatcher(Sampler(graphdef, config), slots=2)
  with pytest.raises(ValueError, match="at least one token"):
    batcher.generate(None, [[1], []], max_new_tokens=2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="max_seq_len"):
    batcher.generate(None, [[1]], max_new_tokens=10_000, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="slots"):
    ContinuousBatcher(Sampler(graphdef, config), slots=0)


def test_stacked_layers_refill_their_rows():
  """scan_layers keeps the KV cache as [layers, batch, ...]: refill takes and puts rows on
  its batch axis."""
  config = get_preset("tiny", scan_layers=True)
  graphdef, params = nnx.split(create_model(config, seed=2))
  sampler = Sampler(graphdef, config, temperature=0.0)
  static = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(0))
  out = ContinuousBatcher(sampler, slots=2, chunk_steps=4).generate(
      params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(0))
  assert out.tokens == static.tokens


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0, top_k=20)])
def test_stop_strings_cut_like_static_batching(model, settings):
  """Rows whose text holds a stop string are cut at the shortest prefix holding it and their
  slots freed; the outputs equal static batching's, request by request."""
  config, graphdef, params = model
  sampler = Sampler(graphdef, config, chunk_steps=4, **settings)
  free = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(2))
  text = CharTokenizer().decode(free.tokens[6])
  stops = [text[9:11], CharTokenizer().decode(free.tokens[1][4:6])]  # straddle tokens
  static = sampler.generate(params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(2),
                            stop_strings=stops, tokenizer=CharTokenizer())
  assert static.stop_reason.count("stop_string") >= 2
  out = ContinuousBatcher(sampler, slots=3, chunk_steps=8).generate(
      params, PROMPTS, max_new_tokens=LIMITS, rng=jax.random.key(2), stop_strings=stops,
      tokenizer=CharTokenizer())
  assert out.tokens == static.tokens and out.stop_reason == static.stop_reason
  assert out.lengths == static.lengths
  for a, b in zip(static.logprobs, out.logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)


def _rigged_tool_model():
  """The tool-loop test's rigged model: most of its mass on `<tool_call>`, `</tool_call>` and
  `<|im_end|>`, so that it opens calls, ends turns and gets error responses injected."""
  import jax.numpy as jnp

  from wakea_jax.data.tokenizer import IM_END, default_tokenizer
  tok = default_tokenizer()
  cfg = get_preset("tiny", vocab_size=1024, max_seq_len=2048)
  m = create_model(cfg, seed=0)
  m.embed[...] = m.embed[...].at[:, 0].add(10.0)
  favoured = [tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>"),
              tok.token_to_id(IM_END)]
  head = np.full(cfg.vocab_size, -8.0, np.float32)
  head[favoured] = [2.5, 0.5, 0.5]
  m.lm_head[...] = m.lm_head[...].at[0].set(jnp.asarray(head) / np.sqrt(cfg.embed_dim))
  graphdef, params = nnx.split(m)
  return tok, cfg, graphdef, params


@pytest.mark.parametrize("slots", [2, 5])
def test_tool_pauses_free_slots_like_the_static_tool_loop(slots):
  """A row that pauses for a tool call gives up its slot; when the result is back the request
  is prefilled again from its whole context into a free slot and goes on drawing with its own
  key: tokens, masks, calls and reasons equal `run_tool_loop`'s, log-probs within 1e-5."""
  from wakea_jax.data import chat
  from wakea_jax.sampling.tool_loop import run_tool_loop
  from wakea_jax.toolbox.registry import default_router
  tok, cfg, graphdef, params = _rigged_tool_model()
  sampler = Sampler(graphdef, cfg, temperature=1.0, stop_ids=(chat.end_of_turn_id(tok),))
  prompts = [chat.render([{"role": "user", "content": text}], tok,
                         add_generation_prompt=True).input_ids.tolist()
             for text in ("What is 23*19?", "Hi", "Compute 2+2 please", "x", "Say yes", "7*6")]
  kwargs = dict(tokenizer=tok, router=default_router(), rng=jax.random.key(3),
                max_new_tokens=24, max_tool_calls=2, max_tool_tokens=64)
  static = run_tool_loop(sampler, params, prompts, chunk_steps=4, **kwargs)
  assert sum(static.num_tool_calls) >= 3
  out = ContinuousBatcher(sampler, slots=slots, chunk_steps=4).run_tools(params, prompts,
                                                                         **kwargs)
  assert out.tokens == static.tokens
  assert out.num_tool_calls == static.num_tool_calls
  assert out.stop_reason == static.stop_reason and out.tool_errors == static.tool_errors
  for a, b in zip(static.tool_mask, out.tool_mask):
    np.testing.assert_array_equal(b, a)
  for a, b in zip(static.logprobs, out.logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)
