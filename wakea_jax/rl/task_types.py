"""Task types for the collaboration: what a domain brings, as a plain dict of records.

A `TaskType` names its problem source, the teacher's system prompt, the context documents a
retriever indexes (rules and worked examples), its step parser, its verifiable reward on the
final answer, its step validator, and its metrics over accepted trajectories. This is the
seed's "model-specific trainers" without subclass trees: a new domain is a new entry in
`TASK_TYPES`, not a new class.

Solutions share one text format (data/tasks/equations.py `render_solution`):

  <think>why this step</think>
  Step 1: <action>
  ...
  <answer>5</answer>

and become trajectory records `{"problem", "steps": [{"action", "reasoning"?}], "answer",
"meta"}` (data/trajectories.py) through `to_record`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from wakea_jax.data.tasks import arithmetic, equations
from wakea_jax.retrieval.store import Document
from wakea_jax.rl import answers

# A "Step k:" label (any case, not inside a word) and its action up to the line's end or the
# next markup, as equations.parse_steps reads them.
_STEP = re.compile(r"(?<![A-Za-z])step\s*\d+\s*:[ \t]*([^\n<]*)", re.IGNORECASE)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_INTEGER_ANSWER = re.compile(r"^(?:[A-Za-z]\s*=\s*)?(-?\d+)\.?$")


StepCheck = Callable[[str | None, Sequence[str]], tuple[int, str] | None]


@dataclasses.dataclass(frozen=True)
class TaskProblem:
  """One problem: its text, reference answer, the expert's solution (the programmatic
  teacher's reply), and `start`, the state its first step must follow from."""

  problem_id: str
  text: str
  answer: Any          # as the trajectory record holds it (an int for both bundled tasks)
  solution: str
  start: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TaskType:
  """What the collaboration needs to know about a domain (see the module docstring).

  `check_steps(start, actions)` returns (index of the first invalid action, why), or None
  when all are valid; `reward(text, reference)` is 1.0 for a correct final answer, else 0.0.
  """

  name: str
  checks: str                                           # what the verifier checks (provenance)
  problems: Callable[..., list[TaskProblem]]            # (n, seed, **options)
  system: str
  context: Callable[[int, int], list[Document]]         # (num_examples, seed)
  parse_steps: Callable[[str], list[str]]
  reward: Callable[[str, Any], float]
  check_steps: StepCheck
  metrics: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]


def problem_id(task: str, text: str) -> str:
  """A stable id from the task and the problem text: what resuming matches on."""
  return f"{task}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def integer_answer(text: str) -> int | None:
  """The integer in the last <answer>...</answer> ("5", "x = 5"), or None."""
  found = answers.extract_answer(text, fallback=None)
  match = _INTEGER_ANSWER.match(found.strip()) if found is not None else None
  return int(match.group(1)) if match else None


def integer_reward(text: str, reference: Any) -> float:
  """1.0 when the tagged answer is the reference integer: exact, no tolerance or sympy."""
  value = integer_answer(text)
  return float(value is not None and str(value) == str(reference).strip())


def split_steps(text: str) -> list[dict[str, str]]:
  """[{"action", "reasoning"?}] of a solution: each "Step k:" action, with the <think> block
  between it and the previous step as its reasoning."""
  steps: list[dict[str, str]] = []
  pos = 0
  for match in _STEP.finditer(text):
    if any(m.start() < match.start() < m.end() for m in _THINK.finditer(text, pos)):
      continue   # a "Step k:" inside a monologue is not an action
    thoughts = _THINK.findall(text, pos, match.start())
    step = {"action": match.group(1).strip()}
    if thoughts and thoughts[-1].strip():
      step["reasoning"] = thoughts[-1].strip()
    steps.append(step)
    pos = match.end()
  return steps


def to_record(task: TaskType, problem: TaskProblem, text: str) -> dict[str, Any]:
  """The trajectory record of an accepted solution (meta is added by the collaboration).

  The actions are the task's own parse (what the verifier checked); the reasoning of each is
  kept where `split_steps` finds the same actions, and left out otherwise."""
  actions = task.parse_steps(text)
  steps = split_steps(text)
  if [s["action"] for s in steps] != actions:
    steps = [{"action": action} for action in actions]
  return {"problem": problem.text, "steps": steps, "answer": problem.answer}


