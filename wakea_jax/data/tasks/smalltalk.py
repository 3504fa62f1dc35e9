"""A small templated chat set: greetings, thanks, capitals, colours, opposites, simple facts,
and counting (with a reasoning block), single- and two-turn.

Everything is generated from the tables below, so there are no data files; the same
(num_examples, seed) always gives the same records.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

Messages = list[dict[str, Any]]

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
             "Germany": "Berlin", "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi",
             "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi", "Chile": "Santiago",
             "Greece": "Athens", "Poland": "Warsaw", "Ireland": "Dublin", "Cuba": "Havana"}
_COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
            "coal": "black", "a tomato": "red", "an orange": "orange", "a lemon": "yellow",
            "milk": "white", "a strawberry": "red"}
_OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark",
              "open": "closed", "early": "late", "happy": "sad", "old": "new", "wet": "dry"}
_FACTS = (("How many days are in a week?", "There are 7 days in a week."),
          ("How many legs does a spider have?", "A spider has 8 legs."),
          ("How many legs does a dog have?", "A dog has 4 legs."),
          ("How many months are in a year?", "There are 12 months in a year."),
          ("How many hours are in a day?", "There are 24 hours in a day."),
          ("What do bees make?", "Bees make honey."),
          ("What is frozen water called?", "Frozen water is called ice."),
          ("Which planet do we live on?", "We live on Earth."))
_NAMES = ("Ada", "Alan", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Edsger")


def _capital(rng: random.Random) -> Messages:
  country = rng.choice(sorted(_CAPITALS))
  question = rng.choice(("What is the capital of {c}?", "Which city is the capital of {c}?",
                         "Name the capital of {c}."))
  return [{"role": "user", "content": question.format(c=country)},
          {"role": "assistant", "content": f"The capital of {country} is {_CAPITALS[country]}."}]


def _colour(rng: random.Random) -> Messages:
  thing = rng.choice(sorted(_COLOURS))
  question = rng.choice(("What colour is {t}?", "What color is {t}?"))
  return [{"role": "user", "content": question.format(t=thing)},
          {"role": "assistant", "content": f"{thing[0].upper()}{thing[1:]} is {_COLOURS[thing]}."}]


def _opposite(rng: random.Random) -> Messages:
  word = rng.choice(sorted(_OPPOSITES))
  return [{"role": "user", "content": f"What is the opposite of {word}?"},
          {"role": "assistant", "content": f"The opposite of {word} is {_OPPOSITES[word]}."}]


def _fact(rng: random.Random) -> Messages:
  question, answer = rng.choice(_FACTS)
  return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _count(rng: random.Random) -> Messages:
  start, count = rng.randint(1, 20), rng.randint(3, 6)
  numbers = ", ".join(str(start + i) for i in range(count))
  return [{"role": "user", "content": f"Count {count} numbers starting at {start}."},
          {"role": "assistant", "reasoning": f"Start at {start} and add one each time.",
           "content": numbers + "."}]


def _greeting(rng: random.Random) -> Messages:
  name = rng.choice(_NAMES)
  hello = rng.choice(("Hello", "Hi", "Good morning"))
  messages = [{"role": "user", "content": f"{hello}, I am {name}."},
              {"role": "assistant", "content": f"{hello} {name}! How can I help you today?"}]
  if rng.random() < 0.5:  # a second turn: the model must use the earlier context
    messages += [{"role": "user", "content": "What is my name?"},
                 {"role": "assistant", "content": f"Your name is {name}."}]
  return messages


def _thanks(rng: random.Random) -> Messages:
  return [{"role": "user", "content": rng.choice(("Thank you!", "Thanks a lot.", "Thanks!"))},
          {"role": "assistant", "content": rng.choice(("You're welcome!",
                                                       "Happy to help."))}]


_KINDS: tuple[Callable[[random.Random], Messages], ...] = (
    _capital, _colour, _opposite, _fact, _count, _greeting, _thanks)


def generate(num_examples: int, seed: int = 0) -> list[dict[str, Any]]:
  """`num_examples` short conversations, `{"messages": [...]}` each."""
  rng = random.Random(f"smalltalk-{seed}")
  return [{"messages": rng.choice(_KINDS)(rng)} for _ in range(num_examples)]
