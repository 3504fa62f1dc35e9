"""Media fusion (models/multimodal.py): masked_scatter semantics, the host-side placement
checks, and packing: an example's audio never reaches another segment of its row; the LLaVA
config's checks and token counts.

Parity with transformers: tests/checkpoints/test_qwen2_audio_parity.py (Qwen2-Audio) and
test_llava_parity.py (LLaVA).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax.models.audio import AudioEncoderConfig
from wakea_jax.models.config import get_preset
from wakea_jax.models.multimodal import (
  AudioLanguageConfig,
  AudioLanguageModel,
  VisionLanguageConfig,
  check_media_placement,
  expand_placeholders,
  scatter_media,
)
from wakea_jax.models.projector import ProjectorConfig
from wakea_jax.models.vision import VisionConfig

P = 99  # the placeholder id in these tests


def _masked_scatter(embeds, placeholders, features, feature_mask):
  """torch.Tensor.masked_scatter in NumPy: placeholders in row-major order take the real
  features in item-major order."""
  out = embeds.copy()
  out[placeholders] = features[feature_mask]
  return out


def test_scatter_media_is_masked_scatter():
  rng = np.random.default_rng(0)
  embeds = rng.standard_normal((2, 9, 4)).astype(np.float32)
  features = rng.standard_normal((3, 4, 4)).astype(np.float32)
  feature_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)   # 3 + 4 + 1
  placeholders = np.zeros((2, 9), bool)
  placeholders[0, 2:5] = placeholders[0, 7:9] = placeholders[1, 0:2] = placeholders[1, 5] = True
  out = jax.jit(scatter_media)(embeds, placeholders, features, feature_mask)
  np.testing.assert_array_equal(out, _masked_scatter(embeds, placeholders, features,
                                                     feature_mask))
  # Gradients reach each real media token once and the placeholders' embeddings never.
  def total(e, f):
    return scatter_media(e, placeholders, f, feature_mask).sum()

  d_embeds, d_features = jax.jit(jax.grad(total, argnums=(0, 1)))(embeds, features)
  np.testing.assert_array_equal(d_features, np.broadcast_to(feature_mask[..., None], (3, 4, 4)))
  np.testing.assert_array_equal(d_embeds, np.broadcast_to(~placeholders[..., None], (2, 9, 4)))
  # Without a mask every token is real.
  all_real = np.zeros((2, 9), bool)
  all_real[:, :6] = True
  np.testing.assert_array_equal(
      scatter_media(embeds, all_real, features, None),
      _masked_scatter(embeds, all_real, features, np.ones((3, 4), bool)))
  with pytest.raises(ValueError, match="media features have width 4, the token embeddings 5"):
    scatter_media(np.zeros((1, 2, 5), np.float32), all_real[:1, :2], features)


def test_placement_errors_name_counts_and_items():
  ids = np.array([[1, P, P, P, 2, P, P, 3]])
  check_media_placement(ids, P, [3, 2], what="audio")
  with pytest.raises(ValueError, match=r"5 audio placeholder token\(s\) \(id 99\) in "
                     r"input_ids but 6 audio token\(s\) from 2 audio item\(s\) \(tokens per "
                     r"item: \[3, 3\]\)"):
    check_media_placement(ids, P, [3, 3], what="audio")
  # Packed: segment 1 holds 3 placeholders, segment 2 holds 2; items of 2 and 3 tokens match
  # the total but item 1 would straddle the segments (leak one example's audio into another).
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  check_media_placement(ids, P, [3, 2], segment_ids=segments)
  with pytest.raises(ValueError, match=r"item 1 \(3 tokens\) would fill placeholders in row 0 "
                     r"segment 1, row 0 segment 2"):
    check_media_placement(ids, P, [2, 3], segment_ids=segments)
  # Rows are separate examples too; placeholders in padding (segment 0) belong to none.
  rows = np.array([[P, P, 1], [P, 1, 1]])
  with pytest.raises(ValueError, match=r"item 0 \(3 tokens\) .* row 0 segment 1, row 1 "):
    check_media_placement(rows, P, [3])
  with pytest.raises(ValueError, match=r"item 1 \(1 tokens\) would fill placeholders in row 1 "
                     r"segment 0"):
    check_media_placement(rows, P, [2, 1], segment_ids=np.array([[1, 1, 1], [0, 0, 0]]))


def test_expand_placeholders_as_the_processor():
  ids = np.array([1, P, 2, 3, P, 4])
  loss_mask = np.array([0, 0, 0, 1, 1, 1])
  expanded, mask = expand_placeholders(ids, P, [3, 2], loss_mask)
  np.testing.assert_array_equal(expanded, [1, P, P, P, 2, 3, P, P, 4])
  np.testing.assert_array_equal(mask, [0, 0, 0, 0, 0, 1, 1, 1, 1])
  check_media_placement(expanded[None], P, [3, 2])
  with pytest.raises(ValueError, match=r"2 placeholder token\(s\) \(id 99\) in input_ids but 1 "
                     r"media item\(s\)"):
    expand_placeholders(ids, P, [3])


CONFIG = AudioLanguageConfig(
    text=get_preset("tiny", qkv_bias=True, num_layers=1),
    audio=AudioEncoderConfig(num_mel_bins=8, d_model=16, encoder_layers=1,
                             encoder_attention_heads=2, encoder_ffn_dim=32,
                             max_source_positions=8, avg_pool=True),
    audio_token_id=P)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, features, frames, segment_ids):
  return nnx.merge(graphdef, state)(ids, features, frames, segment_ids=segment_ids)


def test_packed_examples_keep_their_own_audio():
  """Two examples, each with a clip, packed in one row give each example's logits alone.
  Every call has the same shapes (one compile): an example alone is followed by padding, and
  the clip it does not use is a surplus that the jitted scatter drops."""
  # Built abstractly and filled with NumPy noise: compiling the random init costs ~14 s here.
  model = nnx.eval_shape(lambda: AudioLanguageModel(CONFIG, rngs=nnx.Rngs(0)))
  randomise(model, seed=0)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(1)
  features = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
  frames = np.ones((2, 16), np.int32)
  frames[1, 9:] = 0                                    # 9 frames -> 5 positions -> 2 tokens
  a = [3, 4] + [P] * 4 + [5, 6]                       # the full clip: 4 tokens
  b = [7, P, P, 8, 9, 10, 11, 12]
  segments = np.asarray([[1] * 8 + [2] * 8], np.int32)
  check_media_placement(np.asarray([a + b]), P, [4, 2], segment_ids=segments)

  def logits(ids, clips, clip_frames, segment_ids):
    return _logits(graphdef, state, jnp.asarray([ids], jnp.int32), clips, clip_frames,
                   jnp.asarray(segment_ids, jnp.int32))

  alone = [logits(a + [0] * 8, features, frames, [[1] * 8 + [0] * 8])[0, :8],
           logits(b + [0] * 8, features[::-1], frames[::-1], [[1] * 8 + [0] * 8])[0, :8]]
  packed = logits(a + b, features, frames, segments)
  np.testing.assert_allclose(packed[0, :8], alone[0], atol=2e-5)
  np.testing.assert_allclose(packed[0, 8:], alone[1], atol=2e-5)
  # The audio matters: another first clip changes the first example's logits only.
  changed = logits(a + b, features.at[0].multiply(-1), frames, segments)
  assert np.abs(changed[0, 2:8] - packed[0, 2:8]).min() > 0
  np.testing.assert_array_equal(changed[0, :2], packed[0, :2])
  np.testing.assert_array_equal(changed[0, 8:], packed[0, 8:])
  # Called outside jit, the model checks the placement itself.
  with pytest.raises(ValueError, match=r"5 audio placeholder token\(s\) .* but 6 audio"):
    model(jnp.asarray([a, [7, P, 8, 9, 10, 11, 12, 13]], jnp.int32), features, frames)


def test_vision_language_config_counts_and_errors():
  text = get_preset("tiny", num_layers=1)
  clip = VisionConfig(variant="clip", embed_dim=16, mlp_dim=32, num_layers=3, num_heads=2,
                      image_size=32, patch_size=8)
  mlp = ProjectorConfig(in_dim=16, out_dim=text.embed_dim)

  def config(**changes):
    return VisionLanguageConfig(**{**dict(text=text, vision=clip, projector=mlp,
                                          image_token_id=P), **changes})

  assert config().image_tokens == 16                  # 4 x 4 patches, CLS dropped
  assert config().feature_layers == (2,)              # -2 of 4 hidden states
  assert config(vision_feature_select_strategy="full").image_tokens == 17
  pooled = dataclasses.replace(mlp, pool_window=3)    # 4 x 4 -> 2 x 2
  assert config(projector=pooled).image_tokens == 4
  two = dataclasses.replace(mlp, in_dim=32)
  assert config(projector=two, vision_feature_layer=(-4, -1)).feature_layers == (0, 3)
  for changes, match in [
      (dict(vision_feature_layer=4), r"vision_feature_layer 4 is out of range for the tower's 4"),
      (dict(vision_feature_layer=[-2]), r"an int or a non-empty tuple of ints, got \[-2\]"),
      (dict(projector=two), r"projector in_dim 32 != vision embed_dim 16 x 1 feature layer"),
      (dict(image_token_id=text.vocab_size), r"image_token_id \d+ is not in the text vocab"),
      (dict(vision_feature_select_strategy="cls"), r"'default' or 'full', got 'cls'"),
      # Pooling needs a square grid: CLIP's class token must be dropped.
      (dict(projector=pooled, vision_feature_select_strategy="full"), r"17 tokens are not a "
       r"square patch grid"),
  ]:
    with pytest.raises(ValueError, match=match):
      config(**changes)
