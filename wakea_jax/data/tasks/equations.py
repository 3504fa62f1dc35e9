"""Multi-step linear equations with a programmatic expert (issue 16, item 5): the bundled
hard task for SFT, SRL and RLVR, whose expert trajectories need no teacher model.

    user       Solve for x: 3(x + 4) - 5 = 2x + 9
    assistant  <think>expand the brackets</think>
               Step 1: 3x + 12 - 5 = 2x + 9
               <think>collect constants</think>
               Step 2: 3x + 7 = 2x + 9
               <think>subtract 2x from both sides</think>
               Step 3: x + 7 = 9
               <think>subtract 7 from both sides</think>
               Step 4: x = 2
               <answer>2</answer>

Why this task. The level of a problem is exactly the number of steps of its expert solution
(1 to MAX_LEVEL = 6); each step is one named transformation, and the final answer is right
only if every step is. Outcome-only RL on a from-scratch model therefore sees almost no
reward at levels 4-6 (it must get 4-6 equations right in a row before the first reward),
while step-wise similarity to the expert's next equation (SRL) rewards every partly right
step. A few expert solutions are easy to memorise (SFT over-fits); the held-out split shares
no equation with the train split. Answers are integers and every number in every step is at
most MAX_NUMBER in magnitude, so a 1,024-piece tokenizer spells them in a few tokens: with the
bundled tokenizer a whole solution takes about 37, 63, 90, 126, 159 and 199 tokens at levels
1-6 (without the <think> lines 26 to 130), the question 11 to 29 and SYSTEM 40. Answers of
levels 3-6 lie in [-12, 15] and no value has more than ~5%, so guessing earns little reward.

Task options (integers, as every task spec's): `split` 0 train / 1 held-out (a hash of the
equation text puts HELD_OUT_PERCENT of all equations in held-out, so the splits are disjoint
for every seed); `level` 0 a mix, k only level k; with `level` 0, `min_level` and `max_level`
bound the mix, whose i-th record has level min_level + i % (max_level - min_level + 1).
The hard held-out set is `task:equations?n=256&seed=7&split=1&min_level=4` (4-6 steps).

`check_step` is the verifier's step check: a tiny linear-expression parser (no eval; in
linear_equations.py, re-exported here) turns both equations into a*x + b = 0 and compares
their solution sets, so a trajectory with a wrong step is rejected even when its final answer
is right (`first_error`).

Deterministic: the same arguments give the same records on any platform (`random.Random`
seeded with a string; the split hash is SHA-256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# The verifier's step check lives in linear_equations.py (a parser, not a generator); its
# public names are re-exported here, where the task's users look for them.
from wakea_jax.data.tasks.linear_equations import MAX_EQUATION_CHARS as MAX_EQUATION_CHARS
from wakea_jax.data.tasks.linear_equations import check_step as check_step
from wakea_jax.data.tasks.linear_equations import parse_equation as parse_equation
from wakea_jax.data.tasks.linear_equations import solution_set as solution_set

TASK = "equations"
MAX_LEVEL = 6
MAX_NUMBER = 99
HELD_OUT_PERCENT = 20
DIFFICULTIES = ("easy", "medium", "hard")   # 1-2, 3, 4-6 steps
PROMPT_PREFIX = "Solve for x: "

# Short on purpose: every token of a system prompt is paid on every rollout of a small model.
SYSTEM = "Solve for x step by step, one equation per step. Put the answer in <answer></answer>."

RULES: tuple[str, ...] = (
    "Adding the same number to both sides keeps the solution.",
    "Subtracting the same number from both sides keeps the solution.",
    "Multiplying both sides by the same nonzero number keeps the solution.",
    "Dividing both sides by the same nonzero number keeps the solution.",
    "Expand a bracket by multiplying each term inside it: 3(x + 4) = 3x + 12.",
    "A minus sign before a bracket changes the sign of every term inside: -2(x - 3) = -2x + 6.",
    "Collect like terms: add the x terms together and the constants together, 3x + 2x = 5x.",
    "Move the x terms to one side: subtract the x term of the right side from both sides.",
    "Move the constants to the other side: subtract the constant of the x side from both sides.",
    "When the equation reads ax = b, divide both sides by a to get x = b/a.",
    "To remove a fraction (expression)/m, multiply both sides by m first.",
    "Check the answer by substituting it into the original equation: both sides must be equal.",
    "Write one equation per step, each after exactly one transformation.",
)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One equation, its integer solution, and the expert's (reasoning, action) steps."""

  text: str                                  # "3(x + 4) - 5 = 2x + 9"
  answer: int
  steps: tuple[tuple[str, str], ...]         # (("expand the brackets", "3x + 12 - 5 = ..."), ...)
  level: int                                 # == len(steps)


