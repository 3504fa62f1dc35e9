"""Rollout precision: the int8 quantiser against a NumPy transcription, Int8Weight in the
matmul, and bfloat16 / int8 rollouts through the Sampler within a stated log-prob tolerance
of float32 scoring (plain, scanned, LoRA, on a mesh, and a vision- or audio-language model's
decoder, its tower and projector left as they are)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.randomise import randomise
from wakea_jax.models import lora as lora_lib
from wakea_jax.models.config import get_preset
from wakea_jax.models.int8 import Int8Weight, dequantize_int8, quantize_int8
from wakea_jax.models.layers import matmul
from wakea_jax.models.stacking import convert_layers
from wakea_jax.models.transformer import create_model
from wakea_jax.objectives.sft import token_logprobs
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling import Sampler
from wakea_jax.sampling.precision import rollout_model_for, to_rollout

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55]]
# Sampled-token |log p(rollout) - log p(float32 trainer)| on the randomised tiny model (far
# from init, peaked distributions), 3 prompts x 24 tokens; measured: bf16 mean 0.016, max
# 0.052; int8 mean 0.023, max 0.094. The bounds leave about 2-3x headroom.
TOLERANCE = {"": (1e-5, 1e-4), "bfloat16": (0.04, 0.15), "int8": (0.05, 0.25)}


def numpy_int8(w: np.ndarray, in_ndim: int) -> tuple[np.ndarray, np.ndarray]:
  """Independent transcription: per-output-channel absmax / 127, round half to even."""
  w = w.astype(np.float32)
  absmax = np.abs(w).max(axis=tuple(range(in_ndim)))
  scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
  codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return codes, scale


@pytest.mark.parametrize("shape,in_ndim", [((64, 4, 24), 1), ((4, 24, 64), 2), ((96, 64), 1)])
def test_int8_matches_numpy_and_round_trips_within_half_a_step(shape, in_ndim):
  rng = np.random.default_rng(0)
  # Channels of very different ranges, one all zero: per-channel scales must follow them.
  w = rng.standard_normal(shape).astype(np.float32)
  w = w * np.exp(rng.uniform(-4, 2, shape[in_ndim:])).astype(np.float32)
  w[(slice(None),) * in_ndim + (0,) * (len(shape) - in_ndim)] = 0.0
  codes, scale = quantize_int8(jnp.asarray(w), in_ndim)
  ref_codes, ref_scale = numpy_int8(w, in_ndim)
  assert codes.dtype == jnp.int8 and codes.shape == shape and scale.shape == shape[in_ndim:]
  codes, scale = np.asarray(codes), np.asarray(scale)
  # XLA multiplies by 1/127 where NumPy divides: the scales agree to one float32 ulp, and
  # the codes are NumPy's rounding of w by the quantiser's own scale (a tie could go either
  # way between the two scales, never further).
  np.testing.assert_allclose(scale, ref_scale, rtol=2.5e-7, atol=0)
  np.testing.assert_array_equal(codes, np.clip(np.round(w / scale), -127, 127).astype(np.int8))
  assert np.abs(codes.astype(np.int32) - ref_codes).max() <= 1
  assert codes.min() >= -127                            # symmetric: -128 is never used
  # Every non-zero channel reaches +-127 exactly once scaled; the zero one is exact.
  peak = np.abs(codes.astype(np.int32)).max(axis=tuple(range(in_ndim)))
  assert (peak[scale.reshape(peak.shape) != 1.0] == 127).all()
  back = np.asarray(dequantize_int8(jnp.asarray(codes), jnp.asarray(scale)))
  err = np.abs(back - w)
  assert (err <= scale / 2 * (1 + 1e-6) + 1e-30).all()   # round to nearest: half a step
  assert back[(slice(None),) * in_ndim + (0,) * (len(shape) - in_ndim)].max() == 0.0


@pytest.mark.parametrize("equation,shape,in_ndim,x_shape", [
    ("bte,enh->btnh", (64, 4, 24), 1, (2, 3, 64)),
    ("btnh,nhe->bte", (4, 24, 64), 2, (2, 3, 4, 24)),
    ("btm,me->bte", (96, 64), 1, (2, 3, 96)),
    ("bte,enh->bnth", (64, 4, 24), 1, (2, 3, 64)),   # not the simple form: dequantized first
])
def test_int8_weight_is_the_matmul_with_the_dequantized_weight(equation, shape, in_ndim,
                                                               x_shape):
  rng = np.random.default_rng(1)
  param = nnx.Param(jnp.asarray(rng.standard_normal(shape), jnp.float32))
  weight = Int8Weight.from_param(param, in_ndim)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  got = weight(x, equation, jnp.float32)
  want = jnp.einsum(equation, x, weight.dequantize(), precision="highest")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  if "bnth" not in equation:
    np.testing.assert_allclose(np.asarray(matmul(x, weight.dequantize(), equation)),
                               np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  config = get_preset("tiny")
  model = create_model(config)
  randomise(model, seed=3)
  return model


@jax.jit
def _full_forward(model, ids):
  return model(ids)


def _gaps(reference, graphdef, config, params, **sampler):
  """|sampled-token log p of the rollout sampler - the float32 reference's| over all rows."""
  out = Sampler(graphdef, config, temperature=1.0, **sampler).generate(
      params, PROMPTS, max_new_tokens=24, rng=jax.random.key(1))
  gaps = []
  for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
    n = len(prompt) + len(tokens)
    ids = jnp.asarray([prompt + tokens + [0] * (64 - n)], jnp.int32)
    ref = token_logprobs(_full_forward(reference, ids)[:, :-1], ids[:, 1:])
    gaps.append(np.abs(np.asarray(ref[0, len(prompt) - 1:n - 1]) - logprobs))
  return np.concatenate(gaps)


