"""rl/update.py: the GRPO / PPO losses and the scorer, chunked over the sequence, against the
same computation on the model's full [b, t, vocab] logits (values and parameter gradients)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.objectives import grpo as grpo_lib
from wakea_jax.objectives import ppo as ppo_lib
from wakea_jax.rl import update

B, T, VOCAB = 4, 13, 1000
# 12 tokens per chunk over 4 rows: 3 positions per chunk, 5 chunks, the last one padded by 2.
CHUNKS = [1, 12]


def _model(value_head=False):
  config = get_preset("tiny", vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32,
                      value_head=value_head)
  return transformer.create_model(config, seed=0)


def _batch(seed=0):
  """Rollout-shaped rows: a prompt, a masked completion, right padding (segment 0)."""
  rng = np.random.default_rng(seed)
  lengths = np.array([13, 10, 7, 12])
  segment_ids = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  mask = np.zeros((B, T), np.float32)
  for r, n in enumerate(lengths):
    mask[r, 3:n] = 1.0
  return {"input_ids": rng.integers(1, VOCAB, (B, T)).astype(np.int32),
          "targets": rng.integers(1, VOCAB, (B, T)).astype(np.int32),
          "loss_mask": mask, "segment_ids": segment_ids,
          "positions": (np.arange(T)[None] * segment_ids).astype(np.int32),
          "advantages": rng.normal(size=B).astype(np.float32)}


def _full_logits_scores(model, batch):
  """(log-probs, entropies, output) from the whole [b, t, vocab] logits: the unchunked form."""
  out = model.forward(batch["input_ids"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
  chex.assert_shape(out.logits, (B, T, VOCAB))
  logp_all = jax.nn.log_softmax(out.logits, axis=-1)
  logprobs = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
  fixed = jax.lax.stop_gradient(logp_all)
  entropy = -jnp.sum(jnp.exp(fixed) * fixed, axis=-1)
  return logprobs, entropy, out


def _with_old_and_ref(model, batch, seed=1):
  """Adds behaviour and reference log-probs a little off the model's, so ratios move off 1
  and both clip sides and the KL term are exercised."""
  rng = np.random.default_rng(seed)
  logprobs = np.asarray(_full_logits_scores(model, batch)[0])
  batch = dict(batch)
  # Whole rows shifted too, so that sequence-level (GSPO) ratios leave the clip range.
  shift = np.array([[0.5], [-0.5], [0.4], [-0.4]]) + rng.normal(0, 0.3, logprobs.shape)
  batch["old_logprobs"] = (logprobs + shift).astype(np.float32)
  batch["ref_logprobs"] = (logprobs + rng.normal(0, 0.3, logprobs.shape)).astype(np.float32)
  return jax.tree.map(jnp.asarray, batch)


def _value_and_grad(loss_fn, model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p):
    return loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0))

  return jax.value_and_grad(f, has_aux=True)(params)


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_policy_loss_fn_equals_full_logits_loss_and_gradients(chunk_tokens, ratio):
  model = _model()
  batch = _with_old_and_ref(model, _batch())
  loss_config = grpo_lib.LossConfig(ratio=ratio, kl_beta=0.05)

  def full(m, b, rng):
    del rng
    logprobs, entropy, _ = _full_logits_scores(m, b)
    loss_sum, sums = grpo_lib.policy_loss(logprobs, b["old_logprobs"], b["advantages"],
                                          b["loss_mask"], loss_config,
                                          ref_logprobs=b["ref_logprobs"])
    gap = jnp.sum(jnp.abs(jax.lax.stop_gradient(logprobs) - b["old_logprobs"]) * b["loss_mask"])
    return loss_sum, {**sums, "entropy": jnp.sum(entropy * b["loss_mask"]), "logprob_gap": gap}

  def chunked(m, b, rng):
    return update.policy_loss_fn(m, b, rng, loss_config=loss_config, chunk_tokens=chunk_tokens)

  (want, want_sums), want_grads = _value_and_grad(full, model, batch)
  (got, got_sums), got_grads = _value_and_grad(chunked, model, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_sums, want_sums, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)
  # The comparison has teeth: both clip sides are hit and the gradient is not ~0.
  assert float(got_sums["clipped"]) > 0
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got_grads)) > 1e-2


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
@pytest.mark.parametrize("value_trunk_gradient", [False, True])
def test_ppo_loss_fn_equals_full_logits_loss_and_gradients(chunk_tokens, value_trunk_gradient):
  model = _model(value_head=True)
  rng = np.random.default_rng(2)
  batch = dict(_with_old_and_ref(model, _batch(seed=3)))
  batch.pop("ref_logprobs")   # PPO's KL lives in the rewards
  batch["advantages"] = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  batch["old_values"] = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  batch["returns"] = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  loss_config = grpo_lib.LossConfig()
  ppo_config = ppo_lib.PPOConfig(value_trunk_gradient=value_trunk_gradient, vf_coef=0.5)

  def full(m, b, rng):
    del rng
    logprobs, entropy, out = _full_logits_scores(m, b)
    values = out.values if value_trunk_gradient else m.value_from(
        jax.lax.stop_gradient(out.hidden))
    p_sum, _ = grpo_lib.policy_loss(logprobs, b["old_logprobs"], b["advantages"],
                                    b["loss_mask"], loss_config)
    v_sum, _ = ppo_lib.value_loss(values, b["old_values"], b["returns"], b["loss_mask"],
                                  clip=ppo_config.value_clip)
    return p_sum + ppo_config.vf_coef * v_sum, {"policy_loss": p_sum, "value_loss": v_sum,
                                                "entropy": jnp.sum(entropy * b["loss_mask"])}

  def chunked(m, b, rng):
    return update.ppo_loss_fn(m, b, rng, loss_config=loss_config, ppo_config=ppo_config,
                              chunk_tokens=chunk_tokens)

  (want, want_sums), want_grads = _value_and_grad(full, model, batch)
  (got, got_sums), got_grads = _value_and_grad(chunked, model, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close({k: got_sums[k] for k in want_sums}, want_sums,
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_score_fn_equals_full_logits_log_probs(chunk_tokens):
  """The scorer of behaviour and reference log-probs (`old_logprobs`, `ref_logprobs`)."""
  model = _model(value_head=True)
  batch = jax.tree.map(jnp.asarray, _batch(seed=4))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logprobs, values = update.make_score_fn(graphdef, chunk_tokens=chunk_tokens)(params, rest,
                                                                               batch)
  want, _, out = _full_logits_scores(model, batch)
  np.testing.assert_allclose(logprobs, want * batch["loss_mask"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(values, out.values, rtol=1e-5, atol=1e-5)
