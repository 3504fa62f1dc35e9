"""Sampler prompts with images and audio (per-row media, `Sampler.start(media=)`): greedy
tokens and log-probs equal a full forward of `bind_media(model, media)` on prompt +
completion, the media matter, a padding image changes nothing, and the multimodal graphdef
decodes and injects text like a text decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models.test_media import _audio_model, _vision_model
from wakea_jax.models import scoring
from wakea_jax.models.media import bind_media
from wakea_jax.sampling import Sampler

P = 99          # the placeholder id
WIDTH = 32      # reference forwards: every sequence right-padded to this (one compile)
NEW = 6


@pytest.fixture(scope="module")
def vision():
  return _vision_model(seed=4)


@pytest.fixture(scope="module")
def audio():
  return _audio_model(seed=4)


@jax.jit
def _reference(model, ids, media):
  """(logits [b, W, vocab], trainer log-probs [b, W - 1]) of `bind_media(model, media)`."""
  bound = bind_media(model, media)
  scores = scoring.score_tokens(bound, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
  return bound(ids), scores.logprobs


def _check_against_full_forward(model, prompts, media, out):
  """Each row's greedy tokens are the argmax of a full forward of its prompt + completion,
  and its log-probs are the trainer's scores of them (within 1e-5)."""
  seqs = [list(p) + t for p, t in zip(prompts, out.tokens)]
  ids = jnp.asarray([s + [0] * (WIDTH - len(s)) for s in seqs], jnp.int32)
  logits, logprobs = _reference(model, ids, media)
  for i, p in enumerate(prompts):
    at = np.arange(len(p) - 1, len(seqs[i]) - 1)      # positions that predict the completion
    assert np.asarray(jnp.argmax(logits[i, at], -1)).tolist() == out.tokens[i]
    np.testing.assert_allclose(out.logprobs[i], np.asarray(logprobs[i, at]), atol=1e-5)


def test_image_prompts_greedy_logprobs_padding_image_and_inject(vision):
  model = vision
  n = model.config.image_tokens                                # 4 per 16x16 image
  prompts = [[3] + [P] * n + [4, 5], [6] + [P] * n + [7] + [P] * n + [8]]
  images = np.random.default_rng(0).standard_normal((2, 2, 3, 16, 16)).astype(np.float32)
  mask = np.asarray([[1, 0], [1, 1]], np.int32)                # row 0: one padding image
  media = {"pixel_values": images, "image_mask": mask}
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, model.config, temperature=0.0)   # the multimodal config
  assert sampler.config == model.config.text
  text_prefills = Sampler.prefill._cache_size()
  out = sampler.generate(params, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                         media=media)
  assert out.lengths == [NEW, NEW]
  _check_against_full_forward(model, prompts, media, out)
  assert Sampler.prefill._cache_size() == text_prefills        # the text prefill untouched
  # Each prompt alone (row 0 with no padding image) samples what it sampled in the batch.
  for i, k in enumerate((1, 2)):
    alone = sampler.generate(params, [prompts[i]], max_new_tokens=NEW, rng=jax.random.key(0),
                             media={"pixel_values": images[i:i + 1, :k],
                                    "image_mask": mask[i:i + 1, :k]})
    assert alone.tokens[0] == out.tokens[i]
    np.testing.assert_allclose(alone.logprobs[0], out.logprobs[i], atol=1e-5)
  # The image matters: another first image changes row 0's log-probs, not row 1's.
  other = images.copy()
  other[0, 0] = np.random.default_rng(1).standard_normal((3, 16, 16))
  changed = sampler.generate(params, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                             media={"pixel_values": other, "image_mask": mask})
  assert changed.tokens[1] == out.tokens[1]
  assert (changed.tokens[0] != out.tokens[0]
          or np.abs(changed.logprobs[0] - out.logprobs[0]).max() > 1e-3)
  # Text injected mid-generation (a tool turn) into row 0 attends to the image in the cache.
  state = sampler.start(params, prompts, max_new_tokens=NEW + 2, rng=jax.random.key(0),
                        media=media)
  state = sampler.decode(params, state, jnp.asarray(3, jnp.int32))
  inject = jnp.asarray([[11, 12], [0, 0]], jnp.int32)
  state = sampler.inject(params, state, inject, jnp.asarray([[1, 1], [0, 0]], jnp.int32))
  state = sampler.decode(params, state, jnp.asarray(3, jnp.int32))
  tokens = np.asarray(state.tokens)
  assert tokens[0, :3].tolist() == out.tokens[0][:3]
  row0 = prompts[0] + out.tokens[0][:3] + [11, 12]
  ids = jnp.asarray([row0 + [0] * (WIDTH - len(row0)), [0] * WIDTH], jnp.int32)
  logits, _ = _reference(model, ids, {"pixel_values": images, "image_mask": mask * [[1, 0]]})
  expect = []
  for _ in range(3):   # greedy continuation of the full forward, step by step
    expect.append(int(jnp.argmax(logits[0, len(row0) + len(expect) - 1])))
    if len(expect) < 3:
      seq = row0 + expect
      ids = ids.at[0, :len(seq)].set(jnp.asarray(seq))
      logits, _ = _reference(model, ids, {"pixel_values": images,
                                          "image_mask": mask * [[1, 0]]})
  assert tokens[0, 3:6].tolist() == expect