@pytest.mark.parametrize("dtype", ["", "bfloat16", "int8"])
def test_rollout_logprobs_within_tolerance_of_float32(tiny, dtype):
  graphdef, params = nnx.split(tiny)
  r_graphdef, r_params, r_config = to_rollout(graphdef, params, dtype)
  kinds = {str(x.dtype) for x in jax.tree.leaves(r_params)}
  assert kinds == {"": {"float32"}, "bfloat16": {"bfloat16"}, "int8": {"int8", "float32"}}[dtype]
  assert r_config.dtype == ("bfloat16" if dtype == "bfloat16" else "float32")
  gaps = _gaps(tiny, r_graphdef, r_config, r_params)
  mean_bound, max_bound = TOLERANCE[dtype]
  print(f"rollout {dtype or 'float32'}: mean |gap| {gaps.mean():.4f}, max {gaps.max():.4f}")
  assert gaps.mean() < mean_bound and gaps.max() < max_bound
  if dtype:
    assert gaps.max() > 1e-4          # the rollout really runs other numerics


def test_int8_stores_the_seven_projections_in_int8():
  config = get_preset("tiny")
  graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(config)))
  rollout = rollout_model_for(graphdef, params, "int8")
  state = jax.eval_shape(rollout.convert, params)          # shapes only
  codes = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int8]
  assert len(codes) == 7 * config.num_layers
  assert sum(x.size for x in codes) == config.num_layers * (
      config.embed_dim * (2 * config.num_heads + 2 * config.num_kv_heads) * config.head_dim
      + 3 * config.embed_dim * config.mlp_dim)
  floats = {str(x.dtype) for x in jax.tree.leaves(state) if x.dtype != jnp.int8}
  assert floats == {"float32"}          # embedding, LM head, norms and scales


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_scanned_and_lora_models_give_the_plain_models_rollout(tiny, dtype):
  """A scan_layers model, and a LoRA model (adapters with a non-zero B, merged first), give
  the rollout params of the plain looped model holding the same (merged) weights."""
  graphdef, params = nnx.split(tiny)
  want = _rollout(graphdef, params, dtype)

  scanned = convert_layers(tiny, scan_layers=True)
  s_graphdef, s_config, s_params = _rollout(*nnx.split(scanned), dtype)
  assert s_config.scan_layers
  looped = convert_layers(nnx.merge(s_graphdef, s_params), scan_layers=False)
  _assert_same_state(nnx.state(looped), want[2])
  assert _gaps(tiny, s_graphdef, s_config, s_params).mean() < TOLERANCE[dtype][0]

  adapted = nnx.clone(tiny)
  lora_lib.apply_lora(adapted, lora_lib.LoRAConfig(rank=4), rngs=nnx.Rngs(0))
  lora = nnx.state(adapted, nnx.LoRAParam)
  nnx.update(adapted, jax.tree.map(lambda x: x + 0.05, lora))      # B != 0: a real delta
  merged = lora_lib.merge_lora(adapted)
  a_graphdef, a_params = nnx.split(adapted)
  m_graphdef, m_params = nnx.split(merged)
  a_rollout, m_rollout = _rollout(a_graphdef, a_params, dtype), _rollout(m_graphdef, m_params,
                                                                         dtype)
  assert a_rollout[0] == m_rollout[0] == want[0]
  _assert_same_state(a_rollout[2], m_rollout[2])
  assert _gaps(merged, *a_rollout).mean() < TOLERANCE[dtype][0]


def _assert_same_state(a, b):
  a, b = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(np.asarray(a[path].get_value()),
                                  np.asarray(b[path].get_value()), err_msg=str(path))