def _chain_check(check: Callable[[str, str], bool],
                 last: Callable[[str | None, str], str | None] | None = None) -> StepCheck:
  """check_steps from a pairwise check: each action against the one before it (the first
  against `start` when there is one), then `last(start, final action)`: why it is not a
  finished solution, or None. A check that raises counts as a failed step."""

  def check_steps(start: str | None, actions: Sequence[str]) -> tuple[int, str] | None:
    previous = start
    for i, action in enumerate(actions):
      if previous is not None:
        try:
          valid = bool(check(previous, action))
        except Exception:  # noqa: BLE001  unparsable text from a model is a failed step
          valid = False
        if not valid:
          return i, f"step {i + 1} ({action!r}) does not follow from {previous!r}"
      previous = action
    why = last(start, actions[-1]) if last is not None and actions else None
    return None if why is None else (len(actions) - 1, why)

  return check_steps


def _step_metrics(records: Sequence[Mapping[str, Any]], by: str) -> dict[str, Any]:
  """Steps per trajectory and accepted counts per `meta[by]`."""
  lengths = [len(r["steps"]) for r in records]
  return {"steps_mean": statistics.fmean(lengths) if lengths else 0.0,
          "steps_max": max(lengths, default=0),
          f"accepted_by_{by}": dict(sorted(Counter(str(r.get("meta", {}).get(by))
                                                   for r in records).items()))}


# ------------------------------------------------------------------------------------------
# equations: multi-step linear equations (data/tasks/equations.py)
# ------------------------------------------------------------------------------------------

def _equation_problems(n: int, seed: int = 0, **options: int) -> list[TaskProblem]:
  out = []
  for p in equations.problems(n, seed, **options):
    text = equations.PROMPT_PREFIX + p.text   # as data/tasks/equations.py's records say it
    out.append(TaskProblem(problem_id=problem_id("equations", text), text=text,
                           answer=p.answer, solution=equations.render_solution(p.steps, p.answer),
                           start=p.text, meta={"level": p.level}))
  return out


def _solved_form(start: str | None, action: str) -> str | None:
  """Why the last step is not the solved form "x = <integer>", or None."""
  if re.fullmatch(r"x\s*=\s*-?\d+", action.strip()):
    return None
  return f"the last step {action!r} is not 'x = <integer>'"


def _equation_context(num_examples: int, seed: int) -> list[Document]:
  rules = [Document(f"rule-{i}", text) for i, text in enumerate(equations.RULES)]
  examples = [Document(f"example-{i}", text)
              for i, text in enumerate(equations.worked_examples(num_examples, seed))]
  return rules + examples


EQUATIONS = TaskType(
    name="equations",
    checks="the <answer> integer; equations.check_step on every step, the first against the "
    "problem; the last step 'x = <integer>'",
    problems=_equation_problems, system=equations.SYSTEM,
    context=_equation_context, parse_steps=equations.parse_steps, reward=integer_reward,
    check_steps=_chain_check(equations.check_step, last=_solved_form),
    metrics=lambda records: _step_metrics(records, "level"))


# ------------------------------------------------------------------------------------------
# arithmetic: two-operand sums and products worked in small steps (data/tasks/arithmetic.py)
# ------------------------------------------------------------------------------------------

ARITHMETIC_SYSTEM = ("Work the sum out in small steps. Write each step as 'Step k: <expression> "
                     "= <expression>', its reason first in <think>...</think>, and the result "
                     "in <answer>...</answer>.")
ARITHMETIC_RULES = (
    "Add or subtract the tens of the second number first, then its ones.",
    "Multiply a number by a one- or two-digit number by splitting the first into tens and "
    "ones: a * b = tens * b + ones * b.",
    "Each step states one equality whose left side equals the previous step's right side.",
    "The final answer is the right side of the last step, written in <answer>...</answer>.",
)


def _int_value(expression: str) -> int:
  """Exact value of an integer expression of + - * and parentheses (no names, no calls)."""
  def value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -value(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
      a, b = value(node.left), value(node.right)
      return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op,
                                                                             ast.Sub) else a * b
    raise ValueError(f"not an integer expression: {expression!r}")
  if len(expression) > 200:
    raise ValueError("expression too long")
  return value(ast.parse(expression.strip(), mode="eval").body)


