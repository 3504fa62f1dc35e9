"""Coloured shapes: a synthetic visual question-answering task for vision-language models.

Each example is one RGB PNG, `size` x `size` pixels (default 32; any size >= 32 scales the
geometry), of filled shapes (square, circle, triangle) on a black or dark-grey background,
and a one-word question about it:

    kind       question (one of 3 wordings)                          answers
    colour     What colour is the shape?                             red green blue yellow
    count      How many shapes are there?   (1-4, one colour)        one two three four
    position   Is the shape on the left or the right?                left right
               Is the shape at the top or the bottom?                top bottom
    compare    Which shape is bigger, the red one or the blue one?   the bigger one's colour

Shapes are 6-12 px across at 32 px (6-9 px in `count`, so four fit), `size / 32` times that
at other sizes; shapes never touch (at least 2 px apart, scaled), a `position` shape keeps
2 px clear of the midline, and in `compare` the bigger shape is at least 4 px wider (scaled)
and covers at least twice the pixels of the smaller. Colours (per channel +-20), background
grey level (0-45), shape kinds, sizes and positions are jittered so images differ.

Records (`write`), paths relative to `directory`, so `sources.write_jsonl(records,
directory / "train.jsonl")` makes a file `multimodal.load_source` reads:

    {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["images/0_0.png"], "answer": "red", "category": "colour"}

`prompts(records)` is the RL form (no assistant turn). Answers are balanced: kinds come in
shuffled blocks of all kinds, and each kind's answers in shuffled blocks of all its answers.

Splits: split 0 is train, split 1 held-out; each (seed, split) is its own random stream
(`random.Random(f"shapes-{seed}-{split}")`), so held-out images are new draws (a held-out
image equal to a train one is possible in principle but, with the jitter, vanishingly rare).
Deterministic: the same arguments give the same records and pixels on any platform (the
shapes are rasterised in NumPy, not by a PIL drawing routine whose rounding has changed
between versions); the PNG bytes also depend on the zlib that PIL links. The first k
records do not depend on `num_examples` (each example is drawn before the next answer).

Baselines: `chance_accuracy` (reported as "chance") is uniform guessing among the answers the
question offers: 1/4 for colour and count, 1/2 for position and compare, whose questions name
two options (so not 1 / len(CHOICES[kind]) for those two). `majority_accuracy` always gives
each kind's most frequent train answer; with balanced answers it is at most chance (below it
for position and compare, where half the questions do not offer the majority answer).
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from wakea_jax.data.tasks import _synthetic

KINDS = ("colour", "count", "position", "compare")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35), "green": (40, 190, 50), "blue": (40, 70, 220),
    "yellow": (225, 210, 40)}
NUMBERS = ("one", "two", "three", "four")
CHOICES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": NUMBERS,
    "position": ("left", "right", "top", "bottom"),
    "compare": tuple(COLOURS),
}
# Answers a question offers (what uniform guessing picks from; see the module docstring).
OFFERED: dict[str, int] = {"colour": 4, "count": 4, "position": 2, "compare": 2}
SHAPES = ("square", "circle", "triangle")
COLOUR_JITTER = 20
MAX_BACKGROUND = 45

_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What is the colour of the shape?",
               "Which colour is the shape?"),
    "count": ("How many shapes are there?", "How many shapes are in the picture?",
              "Count the shapes. How many are there?"),
    "horizontal": ("Is the shape on the left or the right?",
                   "Is the shape in the left half or the right half?",
                   "Which side is the shape on, left or right?"),
    "vertical": ("Is the shape at the top or the bottom?",
                 "Is the shape in the top half or the bottom half?",
                 "Is the shape near the top or the bottom?"),
    "compare": ("Which shape is bigger, the {a} one or the {b} one?",
                "Which is larger: the {a} shape or the {b} shape?",
                "Which shape is larger, the {a} one or the {b} one?"),
}

# A placed shape: (kind, side, top, left) in pixels.
Placed = tuple[str, int, int, int]


def shape_mask(kind: str, side: int) -> np.ndarray:
  """Bool [side, side] of a filled square, circle or upward triangle (4-connected)."""
  y, x = np.mgrid[0:side, 0:side]
  centre = (side - 1) / 2
  if kind == "square":
    return np.ones((side, side), bool)
  if kind == "circle":
    return (y - centre) ** 2 + (x - centre) ** 2 <= (side / 2) ** 2
  if kind == "triangle":
    return np.abs(x - centre) <= (y + 1) / 2
  raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def _scaled(px: float, size: int) -> int:
  """A length of `px` pixels at 32 px, at `size`."""
  return max(1, round(px * size / 32))


def _apart(box: tuple[int, int, int], others: Sequence[Placed], gap: int) -> bool:
  """Whether the square box (side, top, left) is `gap` px clear of every placed shape."""
  side, top, left = box
  return all(top + side + gap <= t or t + s + gap <= top or left + side + gap <= x
             or x + s + gap <= left for _, s, t, x in others)


def _place(rng: random.Random, sides: Sequence[int], size: int, gap: int) -> list[Placed]:
  """Non-touching random placements of shapes of these sides (rejection sampling; restarts
  the layout when one shape finds no room)."""
  margin = 1
  while True:
    placed: list[Placed] = []
    for side in sides:
      for _ in range(100):
        top = rng.randint(margin, size - side - margin)
        left = rng.randint(margin, size - side - margin)
        if _apart((side, top, left), placed, gap):
          placed.append((rng.choice(SHAPES), side, top, left))
          break
      else:
        break
    if len(placed) == len(sides):
      return placed


def _jittered(rng: random.Random, colour: str) -> tuple[int, int, int]:
  return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))
               for c in COLOURS[colour])  # type: ignore[return-value]


def _render(size: int, background: int,
            shapes: Sequence[tuple[Placed, tuple[int, int, int]]]) -> np.ndarray:
  """uint8 [size, size, 3]: the background grey, then each shape in its colour."""
  pixels = np.full((size, size, 3), background, np.uint8)
  for (kind, side, top, left), rgb in shapes:
    mask = shape_mask(kind, side)
    pixels[top:top + side, left:left + side][mask] = rgb
  return pixels


def _example(rng: random.Random, kind: str, answer: str, size: int
             ) -> tuple[np.ndarray, str, list[tuple[Placed, str]]]:
  """(pixels, question, [(placed shape, colour name)]) of one example whose answer is
  `answer`."""
  lo, hi, gap = _scaled(6, size), _scaled(12, size), _scaled(2, size)
  shapes: list[tuple[Placed, tuple[int, int, int]]]
  if kind == "colour":
    (placed,) = _place(rng, [rng.randint(lo, hi)], size, gap)
    shapes = [(placed, _jittered(rng, answer))]
    names = [answer]
    question = rng.choice(_QUESTIONS["colour"])
  elif kind == "count":
    colour = rng.choice(CHOICES["colour"])
    sides = [rng.randint(lo, _scaled(9, size)) for _ in range(NUMBERS.index(answer) + 1)]
    rgb = _jittered(rng, colour)
    shapes = [(p, rgb) for p in _place(rng, sides, size, gap)]
    names = [colour] * len(shapes)
    question = rng.choice(_QUESTIONS["count"])
  elif kind == "position":
    side = rng.randint(lo, hi)
    half, free = size // 2, rng.randint(1, size - side - 1)
    near = rng.randint(1, half - gap - side)             # offset along the asked axis
    along = near if answer in ("left", "top") else size - side - near
    top, left = (free, along) if answer in ("left", "right") else (along, free)
    placed = (rng.choice(SHAPES), side, top, left)   # drawn before the colour, as always
    names = [rng.choice(CHOICES["colour"])]
    shapes = [(placed, _jittered(rng, names[0]))]
    question = rng.choice(_QUESTIONS["horizontal" if answer in ("left", "right")
                                     else "vertical"])
  elif kind == "compare":
    other = rng.choice([c for c in CHOICES["compare"] if c != answer])
    while True:
      small = rng.randint(lo, _scaled(8, size))
      big = rng.randint(small + _scaled(4, size), hi)
      big_placed, small_placed = _place(rng, [big, small], size, gap)
      if shape_mask(big_placed[0], big).sum() >= 2 * shape_mask(small_placed[0], small).sum():
        break
    shapes = [(big_placed, _jittered(rng, answer)), (small_placed, _jittered(rng, other))]
    names = [answer, other]
    a, b = (answer, other) if rng.random() < 0.5 else (other, answer)
    question = rng.choice(_QUESTIONS["compare"]).format(a=a, b=b)
  else:
    raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
  pixels = _render(size, rng.randint(0, MAX_BACKGROUND), shapes)
  return pixels, question, [(placed, name) for (placed, _), name in zip(shapes, names)]


def describe(shapes: Sequence[tuple[Placed, str]], size: int, kind: str, answer: str
             ) -> str:
  """The answer with the picture described first, point by point (the "point, then count"
  recipe of pointing VLMs such as Molmo): every shape in reading order (by the row, then the
  column of its centre on the 4 x 4 grid of 8 px patches at 32 px) as its kind and its cell
  "xy", its colour first where the question is about colours (colour, compare), then ": " and
  the one-word answer (`rl.answers.extract_answer(fallback="last_word")` reads it):

      count    "circle 01, square 31, triangle 13: three"
      compare  "red circle 01, blue square 23: red"
  """
  cell = size / 4
  items = []
  for (shape, side, top, left), colour in shapes:
    x, y = int((left + side / 2) // cell), int((top + side / 2) // cell)
    named = f"{colour} {shape}" if kind in ("colour", "compare") else shape
    items.append((y, x, f"{named} {x}{y}"))
  return ", ".join(text for _, _, text in sorted(items)) + f": {answer}"


def write(directory: str | os.PathLike[str], num_examples: int, seed: int = 0, *,
          split: int = 0, size: int = 32, kinds: Sequence[str] = KINDS,
          described: float = 0.0) -> list[dict[str, Any]]:
  """Writes `directory/images/<split>_<i>.png` for i < num_examples and returns the records
  (see the module docstring), image paths relative to `directory`.

  `described` is the fraction of records whose assistant turn describes the picture before
  answering (`describe`; the record's "answer" stays the one word). Which records are
  described is drawn from a stream of its own, so the images and questions do not depend on
  it. A model trained on both forms can be taught by RL which one to use for which question,
  as the text demonstration's worked answers are."""
  kinds = _synthetic.check_kinds(kinds, CHOICES, "shapes")
  if not 0.0 <= described <= 1.0:
    raise ValueError(f"shapes: described must be a fraction in [0, 1], got {described}")
  if num_examples < 0:
    raise ValueError(f"shapes: num_examples must be >= 0, got {num_examples}")
  if size < 32:
    raise ValueError(f"shapes: size must be >= 32 px (four shapes must fit), got {size}")
  images = pathlib.Path(directory) / "images"
  images.mkdir(parents=True, exist_ok=True)
  rng = random.Random(f"shapes-{seed}-{split}")
  form_rng = random.Random(f"shapes-described-{seed}-{split}")
  records = []
  for i, (kind, answer) in enumerate(_synthetic.balanced_draws(rng, num_examples, kinds,
                                                               CHOICES)):
    pixels, question, placed = _example(rng, kind, answer, size)
    name = f"images/{split}_{i}.png"
    Image.fromarray(pixels, "RGB").save(images.parent / name, format="PNG")
    reply = describe(placed, size, kind, answer) if form_rng.random() < described else answer
    records.append({"messages": [{"role": "user", "content": "<image>" + question},
                                 {"role": "assistant", "content": reply}],
                    "images": [name], "answer": answer, "category": kind})
  return records


def prompts(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The RL prompt form of `write`'s records: no assistant turn; images, answer and category
  kept."""
  return _synthetic.prompts(records)


def chance_accuracy(records: Sequence[Mapping[str, Any]]) -> float:
  """Accuracy of guessing uniformly among the answers each question offers (`OFFERED`):
  the "chance" baseline."""
  if not records:
    raise ValueError("chance_accuracy of no records")
  return sum(1.0 / OFFERED[r["category"]] for r in records) / len(records)


def majority_accuracy(records: Sequence[Mapping[str, Any]],
                      train: Sequence[Mapping[str, Any]] | None = None) -> float:
  """Accuracy of always answering each kind's most frequent answer in `train` (default:
  `records` themselves)."""
  return _synthetic.majority_accuracy(records, CHOICES, train)


__all__ = ["CHOICES", "COLOURS", "KINDS", "OFFERED", "SHAPES", "chance_accuracy", "describe",
           "majority_accuracy", "prompts", "shape_mask", "write"]
