"""`config.data` as a frozen dataclass: where examples come from and how they are batched.

One section for every objective: SFT reads chats (mixed by weight and packed), preference
training reads pairs, RL reads prompts (both pooled). A source is a file (.jsonl, .json,
.parquet), a `datasets` directory (`save_to_disk` or a Hub-style data folder, `DIR?split=..`)
or a bundled generator `task:NAME?n=..&seed=..`; in the config it is a spec string or a
(spec, weight) pair. `on_error` applies to every reader (SFT, preference pairs, RL prompts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

OVERLENGTH = ("truncate", "drop")
ON_ERROR = ("raise", "skip_and_count")

SourceList = tuple[tuple[str, float], ...]


def _source_list(value: Any, field: str) -> SourceList:
  """A spec string, or a sequence of spec strings and (spec, weight) pairs -> ((spec, w), ...)."""
  if isinstance(value, str):
    value = (value,) if value else ()
  if not isinstance(value, Sequence):
    raise ValueError(f"data.{field} must be a spec string or a list of specs / (spec, weight) "
                     f"pairs, got {type(value).__name__}")
  out = []
  for i, entry in enumerate(value):
    if isinstance(entry, str):
      spec, weight = entry, 1.0
    elif isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str):
      spec, weight = entry
    else:
      raise ValueError(f"data.{field}[{i}] must be a spec string or a (spec, weight) pair, "
                       f"got {entry!r}")
    if not spec:
      raise ValueError(f"data.{field}[{i}] is an empty spec")
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise ValueError(f"data.{field}[{i}]: weight {weight!r} is not a number") from None
    if not weight > 0:
      raise ValueError(f"data.{field}[{i}] ({spec!r}) has weight {weight}; must be > 0")
    out.append((spec, weight))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """config.data. Fields an objective does not use keep their defaults."""

  sources: SourceList = ()
  eval_sources: SourceList = ()
  seq_len: int = 512
  batch_size: int = 16           # global (all processes): rows (SFT), pairs (preference)
  eval_batch_size: int = 16
  # Logical data shards (SFT, data/pipeline.py); 0: one per process. A fixed value makes the
  # batches the same on any process count dividing it, so a run can resume on another one.
  shards: int = 0
  eval_batches: int = 0          # 0: every evaluation example
  packing: bool = True
  overlength: str = "truncate"   # or "drop"; either way counted and reported
  on_error: str = "raise"        # or "skip_and_count" malformed records
  seed: int = 0

  def __post_init__(self) -> None:
    object.__setattr__(self, "sources", _source_list(self.sources, "sources"))
    object.__setattr__(self, "eval_sources", _source_list(self.eval_sources, "eval_sources"))
    for name in ("seq_len", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    if self.shards < 0:
      raise ValueError(f"data.shards must be >= 0 (0: one per process), got {self.shards}")
    if self.eval_batches < 0:
      raise ValueError(f"data.eval_batches must be >= 0 (0: all), got {self.eval_batches}")
    if self.overlength not in OVERLENGTH:
      raise ValueError(f"data.overlength must be one of {OVERLENGTH}, got {self.overlength!r}")
    if self.on_error not in ON_ERROR:
      raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")

  @property
  def eval_batch_limit(self) -> int | None:
    """data.eval_batches as a limit (None: all)."""
    return self.eval_batches or None


def pooled_specs(sources: SourceList, field: str = "sources") -> list[str]:
  """The specs of sources whose records are pooled (preference pairs, RL prompts).

  Weights mix SFT sources only; a weight other than 1 here would be silently meaningless,
  so it is an error.
  """
  for i, (spec, weight) in enumerate(sources):
    if weight != 1.0:
      raise ValueError(f"data.{field}[{i}] ({spec!r}) has weight {weight}, but these sources "
                       "are pooled, not mixed: drop the weight (or set it to 1)")
  return [spec for spec, _ in sources]