def _arithmetic_step(previous: str, action: str) -> bool:
  """Valid when `action` is a true "L = R" whose L carries on from the state before: it starts
  with the previous step's result (the first step: with the problem's first operand)."""
  left, right = action.split("=")
  if _int_value(left) != _int_value(right):
    return False
  carried = previous.split("=")[-1].strip() if "=" in previous else previous.split()[0]
  return re.match(re.escape(carried) + r"(?!\d)", left.strip()) is not None


def _arithmetic_done(start: str | None, action: str) -> str | None:
  """Why the last step does not end at the problem's value, or None."""
  try:
    done = start is None or _int_value(action.split("=")[-1]) == _int_value(start)
  except (ValueError, SyntaxError):
    done = False
  return None if done else f"the last step {action!r} does not end at the value of {start!r}"


def _worked_steps(a: int, op: str, b: int) -> list[tuple[str, str]]:
  """(reasoning, action) steps of arithmetic.worked_answer's method."""
  if op == "*":
    tens, ones = a // 10 * 10, a % 10
    if not (tens and ones):
      return [("Multiply directly.", f"{a} * {b} = {a * b}")]
    return [("Split the first number into tens and ones.",
             f"{a} * {b} = {tens} * {b} + {ones} * {b}"),
            ("Multiply each part.", f"{tens} * {b} + {ones} * {b} = {tens * b} + {ones * b}"),
            ("Add the parts.", f"{tens * b} + {ones * b} = {a * b}")]
  sign = 1 if op == "+" else -1
  tens, ones = b // 10 * 10, b % 10
  if not (tens and ones):
    return [("Compute directly.", f"{a} {op} {b} = {a + sign * b}")]
  mid = a + sign * tens
  return [("Tens first.", f"{a} {op} {tens} = {mid}"),
          ("Then the ones.", f"{mid} {op} {ones} = {mid + sign * ones}")]


def render_steps(steps: Sequence[tuple[str, str]], answer: int) -> str:
  """The shared solution format (module docstring) of (reasoning, action) steps."""
  lines = [f"<think>{r}</think>\nStep {k}: {a}" for k, (r, a) in enumerate(steps, 1)]
  return "\n".join(lines) + f"\n<answer>{answer}</answer>"


def _arithmetic_problems(n: int, seed: int = 0, *, max_operand: int = 0) -> list[TaskProblem]:
  rng = random.Random(f"collaboration-arithmetic-{seed}-{max_operand}")
  out = []
  for _ in range(n):
    a, op, b = arithmetic.expression(rng, max_operand)
    value = arithmetic.evaluate(f"{a}{op}{b}")
    text = f"What is {a} {op} {b}?"
    out.append(TaskProblem(problem_id=problem_id("arithmetic", text), text=text,
                           answer=value, solution=render_steps(_worked_steps(a, op, b),
                                                                    value),
                           start=f"{a} {op} {b}",
                           meta={"operator": arithmetic.CATEGORIES[op]}))
  return out


def _arithmetic_context(num_examples: int, seed: int) -> list[Document]:
  rules = [Document(f"rule-{i}", text) for i, text in enumerate(ARITHMETIC_RULES)]
  examples = [Document(f"example-{i}", f"{p.text}\n{p.solution}")
              for i, p in enumerate(_arithmetic_problems(num_examples, 10_000 + seed))]
  return rules + examples


ARITHMETIC = TaskType(
    name="arithmetic",
    checks="the <answer> integer; every step a true equality carrying on from the one before, "
    "the last ending at the problem's value",
    problems=_arithmetic_problems, system=ARITHMETIC_SYSTEM,
    context=_arithmetic_context, parse_steps=equations.parse_steps,
    reward=integer_reward, check_steps=_chain_check(_arithmetic_step, last=_arithmetic_done),
    metrics=lambda records: _step_metrics(records, "operator"))


TASK_TYPES: dict[str, TaskType] = {"equations": EQUATIONS, "arithmetic": ARITHMETIC}
