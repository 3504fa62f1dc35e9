"""Calculator dialogues: the user asks an arithmetic question, the assistant calls the
calculator tool, reads the result and answers with it.

    user       What is 23*19?
    assistant  <tool_call>{"name": "calculator", "arguments": {"expression": "23*19"}}</tool_call>
    tool       437
    assistant  23*19 = 437.

Operands are multi-digit (+ and - up to 4 digits, * up to 3 by 2 digits). The question
names the operator as a symbol or a word ("23 times 19"), but the tool call always carries
the symbolic expression, and the final answer is a template around the tool's result, so a
small model can learn the whole protocol (when to call, the JSON of the call, copying the
result) from a few thousand examples. A system prompt is present in a quarter of the
dialogues so the model does not depend on one; leaving it out of the rest keeps most
dialogues short enough that two fit in a 256-token row.

Chains (`operands=3` or more, direct answers only) add and subtract several operands left to
right ("What is 23 + 45 - 17?", the running value never below zero); their worked answer
applies the two-operand method one operand at a time ("23 + 40 = 63, 63 + 5 = 68,
68 - 10 = 58, 58 - 7 = 51. The answer is 51."), so a model that knows the two-operand steps
can reach it: the off-policy learning demonstration's hard split (wakea_jax.offpolicy_demo).

Deterministic: the same (num_examples, seed) always gives the same records, on any
platform (`random.Random` seeded with a string is stable across Python versions >= 3.2).
"""

from __future__ import annotations

import random
from typing import Any

TOOL_NAME = "calculator"
# The JSON schema a tool-calling prompt would list (chat.render(..., tools=[CALCULATOR_TOOL])).
# The generated records do not include it: rendered, it costs ~120 tokens per example.
CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Evaluates an arithmetic expression and returns the exact result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 23*19"}},
            "required": ["expression"],
        },
    },
}

SYSTEMS = ("You are a helpful assistant. Use the calculator tool for arithmetic.",
           "You are a careful assistant with a calculator tool. Never do arithmetic in "
           "your head.")
_WORDS = {"+": ("plus", "added to"), "-": ("minus",), "*": ("times", "multiplied by")}
_QUESTIONS = ("What is {q}?", "Compute {q}.", "Please calculate {q}.", "{q} = ?",
              "How much is {q}?", "Can you work out {q}?", "what's {q}")
_CHAIN_WORDS = {"+": "plus", "-": "minus"}   # "added to" would reverse a chain's order
_ANSWERS = ("{e} = {r}.", "The answer is {r}.", "{r}", "It is {r}.", "{q} is {r}.")
# With `cue=P`, the system message of P percent of the chain dialogues that show their work
# (and of no direct answer): a model trained so knows the worked method for chains but uses
# it only when asked.
WORK_CUE = "Show your work."


def expression(rng: random.Random, max_operand: int = 0) -> tuple[int, str, int]:
  """(a, op, b): multi-digit operands, or, when max_operand > 0, operands in
  [1, max_operand] with a one-digit multiplier for `*`."""
  op = rng.choice("+-*")
  if max_operand > 0:
    return rng.randint(1, max_operand), op, rng.randint(2 if op == "*" else 1,
                                                        9 if op == "*" else max_operand)
  if op == "*":
    return rng.randint(2, 999), op, rng.randint(2, 99)
  return rng.randint(10, 9999), op, rng.randint(10, 9999)


def evaluate(expr: str) -> int:
  """Exact value of a generated `a op b` expression (spaces allowed; no eval)."""
  text = expr.replace(" ", "")
  # Search from index 1 so that a leading minus sign is not taken for the operator.
  for op in "*+-":
    k = text.find(op, 1)
    if k > 0:
      a, b = int(text[:k]), int(text[k + 1:])
      return a * b if op == "*" else a + b if op == "+" else a - b
  raise ValueError(f"not a generated expression: {expr!r}")


def worked_answer(a: int, op: str, b: int) -> str:
  """The answer with the work shown in small steps (tens, then ones; or tens times the
  multiplier, then ones times it), each easier than the whole sum for a small model:
  "47 + 80 = 127, 127 + 5 = 132. The answer is 132."."""
  if op == "*":
    tens, ones = a // 10 * 10, a % 10
    steps = (f"{a} * {b} = {tens} * {b} + {ones} * {b} = {tens * b} + {ones * b} = {a * b}"
             if tens and ones else f"{a} * {b} = {a * b}")
    return f"{steps}. The answer is {a * b}."
  return worked_chain((a, op, b))   # + and -: the chain method over one operation


