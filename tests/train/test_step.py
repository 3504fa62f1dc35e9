"""Train step: exact gradient accumulation, token weighting, NaN guard, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.objectives.sft import chunked_sft_loss, sft_loss, token_logprobs
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import optimizer as opt_lib
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib

CFG = get_preset("tiny")
OPT = opt_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)


def _batch(rows=8, length=12, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, CFG.vocab_size, (rows, length + 1)).astype(np.int32)
  mask = (rng.rand(rows, length) < 0.6).astype(np.float32)  # ragged token counts per row
  mask[:, -1] = 1
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


def _fresh_state(mesh=None, seed=0, sgd=False):
  model = transformer.create_model(CFG, seed=seed, mesh=mesh)
  # Plain SGD makes the parameter change equal the gradient, so comparisons test gradients
  # directly (Adam's first step is ~lr * sign(g), which amplifies float noise of tiny g).
  optimizer = optax.sgd(1.0) if sgd else opt_lib.make_optimizer(OPT, total_steps=10)
  graphdef, state = state_lib.create_train_state(model, optimizer)
  return graphdef, optimizer, state


def test_sft_loss_matches_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 7).astype(np.float32)
  targets = rng.randint(0, 7, (2, 5))
  mask = (rng.rand(2, 5) < 0.5).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -sum(logp[b, t, targets[b, t]] * mask[b, t] for b in range(2) for t in range(5))
  loss_sum, sums = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)
  assert float(sums["tokens"]) == mask.sum()
  assert float(sums["correct"]) == ((logits.argmax(-1) == targets) * mask).sum()
  log_z = np.log(np.exp(logits).sum(-1))
  z_sum, _ = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=0.1)
  np.testing.assert_allclose(z_sum, expected + 0.1 * (log_z ** 2 * mask).sum(), rtol=1e-5)
  # Gradient: softmax - onehot on masked rows (the textbook form, independent of our code).
  grad = jax.grad(lambda x: sft_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0])(
      jnp.asarray(logits))
  onehot = np.eye(7)[targets]
  np.testing.assert_allclose(grad, (np.exp(logp) - onehot) * mask[..., None], atol=1e-6)
  np.testing.assert_allclose(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)),
                             np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-5)


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_is_exact(accum):
  """Token-weighted: N micro-batches with ragged masks give the one-big-batch update."""
  batch = _batch()
  graphdef, optimizer, state = _fresh_state(sgd=True)
  one = jax.jit(step_lib.make_train_step(graphdef, optimizer, accum_steps=1))
  many = jax.jit(step_lib.make_train_step(graphdef, optimizer, accum_steps=accum))
  s1, m1 = one(state, batch)
  s2, m2 = many(state, batch)
  np.testing.assert_allclose(m1["loss_sum"] / m1["weight"], m2["loss_sum"] / m2["weight"],
                             rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  assert float(m1["weight"]) == float(m2["weight"]) == batch["loss_mask"].sum()
  # A few float32 ulps (values ~1): the micro-batch sums round in another order, and how
  # XLA vectorises them depends on its flags (the suite's -O0 moved one parameter by 1.2e-7).
  chex.assert_trees_all_close(s1.params, s2.params, atol=3e-7, rtol=0)
  assert int(s1.step) == int(s2.step) == 1


def test_step_matches_a_plain_optax_update():
  """The step equals grad of the token-mean loss fed to the same optax chain."""
  batch = _batch()
  graphdef, optimizer, state = _fresh_state(sgd=True)
  new_state, _ = jax.jit(step_lib.make_train_step(graphdef, optimizer))(state, batch)

  def mean_loss(params):
    logits = nnx.merge(graphdef, params, state.frozen)(
        batch["input_ids"], segment_ids=batch["segment_ids"])
    total, sums = sft_loss(logits, batch["targets"], batch["loss_mask"])
    return total / sums["tokens"]

  grads = jax.grad(mean_loss)(state.params)
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_non_finite_step_changes_nothing():
  batch = _batch()
  graphdef, optimizer, state = _fresh_state()
  poisoned = jax.tree.map(lambda x: x, state.params)
  scale = poisoned["final_norm"]["scale"]
  poisoned["final_norm"]["scale"] = scale.replace(jnp.full_like(scale[...], jnp.nan))
  state = state.replace(params=poisoned)
  new_state, metrics = jax.jit(step_lib.make_train_step(graphdef, optimizer))(state, batch)
  assert not bool(metrics["finite"])
  assert int(new_state.step) == 0
  chex.assert_trees_all_equal(new_state.params, state.params)
  chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)


def test_sharded_donated_step_equals_single_device():
  batch = _batch()
  graphdef, optimizer, state = _fresh_state(sgd=True)
  ref_state, ref_metrics = jax.jit(step_lib.make_train_step(graphdef, optimizer))(state, batch)

  mesh = mesh_lib.create_mesh((2, 2, 2))
  g2, opt2, sharded = _fresh_state(mesh=mesh, sgd=True)
  assert opt2 is not optimizer
  shardings = state_lib.state_shardings(sharded)
  step = step_lib.jit_train_step(step_lib.make_train_step(g2, opt2, accum_steps=2), shardings)
  with mesh_lib.logical_rules(mesh):
    new_state, metrics = step(sharded, mesh_lib.shard_batch(batch, mesh))
  assert all(x.is_deleted() for x in jax.tree.leaves(sharded.params))  # donated
  np.testing.assert_allclose(metrics["loss_sum"], ref_metrics["loss_sum"], rtol=1e-6)
  chex.assert_trees_all_close(new_state.params, ref_state.params, atol=1e-5, rtol=0)
  for a, s in zip(jax.tree.leaves(new_state), jax.tree.leaves(shardings)):
    assert a.sharding == s


def test_weight_decay_mask_and_schedule():
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones(2), "bias": jnp.ones(())}
  assert opt_lib.decay_mask(params) == {"w": True, "scale": False, "bias": False}
  schedule = opt_lib.learning_rate_schedule(
      opt_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(110)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="learning_rate"):
    opt_lib.OptimizerConfig(learning_rate=0.0)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 4096])
def test_chunked_loss_equals_full_loss_and_gradients(chunk_tokens):
  rng = np.random.RandomState(1)
  hidden = jnp.asarray(rng.randn(2, 9, 8).astype(np.float32))
  head = jnp.asarray(rng.randn(8, 11).astype(np.float32))
  targets = jnp.asarray(rng.randint(0, 11, (2, 9)))
  mask = jnp.asarray((rng.rand(2, 9) < 0.7).astype(np.float32))

  def full(hidden, head):
    return sft_loss(jnp.einsum("bte,ev->btv", hidden, head), targets, mask, z_loss=1e-3)

  def chunked(hidden, head):
    return chunked_sft_loss(hidden, head, targets, mask, chunk_tokens=chunk_tokens, z_loss=1e-3)

  (l1, s1), g1 = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, head)
  (l2, s2), g2 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for k in s1:
    np.testing.assert_allclose(s2[k], s1[k], rtol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # A tied head passed as the embedding [vocab, embed]: same loss, transposed gradient.
  (l3, _), (gh, ge) = jax.value_and_grad(
      lambda h, e: chunked_sft_loss(h, e, targets, mask, chunk_tokens=chunk_tokens, z_loss=1e-3,
                                    vocab_major=True), argnums=(0, 1), has_aux=True)(hidden, head.T)
  np.testing.assert_allclose(l3, l1, rtol=1e-6)
  np.testing.assert_allclose(gh, g1[0], atol=1e-6)
  np.testing.assert_allclose(ge.T, g1[1], atol=1e-6)


def _dot_count(jaxpr) -> int:
  """dot_general equations in a jaxpr and every jaxpr nested in it (scan bodies, custom rules)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "dot_general"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value, ):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _dot_count(inner)
  return count


