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