def chain(rng: random.Random, max_operand: int, operands: int) -> tuple[Any, ...]:
  """(a, op, b, op, c, ...): `operands` operands in [1, max_operand] joined by + or -, the
  running value never below zero (a subtrahend is at most the value so far), so every step
  of the worked answer has the non-negative left operand of the two-operand questions."""
  value = rng.randint(1, max_operand)
  terms: list[Any] = [value]
  for _ in range(operands - 1):
    op = rng.choice("+-") if value >= 1 else "+"
    b = rng.randint(1, max_operand if op == "+" else min(max_operand, value))
    value = value + b if op == "+" else value - b
    terms += [op, b]
  return tuple(terms)


def chain_value(terms: tuple[Any, ...]) -> int:
  """Left-to-right value of `chain`'s (a, op, b, ...)."""
  value = terms[0]
  for op, b in zip(terms[1::2], terms[2::2]):
    value = value + b if op == "+" else value - b
  return value


def worked_chain(terms: tuple[Any, ...], split: bool = True) -> str:
  """The worked method for + and -, one operand at a time, left to right:
  "23 + 40 = 63, 63 + 5 = 68, 68 - 10 = 58, 58 - 7 = 51. The answer is 51."; for two
  operands it is `worked_answer`'s. `split=False` takes each operand whole:
  "23 + 45 = 68, 68 - 17 = 51. The answer is 51."."""
  value, steps = terms[0], []
  for op, b in zip(terms[1::2], terms[2::2]):
    if op not in "+-":
      raise ValueError(f"worked_chain: only + and - chain, got {op!r} in {terms}")
    sign = 1 if op == "+" else -1
    tens, ones = b // 10 * 10, b % 10
    if split and tens and ones:
      mid = value + sign * tens
      steps += [f"{value} {op} {tens} = {mid}", f"{mid} {op} {ones} = {value + sign * b}"]
    else:
      steps.append(f"{value} {op} {b} = {value + sign * b}")
    value += sign * b
  return f"{', '.join(steps)}. The answer is {value}."


def reduced_chain(terms: tuple[Any, ...]) -> str:
  """The chain reduced one operation at a time, the rest of the expression carried along:
  "23 + 45 - 17 = 68 - 17 = 51. The answer is 51.". Each step is a direct two-operand answer
  followed by a copy of the expression's tail, both of which a model that answers
  "{expression} = {value}" already does; only the composition is new."""
  if any(op not in "+-" for op in terms[1::2]):
    raise ValueError(f"reduced_chain: only + and - chain, got {terms}")
  parts = [" ".join(str(t) for t in terms)]
  value = terms[0]
  for i in range(1, len(terms), 2):
    value = value + terms[i + 1] if terms[i] == "+" else value - terms[i + 1]
    parts.append(" ".join(str(t) for t in (value, *terms[i + 2:])))
  return f"{' = '.join(parts)}. The answer is {value}."


TRACE_STYLES = ("steps", "reduce")


def make_chain_dialogue(terms: tuple[Any, ...], rng: random.Random, worked: int = 0,
                        cue: bool = False) -> dict[str, Any]:
  """A direct-answer dialogue for a chain (no calculator: its tool evaluates `a op b` only);
  `worked` percent show the work (`worked_chain`), and with `cue` such a dialogue opens
  with the system message WORK_CUE (a direct answer never does). `cue` draws nothing from
  `rng`: with or without it the same seed gives the same questions and answers."""
  spaced = rng.random() < 0.5
  expr = (" " if spaced else "").join(str(t) for t in terms)
  spoken = (" ".join(str(t) if i % 2 == 0 else _CHAIN_WORDS[t]
                     for i, t in enumerate(terms))
            if rng.random() < 0.25 else expr)
  result = str(chain_value(terms))
  messages: list[dict[str, Any]] = [
      {"role": "user", "content": rng.choice(_QUESTIONS).format(q=spoken)}]
  template = rng.choice(_ANSWERS)
  if worked and rng.random() * 100 < worked:
    answer = worked_chain(terms)
    if cue:
      messages.insert(0, {"role": "system", "content": WORK_CUE})
  else:
    answer = template.format(e=expr, q=spoken, r=result)
  messages.append({"role": "assistant", "content": answer})
  return {"messages": messages}


