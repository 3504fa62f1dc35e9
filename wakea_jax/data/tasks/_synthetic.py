"""What the synthetic media tasks (shapes.py, tones.py) share: balanced draws of (kind,
answer), the RL prompt form of their records, and the two baselines an accuracy is read
against.

Baselines. `chance_accuracy` is uniform guessing among a kind's answers (1 / len(choices),
averaged over the records): this is the number reported as "chance". `majority_accuracy` is
what always answering each kind's most frequent answer in a reference set (the train split)
scores; with the balanced answers these generators draw it sits at (or within a record or two
of) chance, so a model that beats chance did not just learn the answer prior.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def check_kinds(kinds: Sequence[str], choices: Mapping[str, tuple[str, ...]], task: str
                ) -> tuple[str, ...]:
  """`kinds` as a tuple, or ValueError naming an unknown or missing kind."""
  if isinstance(kinds, str):
    kinds = (kinds,)
  kinds = tuple(kinds)
  if not kinds:
    raise ValueError(f"{task}: kinds must name at least one of {tuple(choices)}")
  unknown = [k for k in kinds if k not in choices]
  if unknown:
    raise ValueError(f"{task}: unknown kind(s) {unknown}; known: {tuple(choices)}")
  return kinds


def balanced_draws(rng: random.Random, num_examples: int, kinds: tuple[str, ...],
                   choices: Mapping[str, tuple[str, ...]]) -> Iterator[tuple[str, str]]:
  """(kind, answer) per example: kinds in shuffled blocks of all `kinds`, and each kind's
  answers in shuffled blocks of all its choices, so every count differs by at most one.

  Lazy: the caller draws each example from `rng` before the next pair is drawn, so the
  first k examples are the same whatever `num_examples` is."""
  kind_queue: list[str] = []
  answer_queues: dict[str, list[str]] = {k: [] for k in kinds}
  for _ in range(num_examples):
    if not kind_queue:
      kind_queue = list(kinds)
      rng.shuffle(kind_queue)
    kind = kind_queue.pop()
    queue = answer_queues[kind]
    if not queue:
      queue.extend(choices[kind])
      rng.shuffle(queue)
    yield kind, queue.pop()


def prompts(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The RL prompt form: each record's messages up to (not including) the first assistant
  turn; every other field ("images" / "audios", "answer", "category") kept."""
  out = []
  for record in records:
    messages = record["messages"]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                 len(messages))
    out.append({**record, "messages": [dict(m) for m in messages[:first]]})
  return out


def chance_accuracy(records: Sequence[Mapping[str, Any]],
                    choices: Mapping[str, tuple[str, ...]]) -> float:
  """Mean over records of 1 / len(choices[category]): the accuracy of uniform guessing."""
  if not records:
    raise ValueError("chance_accuracy of no records")
  return sum(1.0 / len(choices[r["category"]]) for r in records) / len(records)


def majority_answers(records: Sequence[Mapping[str, Any]],
                     choices: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
  """Kind -> its most frequent answer in `records` (ties go to the earlier choice)."""
  counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  for r in records:
    counts[r["category"]][r["answer"]] += 1
  return {kind: max(choices[kind], key=lambda a, c=counter: (c[a], -choices[kind].index(a)))
          for kind, counter in counts.items()}


def majority_accuracy(records: Sequence[Mapping[str, Any]],
                      choices: Mapping[str, tuple[str, ...]],
                      train: Sequence[Mapping[str, Any]] | None = None) -> float:
  """Accuracy on `records` of always answering each kind's most frequent answer in `train`
  (the records themselves when None). A kind absent from `train` falls back to its first
  choice."""
  if not records:
    raise ValueError("majority_accuracy of no records")
  guess = majority_answers(records if train is None else train, choices)
  hits = sum(r["answer"] == guess.get(r["category"], choices[r["category"]][0])
             for r in records)
  return hits / len(records)
