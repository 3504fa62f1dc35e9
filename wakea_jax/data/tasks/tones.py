"""Tones and beeps: a synthetic audio question-answering task for audio-language models.

Each example is one mono 16-bit PCM WAV of exactly 1 s at 8000 Hz (`RATE`), silence with
pure sine tones in it, and a one-word question about it:

    kind     question (one of 3 wordings)                         answers
    count    How many beeps are there?                            one two three four
    pitch    Does the pitch go up or down?                        up down
    length   Which tone is longer, the first or the second?       first second

count    1-4 beeps of one frequency (500-1500 Hz), each 0.08-0.15 s, 0.08-0.14 s apart.
pitch    two tones, 0.2-0.3 s each, 0.06-0.12 s apart, one at 300-600 Hz and the other at
         1200-2500 Hz (at least a factor 2 apart, so the direction is never subtle).
length   two tones of 0.1-0.2 s and 0.4-0.5 s (at least twice as long), each at its own
         frequency (400-1500 Hz; pitch is a distractor here), 0.08-0.15 s apart.
Every clip starts at a random onset, every tone has its own amplitude (0.3-0.6 of full
scale) and 5 ms raised-cosine fades in and out (no clicks).

Records (`write`), paths relative to `directory`:

    {"messages": [{"role": "user", "content": "<audio>How many beeps are there?"},
                  {"role": "assistant", "content": "three"}],
     "audios": ["audios/0_0.wav"], "answer": "three", "category": "count"}

`prompts`, splits (0 train, 1 held-out: `random.Random(f"tones-{seed}-{split}")`), balanced
answers and determinism as in shapes.py (the samples are computed in float64 NumPy from the
stream's draws; the WAV bytes are the 16-bit rounding, so byte-identical everywhere).
Baselines: `chance_accuracy` ("chance") is 1 / len(CHOICES[kind]) (every question offers
all its kind's answers), `majority_accuracy` always gives each kind's most frequent train
answer (at most chance, as the answers are balanced).

Features: `FEATURES` is the Whisper-style front end (`data.audio`) for these clips: 32 mel
bins, n_fft 256 (32 ms), hop 80 (10 ms), so a 1 s clip is 100 mel frames, which an audio
tower (stride-2 conv, then the Qwen2-Audio pool) turns into 50 and then 25 tokens
(`models.audio.output_lengths`). The mel filterbank is Whisper's, fixed at 0-8 kHz, while
8 kHz audio only has content up to 4 kHz: the top 6 of the 32 filters fall above 4 kHz and
are empty (their log-mel is the clip's floor, max - 8, a constant), the two below are cut
off at 4 kHz, and the 24 below (5 to 21 FFT bins each, none empty at the bottom) cover the
rest. The construction accepts this (no error, no NaN); the constant bins are harmless,
just unused. A 16 kHz rate would use every bin, at twice the samples; at 8 kHz all tones
(<= 2.5 kHz) are far below Nyquist.
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wakea_jax.data.audio import FeatureConfig, write_wav
from wakea_jax.data.tasks import _synthetic

RATE = 8000
CLIP_SECONDS = 1
FEATURES = FeatureConfig(feature_size=32, sampling_rate=RATE, hop_length=80,
                         chunk_length=CLIP_SECONDS, n_fft=256)
KINDS = ("count", "pitch", "length")
CHOICES: dict[str, tuple[str, ...]] = {
    "count": ("one", "two", "three", "four"),
    "pitch": ("up", "down"),
    "length": ("first", "second"),
}
FADE_SECONDS = 0.005
MIN_AMPLITUDE, MAX_AMPLITUDE = 0.3, 0.6

_QUESTIONS: dict[str, tuple[str, ...]] = {
    "count": ("How many beeps are there?", "How many beeps do you hear?",
              "Count the beeps. How many are there?"),
    "pitch": ("Does the pitch go up or down?", "Does the second tone go up or down in pitch?",
              "From the first tone to the second, does the pitch go up or down?"),
    "length": ("Which tone is longer, the first or the second?",
               "Which tone lasts longer, the first or the second?",
               "Is the first or the second tone longer?"),
}

# A tone: (start seconds, duration seconds, frequency Hz, amplitude).
Tone = tuple[float, float, float, float]


def synthesize(tones: Sequence[Tone], rate: int = RATE, seconds: float = CLIP_SECONDS
               ) -> np.ndarray:
  """float64 [rate * seconds] samples: silence plus each tone (sine, raised-cosine fades)."""
  out = np.zeros(round(rate * seconds), np.float64)
  fade = max(1, round(FADE_SECONDS * rate))
  for start, duration, frequency, amplitude in tones:
    first, n = round(start * rate), round(duration * rate)
    if first < 0 or first + n > out.shape[0] or n < 2 * fade:
      raise ValueError(f"tone at {start:.3f} s of {duration:.3f} s does not fit a "
                       f"{seconds} s clip")
    t = np.arange(n) / rate
    envelope = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    envelope[:fade], envelope[n - fade:] = ramp, ramp[::-1]
    out[first:first + n] += amplitude * envelope * np.sin(2 * np.pi * frequency * t)
  return out


def _sequence(rng: random.Random, durations: Sequence[float], gaps: Sequence[float],
              frequencies: Sequence[float]) -> list[Tone]:
  """Tones one after another from a random onset (the whole run fits with 20 ms spare at
  each end)."""
  total = sum(durations) + sum(gaps)
  start = rng.uniform(0.02, CLIP_SECONDS - 0.02 - total)
  tones = []
  for k, (duration, frequency) in enumerate(zip(durations, frequencies, strict=True)):
    tones.append((start, duration, frequency, rng.uniform(MIN_AMPLITUDE, MAX_AMPLITUDE)))
    start += duration + (gaps[k] if k < len(gaps) else 0.0)
  return tones


def _example(rng: random.Random, kind: str, answer: str) -> tuple[list[Tone], str]:
  """(tones, question) of one example whose answer is `answer`."""
  if kind == "count":
    n = CHOICES["count"].index(answer) + 1
    while True:
      durations = [rng.uniform(0.08, 0.15) for _ in range(n)]
      gaps = [rng.uniform(0.08, 0.14) for _ in range(n - 1)]
      if sum(durations) + sum(gaps) <= CLIP_SECONDS - 0.05:
        break
    frequency = rng.uniform(500, 1500)
    tones = _sequence(rng, durations, gaps, [frequency] * n)
  elif kind == "pitch":
    low, high = rng.uniform(300, 600), rng.uniform(1200, 2500)
    frequencies = [low, high] if answer == "up" else [high, low]
    tones = _sequence(rng, [rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.3)],
                      [rng.uniform(0.06, 0.12)], frequencies)
  elif kind == "length":
    short, long = rng.uniform(0.1, 0.2), rng.uniform(0.4, 0.5)
    durations = [long, short] if answer == "first" else [short, long]
    tones = _sequence(rng, durations, [rng.uniform(0.08, 0.15)],
                      [rng.uniform(400, 1500), rng.uniform(400, 1500)])
  else:
    raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
  return tones, rng.choice(_QUESTIONS[kind])


def write(directory: str | os.PathLike[str], num_examples: int, seed: int = 0, *,
          split: int = 0, kinds: Sequence[str] = KINDS) -> list[dict[str, Any]]:
  """Writes `directory/audios/<split>_<i>.wav` for i < num_examples and returns the records
  (see the module docstring), audio paths relative to `directory`."""
  kinds = _synthetic.check_kinds(kinds, CHOICES, "tones")
  if num_examples < 0:
    raise ValueError(f"tones: num_examples must be >= 0, got {num_examples}")
  audios = pathlib.Path(directory) / "audios"
  audios.mkdir(parents=True, exist_ok=True)
  rng = random.Random(f"tones-{seed}-{split}")
  records = []
  for i, (kind, answer) in enumerate(_synthetic.balanced_draws(rng, num_examples, kinds,
                                                               CHOICES)):
    tones, question = _example(rng, kind, answer)
    name = f"audios/{split}_{i}.wav"
    write_wav(audios.parent / name, synthesize(tones), RATE)
    records.append({"messages": [{"role": "user", "content": "<audio>" + question},
                                 {"role": "assistant", "content": answer}],
                    "audios": [name], "answer": answer, "category": kind})
  return records


def prompts(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The RL prompt form of `write`'s records: no assistant turn; audios, answer and category
  kept."""
  return _synthetic.prompts(records)


def chance_accuracy(records: Sequence[Mapping[str, Any]]) -> float:
  """Mean of 1 / len(CHOICES[category]): uniform guessing, the "chance" baseline."""
  return _synthetic.chance_accuracy(records, CHOICES)


def majority_accuracy(records: Sequence[Mapping[str, Any]],
                      train: Sequence[Mapping[str, Any]] | None = None) -> float:
  """Accuracy of always answering each kind's most frequent answer in `train` (default:
  `records` themselves)."""
  return _synthetic.majority_accuracy(records, CHOICES, train)


__all__ = ["CHOICES", "FEATURES", "KINDS", "RATE", "chance_accuracy", "majority_accuracy",
           "prompts", "synthesize", "write"]
