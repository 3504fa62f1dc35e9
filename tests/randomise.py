"""Weights far from the init, shared by the sampler and layer-layout tests."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomise(model: nnx.Module, seed: int) -> None:
  """Replaces every parameter with seeded noise scaled up from the init (norm scales near 1),
  in place: the logits are far from uniform, so argmax is stable and a mis-ordered layer
  shows."""
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    noise = rng.standard_normal(var.get_value().shape).astype(np.float32)
    value = 1.0 + 0.2 * noise if "norm" in str(path[-2:]) else 0.15 * noise
    flat.append((path, var.replace(jnp.asarray(value))))
  nnx.update(model, nnx.from_flat_state(flat))


def randomised_tiny(seed: int = 5):
  """The tiny preset with `randomise`d weights -> (config, graphdef, params), as the
  batching, protocol and engine tests share it."""
  from wakea_jax.models.config import get_preset
  from wakea_jax.models.transformer import create_model
  config = get_preset("tiny")
  model = create_model(config)
  randomise(model, seed=seed)
  graphdef, params = nnx.split(model)
  return config, graphdef, params
