"""Per-token estimators of KL(pi || ref) from tokens sampled from pi.

Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
With log-ratio d = log ref(x) - log pi(x) for x ~ pi:

  k1 = -d                      unbiased, high variance, can be negative
  k2 = d**2 / 2                biased, low variance, always >= 0
  k3 = exp(d) - d - 1          unbiased, low variance, always >= 0 (GRPO arXiv 2402.03300 eq. 4)

Pure functions of arrays; the estimate is per token and the caller masks and sums it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array


def _k1(logprobs: Array, ref_logprobs: Array) -> Array:
  return logprobs - ref_logprobs


def _k2(logprobs: Array, ref_logprobs: Array) -> Array:
  return 0.5 * jnp.square(logprobs - ref_logprobs)


def _k3(logprobs: Array, ref_logprobs: Array) -> Array:
  log_ratio = ref_logprobs - logprobs
  # expm1(d) - d is exp(d) - 1 - d without the cancellation of 1 - 1 near d = 0.
  return jnp.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def check_kl_estimator(estimator: str, field: str = "estimator") -> None:
  """Raises ValueError naming `field` when `estimator` is not a registered KL estimator."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"{field}: unknown KL estimator {estimator!r}; "
                     f"valid: {sorted(KL_ESTIMATORS)}")


def kl_per_token(logprobs: Array, ref_logprobs: Array, estimator: str = "k3") -> Array:
  """KL(pi || ref) estimate per sampled token.

  logprobs [...] (log pi of the sampled tokens), ref_logprobs [...] (same tokens under the
  reference) -> [...] float32, unmasked.
  """
  check_kl_estimator(estimator)
  return KL_ESTIMATORS[estimator](logprobs.astype(jnp.float32), ref_logprobs.astype(jnp.float32))