def test_audio_prompts_greedy_and_logprobs(audio):
  model = audio
  rng = np.random.default_rng(2)
  features = rng.standard_normal((2, 2, 8, 16)).astype(np.float32)
  frames = np.zeros((2, 2, 16), np.int32)
  frames[0, 0] = 1                   # row 0: one 16-frame clip (4 tokens), one padding clip
  frames[1, 0] = 1
  frames[1, 1, :10] = 1              # row 1: 4 + 2 tokens
  prompts = [[3] + [P] * 4 + [4, 5], [6] + [P] * 4 + [7] + [P] * 2 + [8]]
  media = {"input_features": features, "feature_attention_mask": frames}
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, model.config.text, temperature=0.0)
  out = sampler.generate(params, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                         media=media)
  _check_against_full_forward(model, prompts, media, out)
  # The audio matters: row 1's second clip changed, row 1's log-probs change, row 0's not.
  other = features.copy()
  other[1, 1] += 2.0
  changed = sampler.generate(params, prompts, max_new_tokens=NEW, rng=jax.random.key(0),
                             media={"input_features": other, "feature_attention_mask": frames})
  np.testing.assert_array_equal(changed.logprobs[0], out.logprobs[0])
  assert (changed.tokens[1] != out.tokens[1]
          or np.abs(changed.logprobs[1] - out.logprobs[1]).max() > 1e-3)


def test_media_rows_must_match_the_prompts(audio):
  graphdef, params = nnx.split(audio)
  sampler = Sampler(graphdef, audio.config.text, temperature=0.0)
  with pytest.raises(ValueError, match=r"media\['input_features'\] has shape \(1, 8, 16\)"):
    sampler.start(params, [[3, 4], [5]], max_new_tokens=2, rng=jax.random.key(0),
                  media={"input_features": np.zeros((1, 8, 16), np.float32)})


def _image_prompts(n_images, rng, body=lambda i: [3 + i, 4]):
  """Prompts of 1 or 2 images each ([first token] + P x 4 per image + body) and their media."""
  n = 4                                                        # tokens per 16x16 image
  prompts, images = [], rng.standard_normal((len(n_images), 2, 3, 16, 16)).astype(np.float32)
  mask = np.zeros((len(n_images), 2), np.int32)
  for i, k in enumerate(n_images):
    mask[i, :k] = 1
    prompts.append(([5] + [P] * n) * k + body(i))
  return prompts, {"pixel_values": images, "image_mask": mask}


def test_continuous_batching_with_images_equals_static_batching(vision):
  """`ContinuousBatcher` with per-row images: 6 requests of 1 or 2 images through 2 slots
  (so requests start in whichever slot frees, beside others at other steps), sampled at
  temperature 1 with per-request keys: every request's tokens are those `Sampler.generate`
  draws for it, log-probs within 1e-5, and greedy tokens are a full forward's argmax with its
  images. Another image changes only its own request."""
  from wakea_jax.sampling import ContinuousBatcher
  graphdef, params = nnx.split(vision)
  prompts, media = _image_prompts([1, 2, 1, 2, 2, 1], np.random.default_rng(5))
  limits = [NEW, 2, NEW, 3, NEW, 1]
  for temperature in (1.0, 0.0):
    sampler = Sampler(graphdef, vision.config, temperature=temperature)
    static = sampler.generate(params, prompts, max_new_tokens=limits, rng=jax.random.key(7),
                              media=media)
    out = ContinuousBatcher(sampler, slots=2, chunk_steps=2).generate(
        params, prompts, max_new_tokens=limits, rng=jax.random.key(7), media=media)
    assert out.tokens == static.tokens and out.lengths == limits
    for a, b in zip(static.logprobs, out.logprobs):
      np.testing.assert_allclose(b, a, atol=1e-5)
  _check_against_full_forward(vision, prompts, media, out)      # greedy, the last loop
  other = {k: v.copy() for k, v in media.items()}
  other["pixel_values"][2] = np.random.default_rng(6).standard_normal((2, 3, 16, 16))
  changed = ContinuousBatcher(sampler, slots=2, chunk_steps=2).generate(
      params, prompts, max_new_tokens=limits, rng=jax.random.key(7), media=other)
  for i in (0, 1, 3, 4, 5):
    np.testing.assert_allclose(changed.logprobs[i], out.logprobs[i], atol=1e-6)
  assert (changed.tokens[2] != out.tokens[2]
          or np.abs(changed.logprobs[2] - out.logprobs[2]).max() > 1e-3)
  with pytest.raises(ValueError, match=r"media\['image_mask'\] has shape \(5, 2\)"):
    ContinuousBatcher(sampler, slots=2).generate(
        params, prompts, max_new_tokens=2, rng=jax.random.key(7),
        media={**media, "image_mask": media["image_mask"][:5]})