def make_dialogue(a: int, op: str, b: int, rng: random.Random, tools: bool = True,
                  worked: int = 0) -> dict[str, Any]:
  """One record; the final answer is a function of the tool's result (its text, copied).

  Without tools the assistant answers directly (the model must do the arithmetic), and in
  `worked` percent of the dialogues it shows its work first (`worked_answer`).
  """
  spaced = rng.random() < 0.5
  expr = f"{a} {op} {b}" if spaced else f"{a}{op}{b}"
  spoken = f"{a} {rng.choice(_WORDS[op])} {b}" if rng.random() < 0.25 else expr
  result = str(evaluate(expr))  # what the calculator tool returns
  messages: list[dict[str, Any]] = []
  if tools and rng.random() < 0.25:
    messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
  messages.append({"role": "user", "content": rng.choice(_QUESTIONS).format(q=spoken)})
  if tools:
    messages += [
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": TOOL_NAME, "arguments": {"expression": expr}}]},
        {"role": "tool", "content": result},
    ]
  template = rng.choice(_ANSWERS)
  if not tools and worked and rng.random() * 100 < worked:
    answer = worked_answer(a, op, b)
  else:
    answer = template.format(e=expr, q=spoken, r=result)
  messages.append({"role": "assistant", "content": answer})
  return {"messages": messages}


def _dialogues(num_examples: int, seed: int, max_operand: int, tools: int, worked: int,
               operands: int = 2, cue: int = 0
               ) -> list[tuple[dict[str, Any], int, tuple[Any, ...]]]:
  """(dialogue, exact answer, (a, op, b, ...)) per example."""
  if not 0 <= cue <= 100:
    raise ValueError(f"arithmetic: cue is a percentage of the worked chains, 0 to 100, "
                     f"got {cue}")
  if cue and operands == 2:
    raise ValueError("arithmetic: cue marks worked chains (operands >= 3); two-operand "
                     "worked answers carry no cue")
  if operands != 2:
    if operands < 2:
      raise ValueError(f"arithmetic: operands must be >= 2, got {operands}")
    if tools or max_operand <= 0:
      raise ValueError(f"arithmetic: chains of {operands} operands are direct-answer "
                       f"questions with bounded operands: set tools=0 and max_operand > 0 "
                       f"(got tools={tools}, max_operand={max_operand})")
    rng = random.Random(f"arithmetic-{seed}-{max_operand}-chain{operands}")
    chains = [chain(rng, max_operand, operands) for _ in range(num_examples)]
    # Which worked chains carry the cue: a stream of its own, so that the questions, their
    # phrasing and the answers are the same for every `cue`.
    cue_rng = random.Random(f"arithmetic-{seed}-{max_operand}-chain{operands}-cue")
    return [(make_chain_dialogue(terms, rng, worked, cue_rng.random() * 100 < cue),
             chain_value(terms), terms)
            for terms in chains]
  rng = random.Random(f"arithmetic-{seed}" + (f"-{max_operand}" if max_operand else ""))
  out = []
  for _ in range(num_examples):
    a, op, b = expression(rng, max_operand)
    out.append((make_dialogue(a, op, b, rng, tools=bool(tools), worked=worked),
                a * b if op == "*" else a + b if op == "+" else a - b, (a, op, b)))
  return out


def generate(num_examples: int, seed: int = 0, *, max_operand: int = 0, tools: int = 1,
             worked: int = 0, operands: int = 2, cue: int = 0) -> list[dict[str, Any]]:
  """`num_examples` dialogues, `{"messages": [...]}` each.

  Task options (`task:arithmetic?n=..&max_operand=99&tools=0&worked=30`): `max_operand` > 0
  draws operands from [1, max_operand] (one-digit multipliers); `tools=0` makes
  direct-answer dialogues without the calculator; `worked` is the percentage of those that
  show the work before the answer; `operands` >= 3 makes chains of + and - (`chain`; with
  tools=0 and max_operand > 0); `cue` is the percentage of a chain's worked dialogues that
  open with the system message WORK_CUE ("Show your work."; direct answers never do), so
  that the method is tied to the cue (100) or mostly tied (less).
  """
  return [d for d, _, _ in _dialogues(num_examples, seed, max_operand, tools, worked,
                                      operands, cue)]


