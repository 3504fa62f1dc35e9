"""A small templated chat set: greetings, capitals, colours, opposites, counting."""

from __future__ import annotations

import random

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
             "Germany": "Berlin", "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi",
             "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi", "Chile": "Santiago"}
_COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
            "coal": "black", "a tomato": "red", "an orange": "orange"}
_OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark",
              "open": "closed", "early": "late", "happy": "sad"}


def _one(rng: random.Random) -> list[dict]:
  kind = rng.randrange(5)
  if kind == 0:
    country = rng.choice(sorted(_CAPITALS))
    return [{"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {_CAPITALS[country]}."}]
  if kind == 1:
    thing = rng.choice(sorted(_COLOURS))
    return [{"role": "user", "content": f"What colour is {thing}?"},
            {"role": "assistant", "content": f"{thing[0].upper() + thing[1:]} is {_COLOURS[thing]}."}]
  if kind == 2:
    word = rng.choice(sorted(_OPPOSITES))
    return [{"role": "user", "content": f"What is the opposite of {word}?"},
            {"role": "assistant", "content": f"The opposite of {word} is {_OPPOSITES[word]}."}]
  if kind == 3:
    start = rng.randint(1, 20)
    count = rng.randint(3, 6)
    numbers = ", ".join(str(start + i) for i in range(count))
    return [{"role": "user", "content": f"Count {count} numbers starting at {start}."},
            {"role": "assistant", "reasoning": f"Start at {start} and add one each time.",
             "content": numbers + "."}]
  name = rng.choice(["Ada", "Alan", "Grace", "Linus", "Margaret", "Ken"])
  return [{"role": "user", "content": f"Hello, I am {name}."},
          {"role": "assistant", "content": f"Hello {name}! How can I help you today?"}]


def generate(num_examples: int, seed: int = 0) -> list[dict]:
  rng = random.Random(f"smalltalk-{seed}")
  return [{"messages": _one(rng)} for _ in range(num_examples)]