def _rollout(graphdef, params, dtype):
  r_graphdef, r_params, r_config = to_rollout(graphdef, params, dtype)
  return r_graphdef, r_config, r_params


def test_rollout_params_on_a_mesh_are_laid_out_by_logical_axes(tiny):
  graphdef, params = nnx.split(tiny)
  mesh = mesh_lib.create_mesh((2, 2, 2))
  sharded = mesh_lib.shard_state(params, mesh)
  rollout = rollout_model_for(graphdef, sharded, "int8", mesh=mesh)
  out = rollout.convert(sharded)
  want = mesh_lib.state_shardings(out, mesh)
  for got, spec in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    assert got.sharding == spec
  gaps = _gaps(tiny, rollout.graphdef, rollout.config, out, mesh=mesh)
  assert gaps.mean() < TOLERANCE["int8"][0]


@pytest.mark.parametrize("kind,dtype", [("vision", "bfloat16"), ("vision", "int8"),
                                        ("audio", "bfloat16")])
def test_media_model_rollout_converts_the_decoder_and_still_sees_the_media(kind, dtype):
  """A vision- / audio-language model (its decoder LoRA-adapted, B != 0): the rollout model is
  one of its class with the tower and projector as the trainer holds them and the merged
  decoder converted; media prompts sample within the text tolerance of float32 scoring of
  the LoRA model with the same media, and other media change the rollout's log-probs."""
  from tests.models.test_media import P, _audio_model, _vision_model
  from tests.sampling.test_media_prompts import _reference

  model = (_vision_model if kind == "vision" else _audio_model)(seed=4)
  lora_lib.apply_lora(model.language_model, lora_lib.LoRAConfig(rank=4), rngs=nnx.Rngs(0))
  nnx.update(model, jax.tree.map(lambda x: x + 0.05, nnx.state(model, nnx.LoRAParam)))
  rng = np.random.default_rng(5)
  if kind == "vision":
    prompts = [[3] + [P] * 4 + [4, 5], [6, 7] + [P] * 4 + [8]]
    media = {"pixel_values": rng.standard_normal((2, 1, 3, 16, 16)).astype(np.float32),
             "image_mask": np.ones((2, 1), np.int32)}
  else:
    prompts = [[3] + [P] * 4 + [4, 5], [6, 7] + [P] * 4 + [8]]
    media = {"input_features": rng.standard_normal((2, 1, 8, 16)).astype(np.float32),
             "feature_attention_mask": np.ones((2, 1, 16), np.int32)}
  r_graphdef, r_params, r_config = to_rollout(*nnx.split(model), dtype)
  rollout = nnx.merge(r_graphdef, r_params)
  assert type(rollout) is type(model) and rollout.config.text == r_config
  for part in ("vision_tower" if kind == "vision" else "audio_tower", "projector"):
    _assert_same_state(nnx.state(getattr(rollout, part)), nnx.state(getattr(model, part)))
  kinds = {str(x.dtype) for x in jax.tree.leaves(nnx.state(rollout.language_model))}
  assert kinds == ({"bfloat16"} if dtype == "bfloat16" else {"int8", "float32"})
  sampler = Sampler(r_graphdef, r_config, temperature=1.0)
  out = sampler.generate(r_params, prompts, max_new_tokens=12, rng=jax.random.key(1),
                         media=media)
  gaps = []
  for i, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
    # Each row alone, up to its first sampled placeholder id: the full forward would take a
    # sampled one for a media slot (the sampler embeds it as text).
    n = len(tokens) if P not in tokens else tokens.index(P) + 1
    seq = prompt + tokens[:n]
    ids = jnp.asarray([seq + [0] * (32 - len(seq))], jnp.int32)
    _, want = _reference(model, ids, {k: v[i:i + 1] for k, v in media.items()})
    gaps.append(np.abs(np.asarray(want[0, len(prompt) - 1:len(seq) - 1]) - out.logprobs[i][:n]))
  gaps = np.concatenate(gaps)
  print(f"{kind} rollout {dtype}: mean |gap| {gaps.mean():.4f}, max {gaps.max():.4f}")
  # Measured: vision bf16 mean 0.019, max 0.25; int8 mean 0.023, max 0.31; audio bf16 mean
  # 0.004, max 0.01 (the text model's mean bounds; the randomised tower peaks some tokens).
  assert 1e-4 < gaps.max() < 0.6 and gaps.mean() < TOLERANCE[dtype][0]
  other = {k: (v + 1.0 if v.dtype == np.float32 else v) for k, v in media.items()}
  moved = sampler.generate(r_params, prompts, max_new_tokens=12, rng=jax.random.key(1),
                           media=other)
  assert any(a != b or np.abs(x - y).max() > 1e-2
             for a, b, x, y in zip(moved.tokens, out.tokens, moved.logprobs, out.logprobs))
