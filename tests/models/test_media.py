"""The per-row media layout and `bind_media`: a text objective on a multimodal model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax.models.audio import AudioEncoderConfig
from wakea_jax.models.config import get_preset
from wakea_jax.models.media import bind_media, with_media
from wakea_jax.models.multimodal import (
    AudioLanguageConfig,
    AudioLanguageModel,
    VisionLanguageConfig,
    VisionLanguageModel,
)
from wakea_jax.models.projector import ProjectorConfig
from wakea_jax.models.vision import VisionConfig
from wakea_jax.objectives.sft import sft_loss_fn

P = 99


def _vision_model(seed=0, **text_fields):
  text = get_preset("tiny", num_layers=1, **text_fields)
  vision = VisionConfig(variant="clip", embed_dim=16, mlp_dim=32, num_layers=2, num_heads=2,
                        image_size=16, patch_size=8)
  config = VisionLanguageConfig(text=text, vision=vision,
                                projector=ProjectorConfig(in_dim=16, out_dim=text.embed_dim),
                                image_token_id=P)
  model = nnx.eval_shape(lambda: VisionLanguageModel(config, rngs=nnx.Rngs(0)))
  randomise(model, seed=seed)
  return model


def _audio_model(seed=0):
  config = AudioLanguageConfig(
      text=get_preset("tiny", num_layers=1),
      audio=AudioEncoderConfig(num_mel_bins=8, d_model=16, encoder_layers=1,
                               encoder_attention_heads=2, encoder_ffn_dim=32,
                               max_source_positions=8, avg_pool=True), audio_token_id=P)
  model = nnx.eval_shape(lambda: AudioLanguageModel(config, rngs=nnx.Rngs(0)))
  randomise(model, seed=seed)
  return model


def test_per_row_images_fill_each_rows_placeholders():
  """Row 0 has two images, row 1 one (and a padding image): the per-row layout gives the
  logits of the flat layout holding the three real images in order."""
  model = _vision_model()
  tokens = model.config.image_tokens                      # 4 per 16x16 image (CLS dropped)
  row0 = [3] + [P] * tokens + [4] + [P] * tokens + [5]
  row1 = [6, 7] + [P] * tokens + [8] + [0] * (len(row0) - tokens - 3)
  ids = jnp.asarray([row0, row1], jnp.int32)
  images = np.random.default_rng(0).standard_normal((2, 2, 3, 16, 16)).astype(np.float32)
  mask = np.asarray([[1, 1], [1, 0]], np.int32)
  flat = model(ids, jnp.asarray(images.reshape(4, 3, 16, 16)[:3]))
  bound = bind_media(model, {"pixel_values": images, "image_mask": mask})
  np.testing.assert_allclose(bound(ids), flat, atol=1e-5)
  # The padding image's pixels do not matter; a real image's do (row 0's second only).
  other = images.copy()
  other[1, 1] += 5.0
  np.testing.assert_array_equal(
      bind_media(model, {"pixel_values": other, "image_mask": mask})(ids), bound(ids))
  other = images.copy()
  other[0, 1] += 5.0
  changed = bind_media(model, {"pixel_values": other, "image_mask": mask})(ids)
  np.testing.assert_array_equal(changed[1], bound(ids)[1])
  assert np.abs(changed[0, 2 + tokens:] - bound(ids)[0, 2 + tokens:]).max() > 1e-3


def test_sft_loss_with_media_equals_the_loss_on_fused_embeddings():
  model = _vision_model()
  tokens = model.config.image_tokens
  ids = np.asarray([[3] + [P] * tokens + [4, 5, 6], [7] + [P] * tokens + [8, 9, 10]], np.int32)
  images = np.random.default_rng(1).standard_normal((2, 1, 3, 16, 16)).astype(np.float32)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": (ids[:, 1:] != P).astype(np.float32),
           "pixel_values": images, "image_mask": np.ones((2, 1), np.int32)}
  graphdef, params = nnx.split(model)
  loss = jax.jit(lambda p, b: with_media(sft_loss_fn)(nnx.merge(graphdef, p), b,
                                                     jax.random.key(0)))
  loss_sum, sums = loss(params, batch)
  # Independent: full logits of the flat-layout model, NumPy cross-entropy.
  logits = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(images[:, 0])),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss_sum), (nll * batch["loss_mask"]).sum(), rtol=1e-5)
  assert float(sums["weight"]) == batch["loss_mask"].sum()
  # Gradients reach the vision tower and the projector through the loss.
  grads = jax.grad(lambda p: loss(p, batch)[0])(params)
  for part in ("vision_tower", "projector"):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[part]))
    assert norm > 0, part


def test_padding_clips_give_no_tokens_and_text_models_refuse_media():
  model = _audio_model()
  clips = np.random.default_rng(2).standard_normal((1, 2, 8, 16)).astype(np.float32)
  frames = np.zeros((1, 2, 16), np.int32)
  frames[0, 0] = 1                                        # one real clip: 4 tokens
  ids = jnp.asarray([[3] + [P] * 4 + [4, 5]], jnp.int32)
  out = bind_media(model, {"input_features": clips, "feature_attention_mask": frames})(ids)
  np.testing.assert_allclose(out, model(ids, jnp.asarray(clips[0, :1]),
                                        jnp.asarray(frames[0, :1])), atol=1e-5)
  assert np.isfinite(out).all()
  with pytest.raises(ValueError, match=r"the batch has \['image_mask', 'pixel_values'\]"):
    bind_media(model, {"pixel_values": clips, "image_mask": frames})
  with pytest.raises(ValueError, match=r"takes text only"):
    bind_media(model.language_model, {"input_features": clips})
