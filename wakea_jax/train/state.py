"""The train state: a pytree of arrays that the jitted step donates and returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """step, trainable parameters, frozen state (e.g. a LoRA base), optimizer state, RNG.

  `rng` holds raw key data (uint32) rather than a typed key so that it checkpoints as a
  plain array. Everything here lives on the mesh and is donated to the step.
  """

  step: Array
  params: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  rng: Array

  def replace(self, **changes: Any) -> TrainState:
    """Returns a copy with the given fields replaced (the state is frozen)."""
    return dataclasses.replace(self, **changes)


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param
                ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable state, everything else)."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  return graphdef, params, frozen


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                       trainable: nnx.filterlib.Filter = nnx.Param, seed: int = 0
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits `model` and initialises the optimizer on its trainable part.

  The optimizer state is created under jit so it inherits the parameters' shardings.
  """
  graphdef, params, frozen = split_model(model, trainable)
  if not jax.tree.leaves(params):
    raise ValueError("the model has no trainable parameters under the given filter")
  opt_state = jax.jit(optimizer.init)(params)
  rng = jax.random.key_data(jax.random.key(seed))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                     opt_state=opt_state, rng=rng)
  return graphdef, _replicate_strays(state)


def _replicate_strays(state: TrainState) -> TrainState:
  """Puts leaves created outside the mesh (step, RNG, optimizer counters) on it, replicated.

  The jitted step needs every argument on the same devices; its out_shardings are taken
  from this state.
  """
  meshes = {x.sharding.mesh for x in jax.tree.leaves(state.params)
            if isinstance(x.sharding, jax.sharding.NamedSharding)}
  if not meshes:
    return state
  if len(meshes) > 1:
    raise ValueError("trainable parameters live on more than one mesh")
  replicated = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec())

  def place(x: Array) -> Array:
    if isinstance(x.sharding, jax.sharding.NamedSharding):
      return x
    return jax.device_put(x, replicated)

  return jax.tree.map(place, state)


def state_shardings(state: TrainState) -> Any:
  """The current shardings of every leaf (used as the step's out_shardings)."""
  return jax.tree.map(lambda x: x.sharding, state)

