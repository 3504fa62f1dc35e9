"""LUFFY's mixed_policy_loss against a NumPy loop transcription of arXiv 2504.14945 §3.

The reference below is written from the paper, not from offpolicy.py: on-policy tokens take
PPO/GRPO's clipped term, off-policy tokens -f(pi_theta / pi_phi) * A with f(x) = x / (x +
gamma) computed literally (probabilities, not logs), pi_phi = 1 for a trace without
behaviour log-probs, and grpo.py's aggregations over all tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.objectives.grpo import LOSS_AGGREGATIONS, LossConfig, policy_loss
from wakea_jax.objectives.offpolicy import OffPolicyLossConfig, mixed_policy_loss

B, T = 8, 7
GAMMA = 0.1
LOSS_CONSTANT = 9.0
OFF_ROWS = np.array([0, 1, 0, 1, 1, 0, 0, 1], bool)
# Rows 1 and 7 are traces with the trace model's log-probs; row 4 is one without (pi_phi = 1).
BEHAVIOUR_ROWS = (1, 7)


def _mask() -> np.ndarray:
  m = np.zeros((B, T), np.float32)
  m[0, :] = 1
  m[1, 2:] = 1
  m[2, 1:4] = 1; m[2, 5:] = 1     # a tool-output hole
  m[3, :] = 0                     # a trace row with no valid token
  m[4, 1:6] = 1
  m[5, 3:4] = 1
  m[6, 2:] = 1
  m[7, :5] = 1
  return m


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  mask = _mask()
  logprobs = (-np.abs(rng.normal(size=(B, T))) * 1.5).astype(np.float32)
  old = (logprobs + rng.normal(size=(B, T)) * 0.35).astype(np.float32)
  behaviour = (-np.abs(rng.normal(size=(B, T))) * 0.5).astype(np.float32)
  for i in range(B):
    if OFF_ROWS[i]:   # the row's "old" log-probs are the trace model's, or 0 (pi_phi = 1)
      old[i] = behaviour[i] if i in BEHAVIOUR_ROWS else 0.0
  ref = (logprobs + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
  adv = rng.normal(size=(B,)).astype(np.float32)
  logprobs[mask == 0] = -1e4
  old[mask == 0] = 3e3
  ref[mask == 0] = -np.inf
  return logprobs, old, adv, mask, ref


def _reference(logprobs, old, adv, mask, off, cfg: LossConfig, gamma: float, ref=None):
  """Loop transcription; `off` [B, T] bool. Returns (loss_sum, sums) as floats."""
  loss_sum = weight = tokens = off_tokens = off_weight = ref_kl = 0.0
  for i in range(B):
    idx = [j for j in range(T) if mask[i, j] > 0]
    if not idx:
      continue
    on_idx = [j for j in idx if not off[i, j]]
    if cfg.ratio == "sequence" and on_idx:  # GSPO over the row's on-policy tokens
      seq_ratio = math.exp(sum(float(logprobs[i, j]) - float(old[i, j])
                               for j in on_idx) / len(on_idx))
    losses = []
    for j in idx:
      lp, lo, a = float(logprobs[i, j]), float(old[i, j]), float(adv[i])
      if off[i, j]:
        x = math.exp(lp) / math.exp(lo)       # pi_theta / pi_phi; lo = 0 means pi_phi = 1
        f = x / (x + gamma)
        loss = -f * a
        off_tokens += 1
        off_weight += f
      else:
        r = seq_ratio if cfg.ratio == "sequence" else math.exp(lp - lo)
        r_clip = min(max(r, 1.0 - cfg.eps_low), 1.0 + cfg.eps_high)
        loss = -min(r * a, r_clip * a)
      if cfg.kl_beta > 0:
        q = math.exp(float(ref[i, j]) - lp)
        loss += cfg.kl_beta * (q - 1 - math.log(q))   # k3
        ref_kl += q - 1 - math.log(q)
      losses.append(loss)
    tokens += len(idx)
    if cfg.aggregation == "token_mean":
      loss_sum += sum(losses); weight += len(losses)
    elif cfg.aggregation == "seq_mean_token_mean":
      loss_sum += sum(losses) / len(losses); weight += 1
    else:
      loss_sum += sum(losses) / cfg.loss_constant; weight += 1
  sums = {"weight": weight, "tokens": tokens, "off_tokens": off_tokens, "off_weight": off_weight}
  if cfg.kl_beta > 0:
    sums["ref_kl"] = ref_kl
  return loss_sum, sums


def _config(aggregation: str, ratio: str = "token", kl: bool = False) -> LossConfig:
  eps = (0.15, 0.28) if ratio == "token" else (0.03, 0.045)
  return LossConfig(ratio=ratio, eps_low=eps[0], eps_high=eps[1], aggregation=aggregation,
                    loss_constant=LOSS_CONSTANT if aggregation == "seq_sum_constant" else 0.0,
                    kl_beta=0.07 if kl else 0.0)


def _token_off(mask) -> np.ndarray:
  # A token mask that is not row-shaped: row 6's first two valid tokens are a trace prefix
  # (LUFFY's prefix guidance), the rest of the row on-policy.
  off = np.broadcast_to(OFF_ROWS[:, None], mask.shape).copy()
  off[6, 2:4] = True
  return off


def _run(cfg, logprobs, old, adv, mask, ref, off, gamma=GAMMA):
  return mixed_policy_loss(jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(adv),
                           jnp.asarray(mask), jnp.asarray(off), cfg, OffPolicyLossConfig(gamma),
                           jnp.asarray(ref) if cfg.kl_beta > 0 else None)


@pytest.mark.parametrize("off_form", ["rows", "tokens"])
@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_matches_paper_transcription(aggregation, ratio, kl, off_form) -> None:
  cfg = _config(aggregation, ratio, kl)
  logprobs, old, adv, mask, ref = _inputs(seed=1)
  off = OFF_ROWS if off_form == "rows" else _token_off(mask)
  if off_form == "tokens":
    old[6, 2:4] = 0.0    # a prefix without behaviour log-probs
  off_tokens = np.broadcast_to(np.asarray(off)[:, None] if off.ndim == 1 else off, mask.shape)
  loss_sum, sums = _run(cfg, logprobs, old, adv, mask, ref, off)
  want_loss, want = _reference(logprobs, old, adv, mask, off_tokens, cfg, GAMMA, ref)
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=2e-5, atol=1e-6)
  for k, v in want.items():
    np.testing.assert_allclose(float(sums[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
  for v in [loss_sum, *sums.values()]:
    assert v.shape == () and v.dtype == jnp.float32
  assert want["off_tokens"] > 0 and want["tokens"] > want["off_tokens"]


def test_transcription_tells_gamma_and_behaviour_apart() -> None:
  # The check above is only a check if these inputs separate the plausible mistakes: another
  # gamma, ignoring pi_phi, or clipping the off-policy ratio like an on-policy one.
  logprobs, old, adv, mask, ref = _inputs(seed=1)
  cfg = _config("token_mean")
  off = np.broadcast_to(OFF_ROWS[:, None], mask.shape)
  got = float(_run(cfg, logprobs, old, adv, mask, ref, OFF_ROWS)[0])
  assert abs(_reference(logprobs, old, adv, mask, off, cfg, 0.5)[0] - got) > 1e-3
  no_behaviour = np.where(off, 0.0, old)
  assert abs(_reference(logprobs, no_behaviour, adv, mask, off, cfg, GAMMA)[0] - got) > 1e-3
  all_on = np.zeros_like(off)
  assert abs(_reference(logprobs, old, adv, mask, all_on, cfg, GAMMA)[0] - got) > 1e-3


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_without_off_policy_rows_equals_grpo_exactly(aggregation, ratio) -> None:
  cfg = _config(aggregation, ratio, kl=True)
  logprobs, old, adv, mask, ref = _inputs(seed=2)
  old = (logprobs + np.random.default_rng(3).normal(size=(B, T)) * 0.3).astype(np.float32)
  args = [jnp.asarray(x) for x in (old, adv, mask)]
  none = jnp.zeros((B,), bool)

  def grpo(lp):
    return policy_loss(lp, *args, cfg, jnp.asarray(ref))

  def mixed(lp):
    return mixed_policy_loss(lp, *args, none, cfg, OffPolicyLossConfig(), jnp.asarray(ref))

  lp = jnp.asarray(np.where(mask > 0, logprobs, -0.7))
  (want, want_sums), g_want = jax.value_and_grad(grpo, has_aux=True)(lp)
  (got, got_sums), g_got = jax.value_and_grad(mixed, has_aux=True)(lp)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(g_got, g_want)
  for k, v in want_sums.items():
    np.testing.assert_array_equal(got_sums[k], v, err_msg=k)
  assert float(got_sums["off_tokens"]) == 0 and float(got_sums["off_weight"]) == 0
  assert float(jnp.max(jnp.abs(g_want))) > 1e-3


def test_off_policy_gradient_is_shaped_and_unclipped() -> None:
  # One trace row, token_mean: d loss / d log pi_t = -A * gamma x / (x + gamma)^2 / n, with
  # x = pi_theta / pi_phi, at every token, however far x is from 1 (no clip).
  lp = np.log(np.array([[0.9, 0.3, 0.1, 0.02, 1e-4]], np.float32))
  behaviour = np.log(np.array([[0.5, 0.5, 0.01, 0.9, 0.5]], np.float32))
  adv = jnp.asarray([1.3], jnp.float32)
  cfg = _config("token_mean")

  @jax.jit   # one compile for the ~40 evaluations below
  def loss(x, beh, mask):
    loss_sum, sums = mixed_policy_loss(x, beh, adv, mask, jnp.ones((1,), bool), cfg,
                                       OffPolicyLossConfig(GAMMA))
    return loss_sum / sums["weight"]

  for beh in (behaviour, np.zeros_like(lp)):  # with the trace model's log-probs, and pi_phi = 1
    x = np.exp(lp.astype(np.float64) - beh)
    want = -1.3 * GAMMA * x / (x + GAMMA) ** 2 / lp.size
    got = np.asarray(jax.grad(loss)(jnp.asarray(lp), beh, np.ones_like(lp)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # Central finite differences agree with jax.grad, one token at a time (a one-token mask
    # keeps the float32 loss value small against the step), Richardson-extrapolated so the
    # O(h^2) truncation error drops out.
    for t in range(lp.shape[1]):
      mask = np.zeros_like(lp)
      mask[0, t] = 1

      def central(h, t=t, mask=mask, beh=beh):
        up, down = lp.copy(), lp.copy()
        up[0, t] += h; down[0, t] -= h
        return (float(loss(jnp.asarray(up), beh, mask))
                - float(loss(jnp.asarray(down), beh, mask))) / (2 * h)

      fd = (4 * central(5e-3) - central(1e-2)) / 3
      np.testing.assert_allclose(fd, got[0, t] * lp.size, rtol=2e-3, atol=2e-5)
  # Where an on-policy token would be clipped (ratio 10 > 1 + eps, A > 0), the trace token
  # still has a gradient.
  assert abs(float(jax.grad(loss)(jnp.asarray(lp), behaviour, np.ones_like(lp))[0, 2])) > 1e-3


def test_no_nan_from_garbage_extreme_behaviour_or_empty_rows() -> None:
  logprobs, old, adv, mask, ref = _inputs(seed=4)
  logprobs[mask == 0] = -np.inf
  old[mask == 0] = np.nan
  old[1, 2:] = -300.0     # a trace token its model found impossible: rhat = e^300
  cfg = _config("seq_mean_token_mean", "sequence", kl=True)

  def f(lp):
    loss_sum, sums = mixed_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                       jnp.asarray(_token_off(mask)), cfg, OffPolicyLossConfig(),
                                       jnp.asarray(ref))
    return loss_sum / sums["weight"], sums

  (value, sums), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logprobs))
  assert np.isfinite(float(value)) and all(np.isfinite(float(v)) for v in sums.values())
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(grad[mask == 0], 0.0)


def test_sums_are_exact_under_accumulation() -> None:
  logprobs, old, adv, mask, ref = _inputs(seed=5)
  cfg = _config("seq_mean_token_mean", kl=True)
  off = _token_off(mask)
  whole, sums = _run(cfg, logprobs, old, adv, mask, ref, off)
  # Micro-batches as row masks (same shapes, so no new compilations): rows outside a part
  # have no valid token and count for nothing.
  parts = [_run(cfg, logprobs, old, adv, mask * rows[:, None], ref, off)
           for rows in (np.arange(B) < 3, np.arange(B) >= 3)]
  np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(whole), rtol=1e-5)
  for k in sums:
    np.testing.assert_allclose(sum(float(p[1][k]) for p in parts), float(sums[k]), rtol=1e-5,
                               err_msg=k)


@pytest.mark.parametrize("gamma", [0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_invalid_gamma(gamma) -> None:
  with pytest.raises(ValueError, match="gamma"):
    OffPolicyLossConfig(gamma=gamma)


def test_defaults_and_call_errors() -> None:
  assert OffPolicyLossConfig().gamma == 0.1
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="off_policy"):
    mixed_policy_loss(z, z, jnp.zeros(2), z, jnp.zeros(3), LossConfig(), OffPolicyLossConfig())
  with pytest.raises(ValueError, match="ref_logprobs"):
    mixed_policy_loss(z, z, jnp.zeros(2), z, jnp.zeros(2), LossConfig(kl_beta=0.1),
                      OffPolicyLossConfig())
