"""A seeded visiting order over N records, reshuffled every epoch, with a JSON state.

Iterators that hold their records in memory (RL prompts, preference pairs) take indices
from it; its state {"epoch", "position"} is saved with each checkpoint, so a resumed run
visits exactly the records the uninterrupted one would have. The order of an epoch depends
only on (name, seed, epoch) (`random.Random` seeded with a string is stable across
platforms and Python versions), never on how far a previous run got.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any


class EpochOrder:
  """Indices 0..size-1 in a shuffled order that changes every epoch; state {"epoch", "position"}.

  The order of epoch e depends only on (name, seed, e), so `set_state` recreates it exactly.
  """

  def __init__(self, size: int, seed: int = 0, name: str = "records"):
    if size < 1:
      raise ValueError(f"nothing to iterate over: {name} is empty")
    self.size = size
    self.seed = seed
    self.name = name
    self.epoch = 0
    self.position = 0
    self._order = self._shuffled(0)

  def _shuffled(self, epoch: int) -> list[int]:
    order = list(range(self.size))
    random.Random(f"{self.name}-{self.seed}-{epoch}").shuffle(order)
    return order

  def take(self, n: int) -> list[int]:
    """The next `n` indices (a batch may span an epoch boundary)."""
    out = []
    while len(out) < n:
      if self.position >= self.size:
        self.epoch += 1
        self.position = 0
        self._order = self._shuffled(self.epoch)
      out.append(self._order[self.position])
      self.position += 1
    return out

  def get_state(self) -> dict[str, int]:
    """{"epoch", "position"}: JSON-serialisable, for `set_state` when resuming."""
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` dict; the epoch's order is regenerated from the seed."""
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self._order = self._shuffled(self.epoch)
