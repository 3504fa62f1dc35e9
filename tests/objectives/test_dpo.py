"""Preference losses against independent NumPy transcriptions of the papers' formulas."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wakea_jax.models import scoring, transformer
from wakea_jax.models.config import get_preset
from wakea_jax.objectives import dpo
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_loss(name, pc, pr, rc, rr, nc, nr, *, beta=0.1, eps=0.0, gamma=0.5, lam=0.1,
                    normalize=True):
  """Per-pair losses, one pair at a time, straight from the papers (float64)."""
  out = []
  for i in range(len(pc)):
    if name == "dpo":  # arXiv 2305.18290 eq. 7; cDPO smoothing
      h = beta * (pc[i] - rc[i]) - beta * (pr[i] - rr[i])
      out.append(-(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h))
    elif name == "ipo":  # arXiv 2310.12036 eq. 17
      a, b, c, d = pc[i], pr[i], rc[i], rr[i]
      if normalize:
        a, c = a / nc[i], c / nc[i]
        b, d = b / nr[i], d / nr[i]
      h = (a - c) - (b - d)
      out.append((h - 1 / (2 * beta)) ** 2)
    elif name == "simpo":  # arXiv 2405.14734 eq. 6
      z = beta / nc[i] * pc[i] - beta / nr[i] * pr[i] - gamma
      out.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
    elif name == "orpo":  # arXiv 2403.07691 eq. 6-7
      p_w, p_l = math.exp(pc[i] / nc[i]), math.exp(pr[i] / nr[i])
      odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
      l_sft = -pc[i] / nc[i]
      l_or = -_log_sigmoid(math.log(odds_w / odds_l))
      out.append(l_sft + lam * l_or)
    else:
      raise AssertionError(name)
  return np.array(out)


def _inputs(seed, b=16):
  rng = np.random.default_rng(seed)
  nc = rng.integers(1, 20, b).astype(np.float64)
  nr = rng.integers(1, 20, b).astype(np.float64)
  # Mean per-token log-probs in (-3, -0.05): realistic, and P < 1 for ORPO's odds.
  pc, pr = nc * rng.uniform(-3, -0.05, b), nr * rng.uniform(-3, -0.05, b)
  rc, rr = pc + rng.normal(0, 2, b), pr + rng.normal(0, 2, b)
  return pc, pr, rc, rr, nc, nr


def _ours(config, pc, pr, rc, rr, nc, nr):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return dpo.preference_loss(f(pc), f(pr), f(rc), f(rr), config=config, chosen_tokens=f(nc),
                             rejected_tokens=f(nr))


CASES = [
    ("dpo", dict(beta=0.1), dict(beta=0.1)),
    ("dpo", dict(beta=0.5, label_smoothing=0.2), dict(beta=0.5, eps=0.2)),
    ("ipo", dict(beta=0.1), dict(beta=0.1)),
    ("ipo", dict(beta=0.3, ipo_length_normalize=False), dict(beta=0.3, normalize=False)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.8), dict(beta=2.0, gamma=0.8)),
    ("simpo", dict(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1),
     dict(beta=2.0, gamma=0.5, eps=0.1)),
    ("orpo", dict(orpo_lambda=0.1), dict(lam=0.1)),
    ("orpo", dict(orpo_lambda=1.5), dict(lam=1.5)),
]


@pytest.mark.parametrize("name,ours,theirs", CASES)
def test_loss_equals_numpy_transcription(name, ours, theirs):
  for seed in range(3):
    args = _inputs(seed)
    loss_sum, sums = _ours(dpo.PreferenceConfig(loss=name, **ours), *args)
    expected = _reference_loss(name, *args, **theirs)
    np.testing.assert_allclose(float(loss_sum), expected.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(sums["nll_sum"]), expected.sum(), rtol=1e-5, atol=1e-4)
    assert float(sums["weight"]) == len(args[0])


@pytest.mark.parametrize("name,ours,theirs", CASES)
def test_the_comparison_can_fail(name, ours, theirs):
  """A wrong loss (chosen and rejected swapped, or another beta) would not pass the test above."""
  pc, pr, rc, rr, nc, nr = _inputs(7)
  expected = _reference_loss(name, pc, pr, rc, rr, nc, nr, **theirs).sum()
  config = dpo.PreferenceConfig(loss=name, **ours)
  swapped, _ = _ours(config, pr, pc, rr, rc, nr, nc)
  assert not np.isclose(float(swapped), expected, rtol=1e-3)
  if name != "orpo":
    other_beta, _ = _ours(dpo.PreferenceConfig(loss=name, **{**ours, "beta": ours.get(
        "beta", 0.1) * 1.5}), pc, pr, rc, rr, nc, nr)
    assert not np.isclose(float(other_beta), expected, rtol=1e-3)


def test_label_smoothing_is_a_mixture_of_both_directions():
  pc, pr, rc, rr, nc, nr = _inputs(1)
  plain, _ = _ours(dpo.PreferenceConfig(), pc, pr, rc, rr, nc, nr)
  flipped, _ = _ours(dpo.PreferenceConfig(), pr, pc, rr, rc, nr, nc)
  smoothed, _ = _ours(dpo.PreferenceConfig(label_smoothing=0.25), pc, pr, rc, rr, nc, nr)
  np.testing.assert_allclose(float(smoothed), 0.75 * float(plain) + 0.25 * float(flipped),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_ignore_and_need_no_reference(name):
  pc, pr, rc, rr, nc, nr = _inputs(2)
  config = dpo.PreferenceConfig(loss=name)
  f = lambda x: jnp.asarray(x, jnp.float32)
  without, sums = dpo.preference_loss(f(pc), f(pr), None, None, config=config,
                                      chosen_tokens=f(nc), rejected_tokens=f(nr))
  with_ref, _ = _ours(config, pc, pr, rc, rr, nc, nr)
  assert float(without) == pytest.approx(float(with_ref))
  assert np.isfinite(float(without)) and float(sums["weight"]) == len(pc)
  assert name not in dpo.NEEDS_REFERENCE


@pytest.mark.parametrize("name", sorted(dpo.NEEDS_REFERENCE))
def test_reference_losses_refuse_missing_reference(name):
  x = jnp.ones(2)
  with pytest.raises(ValueError, match="needs reference"):
    dpo.preference_loss(-x, -x, None, None, config=dpo.PreferenceConfig(loss=name),
                        chosen_tokens=x, rejected_tokens=x)


def test_metric_sums_and_pair_mask():
  pc = jnp.array([-1.0, -5.0, -2.0, jnp.nan])
  pr = jnp.array([-3.0, -1.0, -2.0, jnp.nan])
  ref = jnp.array([-2.0, -2.0, -2.0, 0.0])
  ones = jnp.ones(4)
  loss, sums = dpo.preference_loss(pc, pr, ref, ref, config=dpo.PreferenceConfig(beta=0.5),
                                   chosen_tokens=ones, rejected_tokens=ones,
                                   pair_mask=jnp.array([1.0, 1.0, 1.0, 0.0]))
  # rewards 0.5*(pi - ref): chosen (0.5, -1.5, 0), rejected (-0.5, 0.5, 0)
  assert float(sums["weight"]) == 3
  assert float(sums["correct"]) == 1  # only the first margin is > 0 (a tie is not correct)
  np.testing.assert_allclose(float(sums["margin"]), 1.0 - 2.0 + 0.0, rtol=1e-6)
  np.testing.assert_allclose(float(sums["chosen_reward"]), -1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sums["rejected_reward"]), 0.0, atol=1e-6)
  expected = sum(-_log_sigmoid(h) for h in (1.0, -2.0, 0.0))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(loss="kto"), "preference.loss"), (dict(beta=0.0), "beta"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(simpo_gamma=-1.0), "simpo_gamma"), (dict(orpo_lambda=-0.1), "orpo_lambda")])
def test_config_validation(bad, match):
  with pytest.raises(ValueError, match=match):
    dpo.PreferenceConfig(**bad)


def _tiny_model():
  config = get_preset("tiny", vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32)
  return transformer.create_model(config, seed=0)


def _pair_batch(b=4, t=10, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  mask = np.zeros((2 * b, t), np.float32)
  mask[:, 5:] = 1.0
  return {"input_ids": rng.integers(1, vocab, (2 * b, t)).astype(np.int32),
          "targets": rng.integers(1, vocab, (2 * b, t)).astype(np.int32),
          "loss_mask": mask,
          "pair_mask": np.ones(b, np.float32),
          "ref_chosen_logps": rng.normal(-30, 2, b).astype(np.float32),
          "ref_rejected_logps": rng.normal(-30, 2, b).astype(np.float32)}


def test_dpo_loss_fn_pairs_first_half_with_second_half():
  model = _tiny_model()
  batch = _pair_batch()
  config = dpo.PreferenceConfig()
  loss, sums = dpo.dpo_loss_fn(model, jax.tree.map(jnp.asarray, batch), jax.random.key(0),
                               config=config)
  logp, tokens = scoring.sequence_logps(model, batch["input_ids"], batch["targets"],
                                    batch["loss_mask"])
  expected, _ = dpo.preference_loss(logp[:4], logp[4:], batch["ref_chosen_logps"],
                                    batch["ref_rejected_logps"], config=config,
                                    chosen_tokens=tokens[:4], rejected_tokens=tokens[4:])
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  assert float(sums["weight"]) == 4


def test_gradient_accumulation_keeps_pairs_together():
  """Micro-batches of stacked pairs give the update and metrics of the whole batch."""
  model = _tiny_model()
  batch = jax.tree.map(jnp.asarray, _pair_batch(b=4))
  loss_fn = dpo.make_loss_fn(dpo.PreferenceConfig(loss="ipo"))
  results = []
  for accum in (1, 2):
    graphdef, state = state_lib.create_train_state(model, optax.sgd(0.1))
    step = jax.jit(step_lib.make_train_step(graphdef, optax.sgd(0.1), loss_fn,
                                            accum_steps=accum))
    new_state, metrics = step(state, batch)
    results.append((jax.tree.leaves(new_state.params), metrics))
  (p1, m1), (p2, m2) = results
  for k in ("loss_sum", "weight", "correct", "margin"):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_loss_fn_runs_without_reference_keys(name):
  model = _tiny_model()
  batch = {k: jnp.asarray(v) for k, v in _pair_batch().items() if not k.startswith("ref_")}
  loss, sums = dpo.dpo_loss_fn(model, batch, jax.random.key(0),
                               config=dpo.PreferenceConfig(loss=name, beta=2.0))
  assert np.isfinite(float(loss)) and float(sums["weight"]) == 4


@pytest.mark.parametrize(("name", "chunk_tokens"),
                         [("dpo", 1), ("dpo", 12), ("ipo", 12), ("simpo", 12), ("orpo", 12)])
def test_loss_fn_equals_full_logits_loss_and_gradients(name, chunk_tokens):
  """dpo_loss_fn scores the pairs in sequence chunks (12 tokens over 6 rows: 2 positions per
  chunk, 6 chunks, the last one padded); loss, metric sums and parameter gradients equal
  those of the whole [2b, t, vocab] logits of the model's forward pass."""
  vocab = 1000
  config = get_preset("tiny", vocab_size=vocab, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, max_seq_len=32)
  model = transformer.create_model(config, seed=0)
  batch = jax.tree.map(jnp.asarray, _pair_batch(b=3, t=11, seed=5, vocab=vocab))
  pref = dpo.PreferenceConfig(loss=name, beta=2.0 if name == "simpo" else 0.1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def full(p):
    logits = nnx.merge(graphdef, p, rest).forward(batch["input_ids"]).logits
    chex.assert_shape(logits, (6, 11, vocab))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                               batch["targets"][..., None], axis=-1)[..., 0]
    sums, tokens = jnp.sum(logp * batch["loss_mask"], -1), jnp.sum(batch["loss_mask"], -1)
    return dpo.preference_loss(sums[:3], sums[3:], batch["ref_chosen_logps"],
                               batch["ref_rejected_logps"], config=pref,
                               chosen_tokens=tokens[:3], rejected_tokens=tokens[3:],
                               pair_mask=batch["pair_mask"])

  def chunked(p):
    return dpo.dpo_loss_fn(nnx.merge(graphdef, p, rest), batch, jax.random.key(0), config=pref,
                           chunk_tokens=chunk_tokens)

  (want, want_sums), want_grads = jax.value_and_grad(full, has_aux=True)(params)
  (got, got_sums), got_grads = jax.value_and_grad(chunked, has_aux=True)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_sums, want_sums, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-5, atol=1e-5)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got_grads)) > 1e-3
