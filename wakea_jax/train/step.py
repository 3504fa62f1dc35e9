"""The jitted train and eval steps: `step(state, batch) -> (state, metrics)`.

A loss function has the signature `loss_fn(model, batch, rng) -> (loss_sum, metrics)` where
`loss_sum` is a *sum* over the micro-batch and `metrics["weight"]` its denominator (tokens for
SFT). Gradient accumulation scans over micro-batches adding sums, and divides once by the
total weight, so the update and every metric equal those of one big batch (token-weighted),
whatever the number of micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from wakea_jax.objectives.sft import sft_loss_fn
from wakea_jax.train.state import TrainState

LossFn = Callable[[nnx.Module, dict[str, Array], Array], tuple[Array, dict[str, Array]]]


def split_microbatches(batch: dict[str, Array], num: int) -> dict[str, Array]:
  """[B, ...] -> [num, B // num, ...] taking rows with stride `num`.

  Strided (not contiguous) selection keeps every micro-batch spread over all data-parallel
  shards: with the batch sharded on its first axis, row r lives on shard r // (B / shards).
  """
  def split(x: Array) -> Array:
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows cannot be split into {num} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _has_rng_state(frozen: nnx.State) -> bool:
  return any(isinstance(v, nnx.RngState)
             for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    loss_fn: LossFn = sft_loss_fn, *, accum_steps: int = 1,
                    schedule: optax.Schedule | None = None) -> Callable[..., Any]:
  """Returns an un-jitted `step(state, batch) -> (state, metrics)`; see `jit_train_step`."""
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

  def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
    chex.assert_rank(batch["input_ids"], 2)
    chex.assert_type(batch["input_ids"], int)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    reseed = _has_rng_state(state.frozen)

    def micro_loss(params, mb, rng):
      # copy=True: the merged model gets its own RNG variables, which reseeding and dropout
      # mutate inside this trace (mutating the shared frozen state would be a trace error).
      model = nnx.merge(graphdef, params, state.frozen, copy=True)
      if reseed:  # fresh dropout masks every micro-step, reproducible from (seed, step)
        nnx.reseed(model, dropout=rng)
      return loss_fn(model, mb, rng)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum_steps == 1:
      # Differentiate the normalised loss: the gradients come out divided by the weight
      # (a constant of the batch), so no second parameter-sized copy is made to divide them.
      def normalised(params, mb, rng):
        loss_sum, sums = micro_loss(params, mb, rng)
        scale = 1.0 / jnp.maximum(jax.lax.stop_gradient(sums["weight"]), 1.0)
        return loss_sum * scale, (loss_sum, sums)

      (_, (loss_sum, sums)), grads = jax.value_and_grad(normalised, has_aux=True)(
          state.params, batch, key)
    else:
      micro = split_microbatches(batch, accum_steps)
      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      # Trace once to learn the metric structure; scan adds the sums.
      _, sums_shape = jax.eval_shape(micro_loss, state.params,
                                     jax.tree.map(lambda x: x[0], micro), key)
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)

      def body(carry, xs):
        g_acc, l_acc, s_acc = carry
        mb, i = xs
        (loss, s), g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss,
                jax.tree.map(jnp.add, s_acc, s)), None

      (grads, loss_sum, sums), _ = jax.lax.scan(
          body, (zero_grads, jnp.zeros((), jnp.float32), zero_sums),
          (micro, jnp.arange(accum_steps)))
    weight = jnp.maximum(sums["weight"], 1.0)
    if accum_steps > 1:
      grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss_sum / weight
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing: the host sees finite=False and stops, and the state
    # (and so the last checkpoint) stays the last good one.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + finite.astype(jnp.int32),
                              params=keep(new_params, state.params),
                              opt_state=keep(new_opt_state, state.opt_state))
    metrics = {**sums, "loss_sum": loss_sum, "grad_norm": grad_norm, "finite": finite}
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics

  return step


def jit_train_step(step: Callable[..., Any], state_shardings: Any) -> Callable[..., Any]:
  """jit with the state donated and kept in its layout."""
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn = sft_loss_fn) -> Callable[..., Any]:
  """Jitted `eval_step(params, frozen, batch) -> metric sums` (no gradients, no dropout)."""

  @jax.jit
  def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, Array]
                ) -> dict[str, Array]:
    model = nnx.merge(graphdef, params, frozen)
    model.eval()
    loss_sum, sums = loss_fn(model, batch, jax.random.key(0))
    return {**sums, "loss_sum": loss_sum}

  return eval_step
