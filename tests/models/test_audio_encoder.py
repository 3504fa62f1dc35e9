"""Whisper / Qwen2-Audio encoder in NNX: shapes, padding masks, functional use and sharding.

Parity with transformers is tests/checkpoints/test_audio_parity.py; these need no torch.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tests.randomise import randomise
from wakea_jax.models.audio import (
  AudioEncoder,
  AudioEncoderConfig,
  AudioProjector,
  encode,
  output_lengths,
  sinusoids,
)
from wakea_jax.parallel import mesh as mesh_lib

TINY = AudioEncoderConfig(num_mel_bins=16, d_model=32, encoder_layers=2,
                          encoder_attention_heads=4, encoder_ffn_dim=48,
                          max_source_positions=12)


def _encoder(config: AudioEncoderConfig = TINY, seed: int = 0) -> AudioEncoder:
  """An encoder with NumPy noise for weights: built abstractly and filled, since compiling
  (or dispatching eagerly) ~40 random draws costs seconds on a loaded CPU."""
  encoder = nnx.eval_shape(lambda: AudioEncoder(config, rngs=nnx.Rngs(seed)))
  randomise(encoder, seed)
  return encoder


def _run(encoder: AudioEncoder, features, mask=None, output_hidden_states: bool = False):
  """encoder(features, mask) under jit (`encode`, shared with the parity tests' compiles)."""
  graphdef, state = nnx.split(encoder)
  return encode(graphdef, state, features, mask, output_hidden_states=output_hidden_states)


def _features(batch: int = 2, config: AudioEncoderConfig = TINY, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, config.num_mel_bins, config.num_frames)).astype(np.float32)


@pytest.mark.parametrize("avg_pool", [False, True])
def test_shapes_hidden_states_and_token_mask(avg_pool):
  config = TINY.replace(avg_pool=avg_pool)
  encoder = _encoder(config)
  frames = np.ones((2, config.num_frames), np.int32)
  frames[1, 9:] = 0  # 9 real frames -> 5 positions after the stride-2 conv -> 2 pooled tokens
  out = _run(encoder, _features(config=config), frames, True)
  tokens = 6 if avg_pool else 12
  assert out.last_hidden_state.shape == (2, tokens, 32) == (2, config.num_tokens, 32)
  assert len(out.hidden_states) == config.encoder_layers + 1
  assert all(h.shape == (2, 12, 32) for h in out.hidden_states[:-1])
  np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
  np.testing.assert_array_equal(np.sum(out.token_mask, axis=1), [tokens, 2 if avg_pool else 5])
  np.testing.assert_array_equal(np.sum(out.token_mask, axis=1),
                                output_lengths(np.sum(frames, axis=1), avg_pool))
  if not avg_pool:  # (the pooled variant would compile once more for the same check)
    assert _run(encoder, _features(config=config), frames).hidden_states is None


def test_padding_is_masked_only_when_a_frame_mask_is_given():
  encoder, x = _encoder(), _features()
  real = 9  # -> positions 0..4; position 4 reads conv1 outputs 7..9, i.e. frames up to 10
  mask = (np.arange(TINY.num_frames)[None] < real).astype(np.int32).repeat(2, axis=0)
  changed = x.copy()
  changed[:, :, real + 2:] += 3.0  # only frames outside the real positions' receptive field
  valid = slice(0, (real - 1) // 2 + 1)
  a = _run(encoder, x, mask).last_hidden_state[:, valid]
  b = _run(encoder, changed, mask).last_hidden_state[:, valid]
  np.testing.assert_allclose(a, b, atol=1e-5)
  # An all-ones frame mask, the same as none (HF WhisperEncoder: no masking), attends to the
  # padding (and shares the compiled function).
  ones = np.ones_like(mask)
  a = _run(encoder, x, ones).last_hidden_state[:, valid]
  b = _run(encoder, changed, ones).last_hidden_state[:, valid]
  assert np.max(np.abs(a - b)) > 1e-2


def test_batch_rows_are_independent():
  encoder, x = _encoder(), _features(2)
  mask = np.ones((2, TINY.num_frames), np.int32)
  mask[1, 15:] = 0
  together = _run(encoder, x, mask).last_hidden_state
  alone = _run(encoder, x[::-1], mask[::-1]).last_hidden_state  # same shapes: no new compile
  np.testing.assert_allclose(together[::-1], alone, atol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  encoder, x = _encoder(), _features()
  bf16 = _encoder(TINY.replace(dtype="bfloat16"))  # the same seed: the same float32 weights
  mask = np.ones((2, TINY.num_frames), np.int32)
  out = _run(bf16, x, mask).last_hidden_state
  assert out.dtype == jnp.bfloat16
  # LayerNorm output has unit scale per token; bfloat16 keeps ~2-3 significant digits.
  reference = _run(encoder, x, mask).last_hidden_state
  assert np.max(np.abs(np.asarray(out, np.float32) - reference)) < 0.25


def test_parameters_shard_by_their_logical_axes():
  mesh = mesh_lib.create_mesh((2, 2, 2))
  state = mesh_lib.shard_state(nnx.state(_encoder(), nnx.Param), mesh)
  flat = dict(nnx.to_flat_state(state))
  spec = lambda path: flat[path].get_value().sharding.spec  # noqa: E731
  assert spec(("layers", 0, "attn", "q_proj")) == PartitionSpec("fsdp", "tensor", None)
  assert spec(("layers", 0, "mlp", "up_proj")) == PartitionSpec("fsdp", "tensor")
  projector = nnx.eval_shape(lambda: AudioProjector(32, 40, rngs=nnx.Rngs(0)))
  assert nnx.eval_shape(lambda p, x: p(x), projector, jnp.ones((2, 6, 32))).shape == (2, 6, 40)


def test_sinusoids_and_config_errors():
  table = sinusoids(5, 8)
  np.testing.assert_allclose(table[0], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_allclose(table[3, 0], np.sin(3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of encoder_attention_heads"):
    TINY.replace(encoder_attention_heads=5)
  with pytest.raises(ValueError, match="activation_function"):
    TINY.replace(activation_function="relu")
  with pytest.raises(ValueError, match=r"\[batch, 16 mel bins, 24 frames\]"):
    _encoder()(np.zeros((1, 16, 30), np.float32))  # checked before any compute