def test_tool_pauses_with_images_resume_like_the_static_tool_loop(vision):
  """The tool loop on image prompts, continuous against static: a request that pauses for a
  tool call gives up its slot and, when the result is back, is prefilled again from its whole
  context, its images included, into whichever slot is free. The model's language head is
  rigged towards `<tool_call>`, `</tool_call>` and the end of turn (as in
  tests/sampling/test_batching.py), so that calls happen; tokens, masks, calls and reasons
  equal `run_tool_loop`'s, log-probs within 1e-5."""
  import jax.numpy as jnp

  from wakea_jax.data import chat
  from wakea_jax.data.tokenizer import IM_END, default_tokenizer
  from wakea_jax.sampling import ContinuousBatcher
  from wakea_jax.sampling.tool_loop import run_tool_loop
  from wakea_jax.toolbox.registry import default_router
  tok = default_tokenizer()
  model = _vision_model(seed=4, vocab_size=tok.vocab_size)     # the chat turns' ids
  lm = model.language_model
  lm.embed[...] = lm.embed[...].at[:, 0].add(10.0)
  lm.final_norm.scale[...] = jnp.ones_like(lm.final_norm.scale[...])   # randomise's: any sign
  head = np.full(lm.config.vocab_size, -8.0, np.float32)
  head[[tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>"),
        tok.token_to_id(IM_END)]] = [2.5, 0.5, 0.5]
  lm.lm_head[...] = lm.lm_head[...].at[0].set(jnp.asarray(head) / np.sqrt(lm.config.embed_dim))
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, model.config, temperature=1.0, stop_ids=(chat.end_of_turn_id(tok),))
  turns = [chat.render([{"role": "user", "content": text}], tok,
                       add_generation_prompt=True).input_ids.tolist()
           for text in ("What is 23*19?", "Hi", "Compute 2+2 please", "x", "7*6")]
  prompts, media = _image_prompts([1, 2, 1, 1, 2], np.random.default_rng(8),
                                  body=lambda i: turns[i])
  kwargs = dict(tokenizer=tok, router=default_router(), rng=jax.random.key(3),
                max_new_tokens=24, max_tool_calls=2, max_tool_tokens=24, media=media)
  static = run_tool_loop(sampler, params, prompts, chunk_steps=4, **kwargs)
  assert sum(static.num_tool_calls) >= 3
  out = ContinuousBatcher(sampler, slots=2, chunk_steps=4).run_tools(params, prompts, **kwargs)
  assert out.tokens == static.tokens and out.num_tool_calls == static.num_tool_calls
  assert out.stop_reason == static.stop_reason and out.tool_errors == static.tool_errors
  for a, b in zip(static.tool_mask, out.tool_mask):
    np.testing.assert_array_equal(b, a)
  for a, b in zip(static.logprobs, out.logprobs):
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_search_protocol_pauses_with_images_resume_like_a_full_forward(vision):
  """A search protocol (`ContinuousBatcher.run_protocol(media=)`) on image prompts: a row that
  writes the protocol's pause string gives up its slot, the response goes into its context
  (masked), and it is prefilled again from prompt + turn + response with its images, in
  whichever slot frees. Its own tokens then score as a full forward of the whole sequence
  with its images scores them (within 1e-5): the resumed row still sees its images."""
  from tests.sampling.test_protocols import EchoProtocol
  from tests.toy import CharTokenizer
  from wakea_jax.sampling import ContinuousBatcher
  graphdef, params = nnx.split(vision)
  prompts, media = _image_prompts([1, 2, 2, 1], np.random.default_rng(9))
  sampler = Sampler(graphdef, vision.config, temperature=1.0)
  free = sampler.generate(params, prompts, max_new_tokens=12, rng=jax.random.key(2),
                          media=media)
  protocol = EchoProtocol(CharTokenizer().decode(free.tokens[0][2:4]))  # row 0 writes it
  out = ContinuousBatcher(sampler, slots=2, chunk_steps=3).run_protocol(
      params, prompts, protocol, rng=jax.random.key(2), max_new_tokens=12, media=media)
  assert out.num_tool_calls[0] >= 1
  seqs = [list(p) + t for p, t in zip(prompts, out.tokens)]
  ids = jnp.asarray([s + [0] * (WIDTH - len(s)) for s in seqs], jnp.int32)
  _, logprobs = _reference(vision, ids, media)
  for i, p in enumerate(prompts):
    at = np.arange(len(p) - 1, len(seqs[i]) - 1)
    own = out.tool_mask[i] == 0
    np.testing.assert_allclose(out.logprobs[i][own], np.asarray(logprobs[i, at])[own],
                               atol=1e-5)
  # Without its images, the same row's tokens score otherwise: the check can fail.
  blind = {**media, "image_mask": np.zeros_like(media["image_mask"])}
  _, other = _reference(vision, ids, blind)
  at = np.arange(len(prompts[0]) - 1, len(seqs[0]) - 1)
  assert np.abs(out.logprobs[0] - np.asarray(other[0, at])).max() > 1e-3
