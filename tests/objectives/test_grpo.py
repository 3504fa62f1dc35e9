"""policy_loss against a NumPy loop transcription of PPO / GRPO / DAPO / Dr. GRPO / GSPO."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.objectives.grpo import LOSS_AGGREGATIONS, LossConfig, policy_loss

B, T = 6, 10
LOSS_CONSTANT = 12.0


def _mask() -> np.ndarray:
  m = np.zeros((B, T), np.float32)
  m[0, :] = 1                     # full row
  m[1, 2:7] = 1                   # prompt, completion, padding
  # row 2: no valid tokens at all
  m[3, 1:4] = 1; m[3, 6:9] = 1    # tool output (a hole) in the middle of the completion
  m[4, 3:4] = 1                   # a single token
  m[5, 4:] = 1
  return m


def _inputs(seed: int = 0, per_token_adv: bool = False):
  rng = np.random.default_rng(seed)
  mask = _mask()
  logprobs = (-np.abs(rng.normal(size=(B, T))) * 1.5).astype(np.float32)
  # Spread the ratios well past both clip bounds.
  old = (logprobs + rng.normal(size=(B, T)) * 0.35).astype(np.float32)
  ref = (logprobs + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
  adv = rng.normal(size=(B, T) if per_token_adv else (B,)).astype(np.float32)
  # Garbage where the mask is 0 must not matter.
  logprobs[mask == 0] = -1e4
  old[mask == 0] = 3e3
  ref[mask == 0] = -np.inf
  return logprobs, old, adv, mask, ref


def _reference(logprobs, old, adv, mask, cfg: LossConfig, ref=None):
  """Loop transcription: returns (loss_sum, sums) as floats."""
  loss_sum = weight = tokens = clipped = approx_kl = ratio_sum = ref_kl = 0.0
  for i in range(logprobs.shape[0]):
    idx = [j for j in range(logprobs.shape[1]) if mask[i, j] > 0]
    if not idx:
      continue
    if cfg.ratio == "sequence":  # GSPO eq. 7: length-normalised sequence likelihood ratio
      seq_ratio = math.exp(sum(float(logprobs[i, j]) - float(old[i, j]) for j in idx) / len(idx))
    losses = []
    for j in idx:
      lp, lo = float(logprobs[i, j]), float(old[i, j])
      r = seq_ratio if cfg.ratio == "sequence" else math.exp(lp - lo)
      a = float(adv[i]) if adv.ndim == 1 else float(adv[i, j])
      r_clip = min(max(r, 1.0 - cfg.eps_low), 1.0 + cfg.eps_high)
      loss = -min(r * a, r_clip * a)  # PPO eq. 7
      # The clip binds when a good token's ratio is too high or a bad token's too low.
      if (a > 0 and r > 1.0 + cfg.eps_high) or (a < 0 and r < 1.0 - cfg.eps_low):
        clipped += 1
      if cfg.kl_beta > 0:
        q = math.exp(float(ref[i, j]) - lp)  # ref / pi
        kl = {"k1": -math.log(q), "k2": 0.5 * math.log(q) ** 2, "k3": q - 1 - math.log(q)}
        loss += cfg.kl_beta * kl[cfg.kl_estimator]
        ref_kl += kl[cfg.kl_estimator]
      q_old = math.exp(lo - lp)
      approx_kl += q_old - 1 - math.log(q_old)
      ratio_sum += r
      losses.append(loss)
    tokens += len(idx)
    if cfg.aggregation == "token_mean":
      loss_sum += sum(losses); weight += len(losses)
    elif cfg.aggregation == "seq_mean_token_mean":
      loss_sum += sum(losses) / len(losses); weight += 1
    else:
      loss_sum += sum(losses) / cfg.loss_constant; weight += 1
  sums = {"weight": weight, "tokens": tokens, "clipped": clipped, "approx_kl": approx_kl,
          "ratio": ratio_sum}
  if cfg.kl_beta > 0:
    sums["ref_kl"] = ref_kl
  return loss_sum, sums


def _config(aggregation: str, ratio: str, kl: str | None = None, **kw) -> LossConfig:
  # Sequence ratios average the token log-ratios and sit near 1, so GSPO clips tightly.
  eps_low, eps_high = (0.15, 0.28) if ratio == "token" else (0.03, 0.045)
  return LossConfig(ratio=ratio, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation,
                          loss_constant=LOSS_CONSTANT if aggregation == "seq_sum_constant" else 0.0,
                          kl_beta=0.0 if kl is None else 0.07, kl_estimator=kl or "k3", **kw)


def _run(cfg, logprobs, old, adv, mask, ref, fn=policy_loss):
  return fn(jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg,
            jnp.asarray(ref) if cfg.kl_beta > 0 else None)


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("kl", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_matches_reference(aggregation, ratio, kl, per_token_adv) -> None:
  cfg = _config(aggregation, ratio, kl)
  inputs = _inputs(seed=3, per_token_adv=per_token_adv)
  loss_sum, sums = _run(cfg, *inputs)
  want_loss, want_sums = _reference(*inputs[:4], cfg, inputs[4])
  assert set(sums) == set(want_sums)
  for v in [loss_sum, *sums.values()]:
    assert v.shape == () and v.dtype == jnp.float32
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=2e-5, atol=1e-5)
  for k, v in want_sums.items():
    np.testing.assert_allclose(float(sums[k]), v, rtol=2e-5, atol=1e-5, err_msg=k)
  assert want_sums["clipped"] > 0


def test_inputs_exercise_both_clip_sides() -> None:
  # The reference is only a check if the data hits both bounds: a wrong clip side, a swapped
  # eps_low/eps_high or a clip around the wrong point must change the result.
  logprobs, old, adv, mask, ref = _inputs(seed=3)
  cfg = _config("token_mean", "token")
  got, _ = _run(cfg, logprobs, old, adv, mask, ref)
  r = np.exp(logprobs - old)[mask > 0]
  a = np.broadcast_to(adv[:, None], mask.shape)[mask > 0]
  assert np.any((a > 0) & (r > 1.28)) and np.any((a < 0) & (r < 0.85))
  swapped = LossConfig(eps_low=0.28, eps_high=0.15, aggregation="token_mean")
  unclipped = LossConfig(eps_low=1.0, eps_high=1e6, aggregation="token_mean")
  for wrong in (swapped, unclipped):
    assert abs(_reference(logprobs, old, adv, mask, wrong)[0] - float(got)) > 1e-3


def test_sequence_ratio_is_exp_mean_log_ratio() -> None:
  logprobs, old, adv, mask, ref = _inputs(seed=4)
  cfg = _config("seq_mean_token_mean", "sequence")
  for i in range(B):
    row = slice(i, i + 1)
    _, sums = _run(cfg, logprobs[row], old[row], adv[row], mask[row], ref[row])
    valid = mask[i] > 0
    if not valid.any():
      assert float(sums["tokens"]) == 0 and float(sums["ratio"]) == 0
      continue
    want = math.exp(float(np.mean(logprobs[i][valid].astype(np.float64) - old[i][valid])))
    np.testing.assert_allclose(float(sums["ratio"] / sums["tokens"]), want, rtol=1e-5)


@pytest.mark.parametrize("eps", [(0.2, 0.2), (3e-4, 4e-4), (0.15, 0.28)])
def test_gspo_gradient_equals_sequence_objective(eps) -> None:
  logprobs, old, adv, mask, _ = _inputs(seed=5)
  logprobs = np.where(mask > 0, logprobs, 0.0).astype(np.float32)
  cfg = LossConfig(ratio="sequence", eps_low=eps[0], eps_high=eps[1])

  def ours(lp):
    loss_sum, sums = policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), cfg)
    return loss_sum / sums["weight"]

  def sequence_objective(lp):  # GSPO eq. 5 with s_i of eq. 7, one sequence at a time
    terms = []
    for i in range(B):
      idx = [j for j in range(T) if mask[i, j] > 0]
      if not idx:
        continue
      s = jnp.exp(sum(lp[i, j] - old[i, j] for j in idx) / len(idx))
      s_clip = jnp.clip(s, 1 - eps[0], 1 + eps[1])
      terms.append(-jnp.minimum(s * adv[i], s_clip * adv[i]))
    return sum(terms) / len(terms)

  lp = jnp.asarray(logprobs)
  np.testing.assert_allclose(ours(lp), sequence_objective(lp), rtol=1e-5)
  g_ours, g_seq = jax.grad(ours)(lp), jax.grad(sequence_objective)(lp)
  assert float(jnp.max(jnp.abs(g_seq))) > 1e-3  # not everything clipped
  np.testing.assert_allclose(g_ours, g_seq, rtol=1e-5, atol=1e-7)


def _weighted_loglik(lp, adv, mask, aggregation):
  """-sum(A * logp * mask) / normaliser, for the same aggregation."""
  adv = adv if adv.ndim == 2 else adv[:, None]
  per_token = adv * lp * mask
  n = mask.sum(axis=1)
  nonempty = float((n > 0).sum())
  if aggregation == "token_mean":
    return -per_token.sum() / mask.sum()
  if aggregation == "seq_mean_token_mean":
    return -(per_token.sum(axis=1) / jnp.maximum(n, 1)).sum() / nonempty
  return -per_token.sum() / LOSS_CONSTANT / nonempty


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_on_policy_gradient_is_policy_gradient(aggregation, ratio, per_token_adv) -> None:
  logprobs, _, adv, mask, _ = _inputs(seed=6, per_token_adv=per_token_adv)
  logprobs = jnp.asarray(np.where(mask > 0, logprobs, -0.5))
  adv, mask = jnp.asarray(adv), jnp.asarray(mask)
  cfg = _config(aggregation, ratio)

  def ours(lp):
    loss_sum, sums = policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask, cfg)
    return loss_sum / sums["weight"]

  g_ours = jax.grad(ours)(logprobs)
  g_pg = jax.grad(lambda lp: _weighted_loglik(lp, adv, mask, aggregation))(logprobs)
  np.testing.assert_allclose(g_ours, g_pg, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(g_pg))) > 1e-3


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_on_policy_gradient_through_a_model(aggregation, ratio) -> None:
  # A linear softmax policy over a small vocabulary: logprobs are a function of params.
  vocab, dim = 11, 5
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  params = jax.random.normal(k1, (dim, vocab)) * 0.5
  features = jax.random.normal(k2, (B, T, dim))
  tokens = jax.random.randint(k3, (B, T), 0, vocab)
  _, _, adv, mask, _ = _inputs(seed=8)
  adv, mask = jnp.asarray(adv), jnp.asarray(mask)
  cfg = _config(aggregation, ratio)

  def logprobs_of(w):
    logp = jax.nn.log_softmax(features @ w, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

  old = logprobs_of(params)

  def ours(w):
    loss_sum, sums = policy_loss(logprobs_of(w), old, adv, mask, cfg)
    return loss_sum / sums["weight"]

  g_ours = jax.grad(ours)(params)
  g_pg = jax.grad(lambda w: _weighted_loglik(logprobs_of(w), adv, mask, aggregation))(params)
  np.testing.assert_allclose(g_ours, g_pg, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(g_pg))) > 1e-3


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_sums_are_exact_under_accumulation(aggregation) -> None:
  inputs = _inputs(seed=9)
  cfg = _config(aggregation, "token", "k3")
  whole, sums = _run(cfg, *inputs)
  parts = [_run(cfg, *(x[s] for x in inputs)) for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
  np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-5)
  for k in sums:
    np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(sums[k]), rtol=1e-5)


@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_jit_matches_eager(ratio) -> None:
  inputs = _inputs(seed=10, per_token_adv=True)
  for aggregation in LOSS_AGGREGATIONS:
    cfg = _config(aggregation, ratio, "k2")
    eager = _run(cfg, *inputs)
    jitted = _run(cfg, *inputs, fn=jax.jit(policy_loss, static_argnums=4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 eager, jitted)


def test_no_nan_from_masked_garbage_or_empty_rows() -> None:
  logprobs, old, adv, mask, ref = _inputs(seed=11)
  logprobs[mask == 0] = -np.inf
  old[mask == 0] = np.nan
  for aggregation in LOSS_AGGREGATIONS:
    cfg = _config(aggregation, "sequence", "k3")

    def f(lp, cfg=cfg):
      loss_sum, sums = policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                   cfg, jnp.asarray(ref))
      return loss_sum / sums["weight"], sums

    (value, sums), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logprobs))
    assert np.isfinite(float(value)) and all(np.isfinite(float(v)) for v in sums.values())
    assert bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_array_equal(grad[mask == 0], 0.0)
  # A batch with no valid tokens at all: zero loss, zero weight.
  empty = np.zeros_like(mask)
  loss_sum, sums = _run(_config("seq_mean_token_mean", "token"), logprobs, old, adv, empty, ref)
  assert float(loss_sum) == 0 and float(sums["weight"]) == 0 and float(sums["tokens"]) == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"ratio": "seq"}, "ratio"),
    ({"eps_low": -0.1}, "eps_low"),
    ({"eps_low": 1.5}, "eps_low"),
    ({"eps_high": -0.2}, "eps_high"),
    ({"eps_high": float("nan")}, "eps_high"),
    ({"aggregation": "mean"}, "aggregation"),
    ({"aggregation": "seq_sum_constant"}, "loss_constant"),
    ({"aggregation": "seq_sum_constant", "loss_constant": -4.0}, "loss_constant"),
    ({"kl_beta": -0.01}, "kl_beta"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
])
def test_invalid_config(kwargs, field) -> None:
  with pytest.raises(ValueError, match=field):
    LossConfig(**kwargs)


def test_defaults_and_call_errors() -> None:
  cfg = LossConfig()
  assert (cfg.ratio, cfg.eps_low, cfg.eps_high, cfg.aggregation, cfg.loss_constant,
          cfg.kl_beta, cfg.kl_estimator) == ("token", 0.2, 0.2, "seq_mean_token_mean", 0.0,
                                             0.0, "k3")
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="ref_logprobs"):
    policy_loss(z, z, jnp.zeros(2), z, LossConfig(kl_beta=0.1))
  with pytest.raises(ValueError, match="advantages"):
    policy_loss(z, z, jnp.zeros(3), z, cfg)
  with pytest.raises(ValueError, match="mask"):
    policy_loss(z, z, jnp.zeros(2), jnp.zeros((2, 4)), cfg)
