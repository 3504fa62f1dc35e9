"""models/fused_attention.py on CPU: the "xla" path of `jax.nn.dot_product_attention` gives the
native kernel's numbers (values and gradients) for every mask the model builds, and
`choose_implementation` falls back or refuses as documented. The "cudnn" path runs the same
wrapper with implementation="cudnn"; it is measured on a GPU by tools/bench_gpu.sh."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.checkpoints import hf
from wakea_jax.models import fused_attention as fa
from wakea_jax.models import layers
from wakea_jax.models.config import ModelConfig, get_preset
from wakea_jax.models.transformer import attention_mask_for, create_model

ATOL = 1e-5


def qkv(b, t, s, n, kv, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, n, h), jnp.float32),
          jax.random.normal(keys[1], (b, s, kv, h), jnp.float32),
          jax.random.normal(keys[2], (b, s, kv, h), jnp.float32))


def both(q, k, v, mask, kv, causal, **kwargs):
  native = layers.dot_product_attention(q, k, v, mask, kv, causal=causal)
  fused = fa.fused_attention(q, k, v, mask, kv, implementation="xla", causal=causal, **kwargs)
  return np.asarray(native), np.asarray(fused)


# Packed rows: three segments, then padding (segment 0) whose queries see no key at all.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 0, 0],
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0]], np.int32)


def test_gqa_causal():
  q, k, v = qkv(2, 16, 16, 8, 2, 16)
  mask = attention_mask_for(16, None, None, 2)
  native, fused = both(q, k, v, mask, 2, causal=True)
  np.testing.assert_allclose(fused, native, atol=ATOL)


def test_long_causal_matches_the_blocked_native_kernel():
  # t > 128: the native kernel takes its blocked path; the fused one gets is_causal.
  q, k, v = qkv(1, 160, 160, 2, 1, 8)
  mask = attention_mask_for(160, None, None, 1)
  native, fused = both(q, k, v, mask, 1, causal=True)
  np.testing.assert_allclose(fused, native, atol=ATOL)


def test_packed_segments_with_padding_rows():
  b, t = SEGMENTS.shape
  q, k, v = qkv(b, t, t, 4, 2, 8)
  mask = attention_mask_for(t, jnp.asarray(SEGMENTS), None, b)
  native, fused = both(q, k, v, mask, 2, causal=True)
  np.testing.assert_allclose(fused, native, atol=ATOL)
  padding = SEGMENTS == 0
  assert np.all(fused[padding] == 0) and np.isfinite(fused).all()
  # No leak across segments: changing segment 1's keys and values leaves segments 2, 3 as is.
  seg1 = jnp.asarray(SEGMENTS == 1)[:, :, None, None]
  k2, v2 = jnp.where(seg1, k + 5.0, k), jnp.where(seg1, -v, v)
  moved = np.asarray(fa.fused_attention(q, k2, v2, mask, 2, implementation="xla", causal=True))
  later = SEGMENTS > 1
  np.testing.assert_array_equal(moved[later], fused[later])
  assert not np.allclose(moved[SEGMENTS == 1], fused[SEGMENTS == 1])


def test_right_and_left_padding():
  # Right padding through attention_mask (padding queries still see the real keys), and
  # left padding, where the first queries see no real key: both must match, zeros included.
  t = 10
  attention = np.ones((2, t), np.int32)
  attention[0, 7:] = 0      # right-padded
  attention[1, :3] = 0      # left-padded: rows 0..2 are fully masked
  q, k, v = qkv(2, t, t, 4, 4, 8, seed=1)
  mask = attention_mask_for(t, None, jnp.asarray(attention), 2)
  native, fused = both(q, k, v, mask, 4, causal=True)
  np.testing.assert_allclose(fused, native, atol=ATOL)
  assert np.all(fused[1, :3] == 0) and np.abs(fused[0, 7:]).sum() > 0


def test_right_padding_through_kv_lengths():
  # The promise kv_lengths makes: mask == causal & key < length. No mask is read then.
  t, lengths = 12, np.array([12, 7, 1], np.int32)
  attention = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  q, k, v = qkv(3, t, t, 4, 2, 8, seed=2)
  mask = attention_mask_for(t, None, jnp.asarray(attention), 3)
  native = layers.dot_product_attention(q, k, v, mask, 2, causal=True)
  fused = fa.fused_attention(q, k, v, None, 2, implementation="xla", causal=True,
                             kv_lengths=jnp.asarray(lengths))
  np.testing.assert_allclose(np.asarray(fused), np.asarray(native), atol=ATOL)


@pytest.mark.parametrize("layout", ["bskh", "bksh"])
def test_decode_shape(layout):
  # One new token per row attending to a cache of 20 slots filled to different ends, as
  # Transformer.forward builds it with a cache (slot <= the query's slot).
  s, end = 20, jnp.asarray([0, 5, 19], jnp.int32)
  q, k, v = qkv(3, 1, s, 8, 2, 16, seed=3)
  mask = jnp.arange(s)[None, None, :] <= end[:, None, None]
  native = np.asarray(layers.dot_product_attention(q, k, v, mask, 2, causal=False))
  if layout == "bksh":
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  by_mask = fa.fused_attention(q, k, v, mask, 2, implementation="xla", kv_layout=layout)
  by_length = fa.fused_attention(q, k, v, None, 2, implementation="xla", kv_layout=layout,
                                 kv_lengths=end + 1)
  np.testing.assert_allclose(np.asarray(by_mask), native, atol=ATOL)
  np.testing.assert_allclose(np.asarray(by_length), native, atol=ATOL)


def _check_gradients(segments: np.ndarray, seed: int) -> None:
  """The native kernel's float32 gradients equal jax.nn.dot_product_attention's for a causal
  mask over `segments` [b, t] (0: padding, whose queries see no key and get no gradient)."""
  b, t = segments.shape
  q, k, v = qkv(b, t, t, 4, 2, 8, seed=seed)
  mask = attention_mask_for(t, jnp.asarray(segments), None, b)
  cotangent = jax.random.normal(jax.random.key(seed + 1), q.shape)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

  native = jax.grad(loss(lambda q, k, v: layers.dot_product_attention(
      q, k, v, mask, 2, causal=True)), argnums=(0, 1, 2))(q, k, v)
  fused = jax.grad(loss(lambda q, k, v: fa.fused_attention(
      q, k, v, mask, 2, implementation="xla", causal=True)), argnums=(0, 1, 2))(q, k, v)
  for name, g_native, g_fused in zip("qkv", native, fused):
    assert np.isfinite(np.asarray(g_fused)).all(), name
    np.testing.assert_allclose(np.asarray(g_fused), np.asarray(g_native), atol=ATOL,
                               err_msg=f"d{name}")
  # Padding queries send no gradient to q.
  assert np.all(np.asarray(fused[0])[segments == 0] == 0)
  assert np.all(np.asarray(native[0])[segments == 0] == 0)


def test_gradients_match():
  _check_gradients(SEGMENTS, seed=4)


@pytest.mark.parametrize("t", [16, 136])
def test_gradients_match_on_the_head_major_and_blocked_paths(t):
  """Lengths that take the native kernel's head-major copies (a multiple of 8) and its causal
  query blocks (longer than 128), with a padded tail."""
  segments = np.ones((2, t), np.int32)
  segments[1, t - 5:] = 0
  _check_gradients(segments, seed=9)


def test_bfloat16_gradients_follow_float32():
  """The native kernel's written-out backward in bfloat16 (layers._softmax_attention): its
  gradients follow the float32 gradients of `jax.nn.dot_product_attention` (cosine > 0.999),
  and padding queries still send exactly zero gradient to q."""
  b, t = SEGMENTS.shape
  q, k, v = qkv(b, t, t, 4, 2, 8, seed=7)
  mask = attention_mask_for(t, jnp.asarray(SEGMENTS), None, b)
  cotangent = jax.random.normal(jax.random.key(8), q.shape)

  def grads(fn, dtype):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

  native = grads(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, 2, causal=True),
                 jnp.bfloat16)
  reference = grads(lambda q, k, v: fa.fused_attention(q, k, v, mask, 2, implementation="xla",
                                                       causal=True), jnp.float32)
  for name, got, want in zip("qkv", native, reference):
    assert got.dtype == jnp.bfloat16, name
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.999, name
  assert np.all(np.asarray(native[0], np.float32)[SEGMENTS == 0] == 0)


def test_bfloat16_runs_close_to_native():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 16, 16, 4, 2, 16, seed=6))
  mask = attention_mask_for(16, jnp.asarray(np.repeat([[1] * 12 + [0] * 4], 2, 0)), None, 2)
  native, fused = both(q, k, v, mask, 2, causal=True)
  assert fused.dtype == jnp.bfloat16
  np.testing.assert_allclose(fused.astype(np.float32), native.astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("value,dtype,head_dim,platform,expected", [
    ("auto", jnp.bfloat16, 64, "cuda", "cudnn"),
    ("auto", jnp.bfloat16, 64, "gpu", "cudnn"),
    ("auto", jnp.float16, 128, "cuda", "cudnn"),
    ("auto", jnp.float32, 64, "cuda", "native"),     # cuDNN is half precision only
    ("auto", jnp.bfloat16, 20, "cuda", "native"),    # head_dim not a multiple of 8
    ("auto", jnp.bfloat16, 256, "cuda", "native"),   # > 128 needs Hopper: not guessed
    ("auto", jnp.bfloat16, 64, "rocm", "native"),
    ("auto", jnp.bfloat16, 64, "cpu", "native"),
    ("auto", jnp.bfloat16, 64, "tpu", "native"),
    ("native", jnp.bfloat16, 64, "cuda", "native"),
    ("xla", jnp.float32, 24, "cpu", "xla"),
    ("cudnn", jnp.bfloat16, 256, "cuda", "cudnn"),
])
def test_choose_implementation(value, dtype, head_dim, platform, expected):
  assert fa.choose_implementation(value, dtype, head_dim, platform) == expected


@pytest.mark.parametrize("dtype,head_dim,platform,message", [
    (jnp.bfloat16, 64, "cpu", "needs an NVIDIA GPU.*'cpu'"),
    (jnp.bfloat16, 64, "rocm", "needs an NVIDIA GPU"),
    (jnp.float32, 64, "cuda", "bfloat16 or float16 only.*float32"),
    (jnp.bfloat16, 60, "cuda", "multiple of 8 .*got 60"),
    (jnp.bfloat16, 264, "cuda", "at most 256, got 264"),
])
def test_cudnn_refused_with_the_reason(dtype, head_dim, platform, message):
  with pytest.raises(ValueError, match=message):
    fa.choose_implementation("cudnn", dtype, head_dim, platform)


def test_cudnn_on_this_cpu_and_unknown_values_are_errors():
  with pytest.raises(ValueError, match="ModelConfig.attention='cudnn' needs an NVIDIA GPU"):
    fa.choose_implementation("cudnn", jnp.bfloat16, 64)   # this machine's platform: cpu
  with pytest.raises(ValueError, match=r"ModelConfig.attention must be one of .*'flash'"):
    fa.choose_implementation("flash", jnp.bfloat16, 64, "cuda")
  q, k, v = qkv(1, 4, 4, 2, 1, 8)
  mask = jnp.ones((1, 4, 4), bool)
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    fa.fused_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                       mask, 1, implementation="cudnn")
  with pytest.raises(ValueError, match="'native' is layers.dot_product_attention"):
    fa.fused_attention(q, k, v, mask, 1, implementation="native")
  with pytest.raises(ValueError, match="num_kv_heads=2"):
    fa.fused_attention(q, k, v, mask, 2, implementation="xla")


def test_model_attention_setting():
  # Through the public model: attention="xla" gives attention="native"'s logits on packed,
  # padded rows. Until layers.Attention reads ModelConfig.attention this only checks that the
  # field is accepted; the lowered program names the fused kernel's scope once it does.
  cfg = get_preset("tiny")
  ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, SEGMENTS.shape))
  segments = jnp.asarray(SEGMENTS)
  logits = {}
  for attention in ("native", "xla"):
    model = create_model(cfg.replace(attention=attention), seed=0)
    logits[attention] = np.asarray(model(ids, segment_ids=segments))
  np.testing.assert_allclose(logits["xla"], logits["native"], atol=1e-4)
  if "fused_attention" not in inspect.getsource(layers.Attention.__call__):
    pytest.skip("layers.Attention does not call fused_attention yet")
  model = create_model(cfg.replace(attention="xla"), seed=0)
  text = jax.jit(lambda ids: model(ids, segment_ids=segments)).lower(ids).as_text(
      debug_info=True)
  assert "fused_attention" in text


def test_config_field():
  cfg = get_preset("tiny")
  assert cfg.attention == "auto"
  with pytest.raises(ValueError, match=r"ModelConfig.attention must be one of \('auto', "
                                       r"'native', 'xla', 'cudnn'\), got 'flash'"):
    cfg.replace(attention="flash")
  assert ModelConfig.from_dict(cfg.replace(attention="cudnn").to_dict()).attention == "cudnn"
  # A kernel choice, not a checkpoint property: the HF config.json is the same, and a model
  # imported from one gets the default.
  assert hf.config_to_hf(cfg.replace(attention="xla")) == hf.config_to_hf(cfg)
  assert hf.config_from_hf(hf.config_to_hf(cfg)).attention == "auto"