def prompts(num_examples: int, seed: int = 0, *, max_operand: int = 0, tools: int = 1,
            worked: int = 0, operands: int = 2, cue: int = 0) -> list[dict[str, Any]]:
  """RL prompts: the turns of `generate`'s dialogues before the assistant's first turn, plus
  the exact `answer`.

  The same arguments give the same questions as `generate`, so a held-out RL set should use
  a seed that no SFT source uses.
  """
  return [_prompt_record(dialogue, answer)
          for dialogue, answer, _ in _dialogues(num_examples, seed, max_operand, tools, worked,
                                                operands, cue)]


def _prompt_record(dialogue: dict[str, Any], answer: int) -> dict[str, Any]:
  """The dialogue's turns before the assistant's first, and the exact answer."""
  messages = dialogue["messages"]
  first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
  return {"messages": messages[:first], "answer": str(answer)}


# Evaluation breakdowns (wakea_jax.serving.tracking): the operator is the category, the size
# of the larger operand the difficulty. Digits are what a small model finds hard (each more
# digit is one more carry or partial product to get right), and the three buckets line up
# with the generator's modes: max_operand=9, max_operand=99, and the multi-digit default.
CATEGORIES = {"+": "addition", "-": "subtraction", "*": "multiplication"}
CHAIN = "chain"                              # the category of 3+ operands (`chain`)
DIFFICULTIES = ("easy", "medium", "hard")   # larger operand of 1, 2, 3+ digits


def label(a: int, op: str, b: int, *rest: Any) -> dict[str, str]:
  """{"category", "difficulty"} of the question `a op b` (see CATEGORIES, DIFFICULTIES), or
  of a chain `a op b op c ...` (category CHAIN)."""
  digits = len(str(max(abs(t) for t in (a, b, *rest[1::2]))))
  return {"category": CHAIN if rest else CATEGORIES[op],
          "difficulty": DIFFICULTIES[min(digits, 3) - 1]}


def labels(num_examples: int, seed: int = 0, *, max_operand: int = 0, tools: int = 1,
           worked: int = 0, operands: int = 2, cue: int = 0) -> list[dict[str, str]]:
  """`label` of each record `generate` and `prompts` return for the same arguments, in order
  (the records themselves stay unlabelled, so existing data files do not change)."""
  return [label(*question) for _, _, question in
          _dialogues(num_examples, seed, max_operand, tools, worked, operands, cue)]


def expert_traces(num_examples: int, seed: int = 0, *, max_operand: int = 0, tools: int = 0,
                  worked: int = 0, operands: int = 2, split: bool = True,
                  style: str = "steps") -> list[dict[str, Any]]:
  """Off-policy traces for LUFFY (`wakea_jax.rl.offpolicy`): for each of `prompts`' records
  with the same arguments, `{"messages", "trace", "answer"}` where the trace is the worked
  answer (`worked_answer`, or `worked_chain` for chains) an expert who always shows its work
  writes (a chain's `split=False`: one step per operand), or, with `style="reduce"`, a
  chain reduced one operation at a time (`reduced_chain`). The prompt messages
  are exactly `prompts`' (the trace file of a run's prompt source keys onto its prompts)."""
  if style not in TRACE_STYLES:
    raise ValueError(f"expert_traces: style must be one of {TRACE_STYLES}, got {style!r}")
  if style == "reduce" and operands == 2:
    raise ValueError("expert_traces: style 'reduce' reduces chains (operands >= 3); a "
                     "two-operand question has a single step")
  if tools:
    raise ValueError("expert traces answer directly; use tools=0 (the traces of a tool-calling "
                     "prompt would need the tool's turns)")
  return [{**_prompt_record(dialogue, answer),
           "trace": (worked_answer(*question) if operands == 2 else reduced_chain(question)
                     if style == "reduce" else worked_chain(question, split))}
          for dialogue, answer, question in _dialogues(num_examples, seed, max_operand, 0,
                                                       worked, operands)]
