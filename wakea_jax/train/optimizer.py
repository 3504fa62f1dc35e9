"""AdamW with linear warmup + cosine decay, a weight-decay mask and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """config.optimizer: AdamW hyperparameters, the learning-rate schedule and gradient clipping.

  `clip_norm=None` (or 0) turns global-norm clipping off. `learning_rate`, `warmup_steps` and
  `min_lr_ratio` are validated on creation.
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  # Cosine decay to `min_lr_ratio * learning_rate` at `decay_steps` (default: total steps).
  decay_steps: int | None = None
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0

  def __post_init__(self) -> None:
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step: linear warmup from 0, then cosine decay.

  Decays from `learning_rate` to `min_lr_ratio * learning_rate` at `decay_steps` (default
  `total_steps`, at least `warmup_steps + 1`); with no warmup it starts at the peak.
  """
  decay_steps = max(config.decay_steps or total_steps, config.warmup_steps + 1)
  if config.warmup_steps == 0:
    return optax.cosine_decay_schedule(config.learning_rate, decay_steps,
                                       alpha=config.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=decay_steps, end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params):
  """Weight decay on matrices only: not on norms' scales, biases or scalars."""
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if `clip_norm`) then AdamW on the schedule, decaying matrices only."""
  parts = []
  if config.clip_norm:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1,
                           b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