# ------------------------------------------------------------------------------------------
# Structured equations (generation and the expert solver)
# ------------------------------------------------------------------------------------------
# A term is ("x", a) for a*x, ("c", b) for a constant, or ("b", k, inner) for k(inner) with
# inner a tuple of x/c terms. A side is (terms, m): the sum of its terms divided by m.
Term = tuple[Any, ...]
Side = tuple[tuple[Term, ...], int]


class _Reject(Exception):
  """A sampled equation that does not fit its level (resampled, never seen by callers)."""


def _render_terms(terms: Sequence[Term]) -> str:
  out = []
  for term in terms:
    value = term[1]
    if term[0] == "x":
      body = "x" if abs(value) == 1 else f"{abs(value)}x"
    elif term[0] == "c":
      body = str(abs(value))
    else:
      body = f"{abs(value) if abs(value) != 1 else ''}({_render_terms(term[2])})"
    if not out:
      out.append(f"-{body}" if value < 0 else body)
    else:
      out.append(f" - {body}" if value < 0 else f" + {body}")
  return "".join(out) or "0"


def _render_side(side: Side) -> str:
  terms, m = side
  text = _render_terms(terms)
  if m == 1:
    return text
  return f"{text}/{m}" if len(terms) == 1 else f"({text})/{m}"   # "x/3", "5(x + 5)/2"


def _render(lhs: Side, rhs: Side) -> str:
  return f"{_render_side(lhs)} = {_render_side(rhs)}"


def _scale(terms: Sequence[Term], m: int) -> tuple[Term, ...]:
  return tuple((t[0], t[1] * m, *t[2:]) for t in terms)


def _expand(terms: Sequence[Term]) -> tuple[Term, ...]:
  out: list[Term] = []
  for t in terms:
    out.extend(_scale(t[2], t[1]) if t[0] == "b" else [t])
  return tuple(out)


def _sum(terms: Sequence[Term], kind: str) -> int:
  return sum(t[1] for t in terms if t[0] == kind)


def _collected(terms: Sequence[Term]) -> tuple[Term, ...]:
  """One x term, then one constant, each left out when zero (brackets already expanded)."""
  a, b = _sum(terms, "x"), _sum(terms, "c")
  return tuple(t for t in (("x", a), ("c", b)) if t[1])


def _solve(lhs: Side, rhs: Side) -> tuple[tuple[tuple[str, str], ...], int]:
  """The expert's steps for `lhs = rhs` and the integer answer: clear the fraction, expand the
  brackets, collect like terms, move the x terms left, the constants right, divide."""
  steps: list[tuple[str, str]] = []
  (left, lm), (right, rm) = lhs, rhs
  if lm != 1 or rm != 1:
    if lm != 1 and rm != 1:
      raise _Reject("fractions on both sides")
    m = lm if lm != 1 else rm
    left, right = (left, _scale(right, m)) if lm != 1 else (_scale(left, m), right)
    steps.append((f"multiply both sides by {m}", _render((left, 1), (right, 1))))
  brackets = sum(t[0] == "b" for t in (*left, *right))
  if brackets:
    left, right = _expand(left), _expand(right)
    steps.append((f"expand the bracket{'s' if brackets > 1 else ''}",
                  _render((left, 1), (right, 1))))
  kinds = {t[0] for side in (left, right) for t in side
           if sum(u[0] == t[0] for u in side) > 1}
  if kinds:
    left, right = _collected(left), _collected(right)
    name = ("collect like terms" if len(kinds) == 2 else
            "collect the x terms" if "x" in kinds else "collect constants")
    steps.append((name, _render((left, 1), (right, 1))))
  left, right = _collected(left), _collected(right)   # x term first, then the constant
  c = _sum(right, "x")
  if c:
    left = _collected((*left, ("x", -c)))
    right = tuple(t for t in right if t[0] != "x")
    what = "x" if abs(c) == 1 else f"{abs(c)}x"
    steps.append((f"subtract {what} from both sides" if c > 0 else f"add {what} to both sides",
                  _render((left, 1), (right, 1))))
  a, b = _sum(left, "x"), _sum(left, "c")
  if a == 0:
    raise _Reject("no unique solution")
  if b:
    left, right = (("x", a),), _collected((*right, ("c", -b)))
    steps.append((f"subtract {b} from both sides" if b > 0 else f"add {-b} to both sides",
                  _render((left, 1), (right, 1))))
  d = _sum(right, "c")
  if a != 1:
    if d % a:
      raise _Reject("not an integer solution")
    steps.append((f"divide both sides by {a}", f"x = {d // a}"))
  return tuple(steps), d // a


