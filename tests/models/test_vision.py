"""The vision tower and projector without transformers: shapes, truncated depth, bfloat16,
LLaVA's feature selection, token pooling against NumPy, and config errors. (Parity with
transformers is tests/checkpoints/test_vision_parity.py.)"""

from math import erf

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.models import projector as projector_lib
from wakea_jax.models import vision

TINY = dict(embed_dim=16, mlp_dim=24, num_layers=2, num_heads=2, image_size=16, patch_size=8)


def _numpy_init(abstract: nnx.Module, seed: int) -> nnx.Module:
  """A module of `abstract`'s structure with NumPy noise (norm scales near 1): JAX's
  random init compiles one threefry kernel per parameter shape, ~1 s each on a busy CPU."""
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    noise = rng.standard_normal(var.get_value().shape)
    value = 1.0 + 0.2 * noise if "norm" in str(path[-2:]) else 0.2 * noise
    flat.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _tower(seed: int, **overrides) -> vision.VisionTower:
  return _numpy_init(vision.abstract_vision_tower(vision.VisionConfig(**TINY, **overrides)), seed)


def test_towers_shapes_depth_and_bfloat16():
  """One jit for every variant: SigLIP without a head, CLIP, a truncated run, bfloat16."""
  siglip = _tower(1, variant="siglip")
  clip = _tower(2, variant="clip", hidden_act="quick_gelu")
  bf16 = _tower(2, variant="clip", hidden_act="quick_gelu", dtype="bfloat16")
  graphs, states = zip(*(nnx.split(t) for t in (siglip, clip, bf16)))

  @jax.jit
  def run(states, pixels):
    s, c, b = (nnx.merge(g, st) for g, st in zip(graphs, states))
    return s(pixels), c(pixels), c(pixels, num_layers=1), b(pixels)

  pixels = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
  s, c, short, b = run(states, pixels)
  assert s.pooled is None and s.last_hidden_state.shape == (3, 4, 16)
  assert len(s.hidden_states) == 3 and c.hidden_states[0].shape == (3, 5, 16)
  assert c.pooled.shape == (3, 16) and c.last_hidden_state is not None
  np.testing.assert_array_equal(c.last_hidden_state, c.hidden_states[-1])  # CLIP: no post-LN
  assert len(short.hidden_states) == 2
  for a, want in zip(short.hidden_states, c.hidden_states[:2]):
    np.testing.assert_allclose(a, want, atol=1e-6)
  assert b.last_hidden_state.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(b.pooled, np.float32), c.pooled, atol=0.1, rtol=0.05)
  with pytest.raises(ValueError, match=r"\[batch, 3, 16, 16\]"):
    siglip(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="num_layers must be in"):
    clip(pixels, num_layers=3)


def test_select_features():
  hidden = tuple(jnp.full((1, 5, 2), float(i)) for i in range(4))
  out = vision.VisionOutput(last_hidden_state=hidden[-1], pooled=None, hidden_states=hidden)
  assert vision.select_features(out, -2, "default").shape == (1, 4, 2)
  assert float(vision.select_features(out, -2, "full")[0, 0, 0]) == 2.0
  both = vision.select_features(out, [1, -1], "default")
  assert both.shape == (1, 4, 4) and both[0, 0].tolist() == [1, 1, 3, 3]
  assert vision.layers_needed(3, -2) == 2 and vision.layers_needed(3, [0, -1]) == 3
  with pytest.raises(ValueError, match="out of range"):
    vision.select_features(out, 4)
  with pytest.raises(ValueError, match="'default' or 'full'"):
    vision.select_features(out, -1, "cls")
  config = vision.VisionConfig(variant="clip", **TINY)
  assert vision.num_image_tokens(config, "default") == 4
  assert vision.num_image_tokens(config, "full") == 5


def _pool_reference(x: np.ndarray, k: int) -> np.ndarray:
  b, t, e = x.shape
  g = int(round(t ** 0.5))
  grid = x.reshape(b, g, g, e)
  rows = []
  for i in range(0, g, k):
    for j in range(0, g, k):
      rows.append(grid[:, i:i + k, j:j + k].mean(axis=(1, 2)))
  return np.stack(rows, axis=1)


@pytest.mark.parametrize("grid,window", [(4, 2), (5, 2), (6, 3)])
def test_pool_tokens_matches_numpy(grid, window):
  x = np.random.default_rng(grid).standard_normal((2, grid * grid, 3)).astype(np.float32)
  np.testing.assert_allclose(projector_lib.pool_tokens(x, window), _pool_reference(x, window),
                             atol=1e-6)
  assert projector_lib.ProjectorConfig(3, 4, pool_window=window).num_tokens(grid * grid) == (
      -(-grid // window)) ** 2


def test_projector_matches_numpy_and_pools():
  config = projector_lib.ProjectorConfig(in_dim=6, out_dim=5, pool_window=2)
  proj = _numpy_init(projector_lib.abstract_projector(config), seed=3)
  flat = {p[-1]: np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(proj, nnx.Param))}
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 6)).astype(np.float32)  # a 3 x 3 grid -> 2 x 2
  pooled = _pool_reference(x, 2)
  h = pooled @ flat["linear_1"] + flat["bias_1"]
  h = h * 0.5 * (1 + np.vectorize(erf)(h / np.sqrt(2)))  # exact GELU, LLaVA's "gelu"
  want = h @ flat["linear_2"] + flat["bias_2"]
  out = proj(x)
  assert out.shape == (2, 4, 5)
  np.testing.assert_allclose(out, want, atol=1e-5)
  with pytest.raises(ValueError, match="not a square patch grid"):
    proj(np.zeros((1, 10, 6), np.float32))


def test_config_errors():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    vision.VisionConfig(**{**TINY, "image_size": 20})
  with pytest.raises(ValueError, match="use_head"):
    vision.VisionConfig(variant="clip", use_head=True, **TINY)
  with pytest.raises(ValueError, match="hidden_act"):
    vision.VisionConfig(hidden_act="relu", **TINY)
  with pytest.raises(ValueError, match="pool_window"):
    projector_lib.ProjectorConfig(in_dim=4, out_dim=4, pool_window=0)