def test_chunked_loss_gradient_does_not_recompute_the_logits():
  """The fused linear cross-entropy: one forward matmul and the two gradient matmuls per
  chunk, none recomputed in the backward pass (checkpointed chunks made it four)."""
  rng = np.random.RandomState(2)
  hidden = jnp.asarray(rng.randn(2, 8, 4).astype(np.float32))
  head = jnp.asarray(rng.randn(4, 6).astype(np.float32))
  targets = jnp.asarray(rng.randint(0, 6, (2, 8)))
  mask = jnp.ones((2, 8), jnp.float32)
  grad = jax.grad(lambda h, w: chunked_sft_loss(h, w, targets, mask, chunk_tokens=4)[0],
                  argnums=(0, 1))
  assert _dot_count(jax.make_jaxpr(grad)(hidden, head).jaxpr) == 3
  loss = lambda h, w: chunked_sft_loss(h, w, targets, mask, chunk_tokens=4)[0]
  assert _dot_count(jax.make_jaxpr(loss)(hidden, head).jaxpr) == 1  # no gradient work unasked


def test_chunked_loss_metric_gradients():
  """nll_sum differentiates like loss_sum without a z-loss; with one it refuses."""
  rng = np.random.RandomState(3)
  hidden = jnp.asarray(rng.randn(2, 5, 4).astype(np.float32))
  head = jnp.asarray(rng.randn(4, 7).astype(np.float32))
  targets = jnp.asarray(rng.randint(0, 7, (2, 5)))
  mask = jnp.asarray((rng.rand(2, 5) < 0.8).astype(np.float32))
  full = lambda h: sft_loss(jnp.einsum("bte,ev->btv", h, head), targets, mask)[1]["nll_sum"]
  nll = lambda h, z=0.0: chunked_sft_loss(h, head, targets, mask, chunk_tokens=4,
                                          z_loss=z)[1]["nll_sum"]
  np.testing.assert_allclose(jax.grad(nll)(hidden), jax.grad(full)(hidden), atol=1e-6)
  both = lambda h: sum(jax.tree.leaves(chunked_sft_loss(h, head, targets, mask, chunk_tokens=4)))
  everything = lambda h: (sft_loss(jnp.einsum("bte,ev->btv", h, head), targets, mask)[0]
                          + full(h))
  np.testing.assert_allclose(jax.grad(both)(hidden), jax.grad(everything)(hidden), atol=1e-5)
  with pytest.raises(ValueError, match="only loss_sum is differentiable"):
    jax.grad(lambda h: nll(h, 1e-3))(hidden)