# Templates per level: rng -> (lhs, rhs). Each picks the answer x0 first, then parameters, and
# sets the last constant so that x0 solves the equation; `_sample` rejects the rare draw whose
# solver path is shorter or longer than its level or whose numbers get too large.
def _nz(rng: random.Random, low: int, high: int) -> int:
  return rng.choice([v for v in range(-high, high + 1) if low <= abs(v)])


def _x0(rng: random.Random) -> int:
  return rng.randint(-12, 15)


def _level1(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(3)
  if kind == 0:                                       # x + b = c
    b = _nz(rng, 1, 15)
    return ((("x", 1), ("c", b)), 1), ((("c", x0 + b),), 1)
  if kind == 1:                                       # ax = c
    a = _nz(rng, 2, 9)
    return ((("x", a),), 1), ((("c", a * x0),), 1)
  m = rng.randint(2, 5)                               # x/m = q (x0 = m q)
  return ((("x", 1),), m), ((("c", x0),), 1)


def _level2(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(4)
  b = _nz(rng, 1, 12)
  if kind == 0:                                       # ax + b = c
    a = _nz(rng, 2, 9)
    return ((("x", a), ("c", b)), 1), ((("c", a * x0 + b),), 1)
  if kind == 1:                                       # (x + b)/m = q
    m = rng.randint(2, 5)
    return ((("x", 1), ("c", b)), m), ((("c", x0),), 1)    # x0 is the quotient here
  if kind == 2:                                       # ax + ex = c
    a, e = _nz(rng, 1, 9), _nz(rng, 1, 9)
    return ((("x", a), ("x", e)), 1), ((("c", (a + e) * x0),), 1)
  e = _nz(rng, 1, 12)                                 # x + b + e = c
  return ((("x", 1), ("c", b), ("c", e)), 1), ((("c", x0 + b + e),), 1)


def _level3(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(4)
  b = _nz(rng, 1, 12)
  if kind == 0:                                       # ax + b = cx + d
    a, c = _nz(rng, 1, 9), _nz(rng, 1, 9)
    return ((("x", a), ("c", b)), 1), ((("x", c), ("c", (a - c) * x0 + b)), 1)
  if kind == 1:                                       # k(x + b) = c
    k = _nz(rng, 2, 6)
    return ((("b", k, (("x", 1), ("c", b))),), 1), ((("c", k * (x0 + b)),), 1)
  if kind == 2:                                       # (ax + b)/m = q
    a, m = _nz(rng, 2, 6), rng.randint(2, 5)
    q = rng.randint(-9, 9)
    return ((("x", a), ("c", q * m - a * x0)), m), ((("c", q),), 1)
  c = _nz(rng, 2, 6)                                  # x + b = cx + d
  return ((("x", 1), ("c", b)), 1), ((("x", c), ("c", (1 - c) * x0 + b)), 1)


def _bracket(rng: random.Random, low: int = 2, high: int = 6) -> tuple[int, int]:
  return _nz(rng, low, high), _nz(rng, 1, 9)


def _level4(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(3)
  k, b = _bracket(rng)
  inner = (("x", 1), ("c", b))
  if kind == 0:                                       # k(x + b) = cx + d
    c = _nz(rng, 1, 6)
    return ((("b", k, inner),), 1), ((("x", c), ("c", (k - c) * x0 + k * b)), 1)
  if kind == 1:                                       # k(x + b) + e = (k - 1)x + d
    e = _nz(rng, 1, 12)
    c = k - 1
    return (((("b", k, inner), ("c", e)), 1),
            ((("x", c), ("c", x0 + k * b + e)), 1))
  a, e, c = _nz(rng, 1, 9), _nz(rng, 1, 9), _nz(rng, 1, 6)   # ax + b + ex = cx + d
  return ((("x", a), ("c", b), ("x", e)), 1), ((("x", c), ("c", (a + e - c) * x0 + b)), 1)


def _level5(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(3)
  k, b = _bracket(rng)
  inner = (("x", 1), ("c", b))
  if kind == 0:                                       # k(x + b) + e = cx + d
    e, c = _nz(rng, 1, 12), _nz(rng, 1, 6)
    return (((("b", k, inner), ("c", e)), 1),
            ((("x", c), ("c", (k - c) * x0 + k * b + e)), 1))
  if kind == 1:                                       # k1(x + b1) + e = k2(x + b2)
    e = _nz(rng, 1, 12)
    k2 = _nz(rng, 2, 5)
    lhs_value = k * (x0 + b) + e
    if (lhs_value - k2 * x0) % k2:
      raise _Reject("bracket constant not an integer")
    b2 = (lhs_value - k2 * x0) // k2
    if b2 == 0:
      raise _Reject("empty bracket constant")
    return (((("b", k, inner), ("c", e)), 1), ((("b", k2, (("x", 1), ("c", b2))),), 1))
  m, c = rng.randint(2, 3), _nz(rng, 1, 3)             # k(x + b)/m = cx + d
  if (k * (x0 + b)) % m or k % m == 0:                # k % m == 0 would cancel at sight
    raise _Reject("fraction not an integer")
  return ((("b", k, inner),), m), ((("x", c), ("c", k * (x0 + b) // m - c * x0)), 1)


def _level6(rng: random.Random) -> tuple[Side, Side]:
  x0, kind = _x0(rng), rng.randrange(2)
  k, b = _bracket(rng)
  inner = (("x", 1), ("c", b))
  m, e = rng.randint(2, 3), _nz(rng, 1, 12)
  if k % m == 0:
    raise _Reject("the fraction would cancel at sight")
  numerator = k * (x0 + b) + e
  if numerator % m:
    e -= numerator % m                                # make the fraction an integer at x0
    numerator = k * (x0 + b) + e
    if e == 0:
      raise _Reject("empty constant")
  lhs = ((("b", k, inner), ("c", e)), m)
  if kind == 0:                                       # (k(x + b) + e)/m = cx + d
    c = _nz(rng, 1, 3)
    return lhs, ((("x", c), ("c", numerator // m - c * x0)), 1)
  k2 = _nz(rng, 2, 4)                                 # (k(x + b) + e)/m = k2(x + b2)
  if (numerator // m - k2 * x0) % k2:
    raise _Reject("bracket constant not an integer")
  b2 = (numerator // m - k2 * x0) // k2
  if b2 == 0:
    raise _Reject("empty bracket constant")
  return lhs, ((("b", k2, (("x", 1), ("c", b2))),), 1)


_TEMPLATES: dict[int, Callable[[random.Random], tuple[Side, Side]]] = {
    1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5, 6: _level6}
_NUMBERS = re.compile(r"\d+")


def held_out(text: str) -> bool:
  """Whether the equation `text` belongs to the held-out split (SHA-256 of the text)."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def _pruned(side: Side) -> Side:
  """`side` without zero terms (a computed constant can be 0: "3x + 4 = 2x", not "2x + 0";
  bracket constants are drawn nonzero)."""
  return tuple(t for t in side[0] if t[1] != 0), side[1]


def _sample(rng: random.Random, level: int, split: int) -> Problem:
  """A problem of exactly `level` steps in `split` (rejection sampling)."""
  for _ in range(10_000):
    try:
      lhs, rhs = (_pruned(side) for side in _TEMPLATES[level](rng))
      steps, answer = _solve(lhs, rhs)
    except _Reject:
      continue
    text = _render(lhs, rhs)
    numbers = [int(n) for s in (text, *(a for _, a in steps)) for n in _NUMBERS.findall(s)]
    if len(steps) == level and max(numbers) <= MAX_NUMBER and held_out(text) == bool(split):
      return Problem(text, answer, steps, level)
  raise RuntimeError(f"equations: no level-{level} problem after 10000 draws (a template bug)")


def _check_options(split: int, level: int, min_level: int, max_level: int) -> None:
  if split not in (0, 1):
    raise ValueError(f"equations: option 'split' must be 0 (train) or 1 (held-out), got {split}")
  if not 0 <= level <= MAX_LEVEL:
    raise ValueError(f"equations: option 'level' must be 0 (a mix) or 1..{MAX_LEVEL}, got "
                     f"{level}")
  if not 1 <= min_level <= max_level <= MAX_LEVEL:
    raise ValueError(f"equations: options need 1 <= min_level <= max_level <= {MAX_LEVEL}, got "
                     f"min_level={min_level}, max_level={max_level}")


def problems(num_examples: int, seed: int = 0, *, split: int = 0, level: int = 0,
             min_level: int = 1, max_level: int = MAX_LEVEL, stream: str = "problems"
             ) -> list[Problem]:
  """`num_examples` problems of `split` (0 train, 1 held-out) and `level` (module docstring).

  Distinct while the level's pool allows (an equation already drawn is redrawn up to 100
  times in a row, then accepted), so small `n` never repeats a problem. `stream` names an
  independent random stream (worked_examples uses its own, so they are not the training set).
  """
  _check_options(split, level, min_level, max_level)
  rng = random.Random(f"{TASK}-{stream}-{seed}-{split}-{level}-{min_level}-{max_level}")
  out: list[Problem] = []
  seen: set[str] = set()
  while len(out) < num_examples:
    k = level or min_level + len(out) % (max_level - min_level + 1)
    for _ in range(100):
      problem = _sample(rng, k, split)
      if problem.text not in seen:
        break
    seen.add(problem.text)
    out.append(problem)
  return out


# ------------------------------------------------------------------------------------------
# Solution text: render, parse, check
# ------------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_STEP = re.compile(r"\bstep\s*\d+\s*:[ \t]*([^\n<]*)", re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _pair(step: tuple[str, str] | Mapping[str, Any]) -> tuple[str | None, str]:
  if isinstance(step, Mapping):
    return step.get("reasoning"), step["action"]
  return step[0], step[1]


def render_solution(steps: Sequence[tuple[str, str] | Mapping[str, Any]], answer: int | str,
                    *, with_reasoning: bool = True) -> str:
  """The canonical solution text: per step "<think>reasoning</think>" (when `with_reasoning`
  and the step has one) and "Step k: equation", then "<answer>answer</answer>".

  `steps` are (reasoning, action) pairs (Problem.steps) or trajectory dicts
  {"action", "reasoning"?}; the SRL prompts and the SFT targets share this one format.
  """
  lines = []
  for k, step in enumerate(steps, 1):
    reasoning, action = _pair(step)
    if with_reasoning and reasoning:
      lines.append(f"<think>{reasoning}</think>")
    lines.append(f"Step {k}: {action}")
  lines.append(f"<answer>{answer}</answer>")
  return "\n".join(lines)


def parse_steps(text: str) -> list[str]:
  """The equations of the "Step k:" lines of a solution text, in order (stripped).

  Complete <think> blocks are removed first, so a "Step 3:" inside a monologue is not an
  action; missing think blocks, spacing and the step numbers themselves are not checked.
  """
  return [m.group(1).strip() for m in _STEP.finditer(_THINK.sub("", text))]


def first_error(problem: str, solution: str) -> str | None:
  """Why a solution text is wrong, or None when it is right: every step equivalent to the one
  before (the first to `problem`, with or without the "Solve for x: " prefix), the last step
  "x = v", and the <answer> equal to v. The verifier's check beyond the final answer."""
  previous = problem.removeprefix(PROMPT_PREFIX).strip()
  actions = parse_steps(solution)
  if not actions:
    return "no 'Step k:' lines"
  for k, action in enumerate(actions, 1):
    if not check_step(previous, action):
      return f"step {k}: {action!r} does not follow from {previous!r}"
    previous = action
  last = re.fullmatch(r"x\s*=\s*(-?\d+)", actions[-1])
  if last is None:
    return f"the last step {actions[-1]!r} is not 'x = <integer>'"
  answers = _ANSWER.findall(solution)
  if not answers or answers[-1].strip() != last.group(1):
    return f"<answer> {answers[-1].strip() if answers else None!r} is not {last.group(1)}"
  return None


# ------------------------------------------------------------------------------------------
# Records: SFT dialogues, RL prompts, trajectories, labels, retrieval corpus
# ------------------------------------------------------------------------------------------

def _user(problem: Problem) -> dict[str, str]:
  return {"role": "user", "content": PROMPT_PREFIX + problem.text}


def generate(num_examples: int, seed: int = 0, *, split: int = 0, level: int = 0,
             min_level: int = 1, max_level: int = MAX_LEVEL, reasoning: int = 1
             ) -> list[dict[str, Any]]:
  """SFT dialogues `{"messages": [system, user, assistant]}`, the assistant's turn the expert
  solution (`render_solution`; `reasoning=0` leaves out the <think> lines).

  Task spec: `task:equations?n=200&seed=0&split=0&level=0&min_level=1&max_level=6&reasoning=1`.
  """
  return [{"messages": [{"role": "system", "content": SYSTEM}, _user(p),
                        {"role": "assistant", "content": render_solution(
                            p.steps, p.answer, with_reasoning=bool(reasoning))}]}
          for p in problems(num_examples, seed, split=split, level=level, min_level=min_level,
                            max_level=max_level)]


def prompts(num_examples: int, seed: int = 0, *, split: int = 0, level: int = 0,
            min_level: int = 1, max_level: int = MAX_LEVEL) -> list[dict[str, Any]]:
  """RL prompts `{"messages": [system, user], "answer": int}` (the `math` reward scores them).

  The same arguments give the same problems as `generate`, so a held-out RL set should use
  `split=1`, which no train-split source can contain.
  """
  return [{"messages": [{"role": "system", "content": SYSTEM}, _user(p)], "answer": p.answer}
          for p in problems(num_examples, seed, split=split, level=level, min_level=min_level,
                            max_level=max_level)]


def trajectories(num_examples: int, seed: int = 0, *, split: int = 0, level: int = 0,
                 min_level: int = 1, max_level: int = MAX_LEVEL) -> list[dict[str, Any]]:
  """Expert trajectory records `{"problem", "steps": [{"action", "reasoning"}], "answer",
  "meta": {"level", "task"}}` (issue 16's trajectory format, for SRL and the collaboration)."""
  return [{"problem": PROMPT_PREFIX + p.text,
           "steps": [{"action": action, "reasoning": reasoning} for reasoning, action in p.steps],
           "answer": p.answer, "meta": {"level": p.level, "task": TASK}}
          for p in problems(num_examples, seed, split=split, level=level, min_level=min_level,
                            max_level=max_level)]


def label(level: int) -> dict[str, str]:
  """{"category": "level<k>", "difficulty": easy (1-2 steps) | medium (3) | hard (4-6)}."""
  return {"category": f"level{level}",
          "difficulty": DIFFICULTIES[0 if level <= 2 else 1 if level == 3 else 2]}


def labels(num_examples: int, seed: int = 0, *, split: int = 0, level: int = 0,
           min_level: int = 1, max_level: int = MAX_LEVEL, reasoning: int = 1
           ) -> list[dict[str, str]]:
  """`label` of each record `generate`, `prompts` and `trajectories` return for the same
  arguments, in order (`reasoning` is accepted so that any of their specs labels)."""
  del reasoning
  return [label(p.level) for p in problems(num_examples, seed, split=split, level=level,
                                           min_level=min_level, max_level=max_level)]


def worked_examples(num_examples: int, seed: int = 0) -> list[str]:
  """Whole worked solutions as text ("Solve for x: ...\\n<think>...</think>\\nStep 1: ..."), the
  levels in turn: with RULES, the corpus a context retriever indexes for the teacher. Drawn
  from the train split on their own random stream, so they are not the SFT set of `seed`."""
  return [f"{PROMPT_PREFIX}{p.text}\n{render_solution(p.steps, p.answer)}"
          for p in problems(num_examples, seed, stream="worked")]
