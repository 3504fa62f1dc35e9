"""Calculator dialogues: the user asks an arithmetic question, the assistant calls the
calculator tool, reads the result and answers with it.

The answer is a copy of the tool result, so a small model can learn the whole protocol
(when to call, the JSON of the call, copying the result) from a few thousand examples.
"""

from __future__ import annotations

import random

SYSTEM = "You are a helpful assistant. Use the calculator tool for arithmetic."

_QUESTIONS = ("What is {e}?", "Compute {e}.", "Please calculate {e}.", "{e} = ?",
              "How much is {e}?", "Can you work out {e}?")
_ANSWERS = ("{e} = {r}.", "The answer is {r}.", "{r}", "It is {r}.")


def expression(rng: random.Random) -> str:
  op = rng.choice("+-*")
  if op == "*":
    a, b = rng.randint(2, 99), rng.randint(2, 99)
  else:
    a, b = rng.randint(10, 9999), rng.randint(10, 9999)
  return f"{a}{op}{b}" if rng.random() < 0.5 else f"{a} {op} {b}"


def evaluate(expr: str) -> int:
  """Exact integer value of a generated `a op b` expression (no eval)."""
  for op in "*+-":
    left, sep, right = expr.replace(" ", "").partition(op)
    if sep and left and right:
      a, b = int(left), int(right)
      return a * b if op == "*" else a + b if op == "+" else a - b
  raise ValueError(f"not a generated expression: {expr!r}")


def make_dialogue(expr: str, rng: random.Random) -> dict:
  result = evaluate(expr)
  return {"messages": [
      {"role": "system", "content": SYSTEM},
      {"role": "user", "content": rng.choice(_QUESTIONS).format(e=expr)},
      {"role": "assistant", "content": "",
       "tool_calls": [{"name": "calculator", "arguments": {"expression": expr}}]},
      {"role": "tool", "content": str(result)},
      {"role": "assistant", "content": rng.choice(_ANSWERS).format(e=expr, r=result)},
  ]}


def generate(num_examples: int, seed: int = 0) -> list[dict]:
  rng = random.Random(f"arithmetic-{seed}")
  return [make_dialogue(expression(rng), rng) for _ in range(num_examples)]
