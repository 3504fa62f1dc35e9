"""Expert trajectories: a problem solved in numbered steps, for step-wise supervision (SRL).

Record schema (JSONL / JSON / Parquet files and `datasets` directories `DIR?split=..`, read
like every other source, sources.py; or a bundled expert `task:NAME?n=..&seed=..&OPTION=..`
from `TRAJECTORY_TASKS`, e.g. `task:equations?n=1000&seed=0&max_level=3`):

  {"problem": str,
   "steps": [{"action": str, "reasoning"?: str}, ...],
   "answer": str | number,
   "meta"?: {...}}

  {"problem": "Solve 2x + 3 = 7.",
   "steps": [{"action": "2x = 4", "reasoning": "Subtract 3 from both sides."},
             {"action": "x = 2"}],
   "answer": "2", "meta": {"teacher": "programmatic"}}

An action is what the expert did at that step, written on one line of the solution text; the
reasoning is its private monologue (optional; SRL prompts never show it). Other top-level
fields are ignored, as Hub datasets carry ids and scores; a misspelt step field is an error.

The canonical solution text (`solution_text`; the equations task writes its SFT solutions in
the same format, and rl/srl.py builds its step prompts from it) is

  <think>reasoning 1</think>
  Step 1: action 1
  Step 2: action 2              (a step without reasoning has no think block)
  <answer>ANSWER</answer>

so one line per action, hence the rules below. Malformed means, each an error naming the
location (`path:LINE`, `path[INDEX]`, `DIR[SPLIT][ROW]`) and the field, e.g.
`data/t.jsonl:3: field 'steps[2].action' must be a non-empty string`:
  * `problem` not a non-empty string; `steps` not a non-empty list of objects;
  * an `action` that is not a non-empty single line, starts with its own "Step k:" label
    (the renderer writes the label), or contains markup (`<think>`, `</think>`, `<answer>`,
    `</answer>`, turn delimiters); a `reasoning` that is not a string or holds `</think>` or
    a turn delimiter;
  * `answer` missing, a bool, NaN / infinite, an empty or multi-line string, or holding
    markup; `meta` not an object.
A malformed record raises by default; with `on_error="skip_and_count"` it is logged with its
location and counted, never dropped silently (sources.validate_all).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from wakea_jax.data import sources
from wakea_jax.data.records import type_name
from wakea_jax.data.tasks import equations
from wakea_jax.data.tokenizer import IM_END, IM_START, THINK_END, THINK_START

ANSWER_START, ANSWER_END = "<answer>", "</answer>"
STEP_FIELDS = ("action", "reasoning")
# Text an action or answer may not hold: it would break the one-line step format.
_ACTION_MARKUP = (THINK_START, THINK_END, ANSWER_START, ANSWER_END, IM_START, IM_END)
_REASONING_MARKUP = (THINK_END, IM_START, IM_END)
# "Step 3:" at the start of a line, as the solution text labels each action.
STEP_LABEL = re.compile(r"^\s*step\s*\d+\s*:\s*", re.IGNORECASE)
# Bundled programmatic experts: `trajectories(n, seed, **options) -> [record, ...]`.
TRAJECTORY_TASKS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "equations": equations.trajectories,
}


@dataclasses.dataclass(frozen=True)
class Step:
  """One expert step: the action written in the solution, and its private reasoning."""

  action: str
  reasoning: str | None = None


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """A validated expert trajectory (see the module docstring)."""

  problem: str
  steps: tuple[Step, ...]
  answer: str | int | float
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  origin: str = ""   # where it was read from ("path:line"); not written back

  @property
  def answer_text(self) -> str:
    """The answer as the solution writes it inside <answer>...</answer>."""
    return str(self.answer)

  def to_json(self) -> dict[str, Any]:
    """The record in the file schema (loads back to an equal Trajectory, origin aside)."""
    steps = [{"action": s.action, **({} if s.reasoning is None else {"reasoning": s.reasoning})}
             for s in self.steps]
    record: dict[str, Any] = {"problem": self.problem, "steps": steps, "answer": self.answer}
    if self.meta:
      record["meta"] = dict(self.meta)
    return record


def step_line(index: int, action: str) -> str:
  """Step `index` (1-based) as the solution writes it: "Step 2: x = 2"."""
  return f"Step {index}: {action}"


def answer_line(answer: str | int | float) -> str:
  """The final line of a solution: "<answer>2</answer>"."""
  return f"{ANSWER_START}{answer}{ANSWER_END}"


def step_lines(steps: Sequence[Step], *, reasoning: bool = True) -> list[str]:
  """The solution text's lines for `steps` (the first being step 1): a think block before
  each step with non-empty reasoning (when `reasoning`), then its "Step k: action" line."""
  lines = []
  for k, step in enumerate(steps, 1):
    if reasoning and step.reasoning:
      lines.append(f"{THINK_START}{step.reasoning}{THINK_END}")
    lines.append(step_line(k, step.action))
  return lines


def solution_text(trajectory: Trajectory, *, reasoning: bool = True) -> str:
  """The canonical whole-solution text (module docstring): `step_lines`, then the <answer>
  line; the text tasks/equations.py `render_solution` writes for its SFT targets."""
  return "\n".join(step_lines(trajectory.steps, reasoning=reasoning)
                   + [answer_line(trajectory.answer_text)])


def _markup_in(text: str, markup: Sequence[str]) -> str | None:
  return next((m for m in markup if m in text), None)


def _line_text(value: Any, field: str, where: str) -> str:
  """A non-empty, single-line string without step markup."""
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: field '{field}' must be a non-empty string, got "
                     f"{type_name(value) if not isinstance(value, str) else repr(value)}")
  if "\n" in value or "\r" in value:
    raise ValueError(f"{where}: field '{field}' must be a single line (each action is one "
                     "'Step k: action' line of the solution)")
  if found := _markup_in(value, _ACTION_MARKUP):
    raise ValueError(f"{where}: field '{field}' contains the markup {found!r}")
  return value.strip()


def _step(raw: Any, k: int, where: str) -> Step:
  field = f"steps[{k}]"
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: field '{field}' must be an object with an 'action', got "
                     f"{type_name(raw)}")
  for key in raw:
    if key not in STEP_FIELDS and raw[key] is not None:
      close = difflib.get_close_matches(str(key), STEP_FIELDS, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ValueError(f"{where}: field '{field}.{key}' is not a step field{hint}; step fields "
                       f"are {list(STEP_FIELDS)}")
  if raw.get("action") is None:
    raise ValueError(f"{where}: field '{field}.action' is missing")
  action = _line_text(raw["action"], f"{field}.action", where)
  if label := STEP_LABEL.match(action):
    raise ValueError(f"{where}: field '{field}.action' starts with the step label "
                     f"{label.group().strip()!r}; give the action alone (the label is written "
                     "when the solution is rendered)")
  reasoning = raw.get("reasoning")
  if reasoning is not None:
    if not isinstance(reasoning, str):
      raise ValueError(f"{where}: field '{field}.reasoning' must be a string, got "
                       f"{type_name(reasoning)}")
    if found := _markup_in(reasoning, _REASONING_MARKUP):
      raise ValueError(f"{where}: field '{field}.reasoning' contains the markup {found!r}")
  return Step(action=action, reasoning=reasoning)


def _answer(raw: Mapping[str, Any], where: str) -> str | int | float:
  if raw.get("answer") is None:
    raise ValueError(f"{where}: field 'answer' is missing")
  answer = raw["answer"]
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise ValueError(f"{where}: field 'answer' must be a string or a number, got "
                     f"{type_name(answer)}")
  if isinstance(answer, float) and not math.isfinite(answer):
    raise ValueError(f"{where}: field 'answer' must be finite, got {answer}")
  if isinstance(answer, str):
    return _line_text(answer, "answer", where)
  return answer


def to_trajectory(raw: Any, where: str) -> Trajectory:
  """Validates one raw record; errors start with `where` and name the field."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a trajectory record must be a JSON object, got "
                     f"{type_name(raw)}")
  problem = raw.get("problem")
  if problem is None:
    raise ValueError(f"{where}: field 'problem' is missing")
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f"{where}: field 'problem' must be a non-empty string, got "
                     f"{type_name(problem) if not isinstance(problem, str) else repr(problem)}")
  if found := _markup_in(problem, (IM_START, IM_END)):
    raise ValueError(f"{where}: field 'problem' contains the turn delimiter {found!r}")
  steps = raw.get("steps")
  if steps is None:
    raise ValueError(f"{where}: field 'steps' is missing")
  if not isinstance(steps, list) or not steps:
    raise ValueError(f"{where}: field 'steps' must be a non-empty list of steps, got "
                     f"{type_name(steps) if not isinstance(steps, list) else 'an empty list'}")
  parsed = tuple(_step(step, k, where) for k, step in enumerate(steps))
  answer = _answer(raw, where)
  meta = raw.get("meta")
  if meta is not None and not isinstance(meta, Mapping):
    raise ValueError(f"{where}: field 'meta' must be an object, got {type_name(meta)}")
  return Trajectory(problem=problem, steps=parsed, answer=answer, meta=dict(meta or {}),
                    origin=where)


def load_trajectories(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                      on_error: str = "raise") -> list[Trajectory]:
  """Validated trajectories of a .jsonl/.json/.parquet file, a `datasets` directory
  (`DIR?split=..`) or a bundled expert (`task:NAME?n=..&seed=..`); a list of specs -> their
  trajectories pooled, in order. Malformed records raise, or with `on_error="skip_and_count"`
  are logged with their location and skipped."""
  if isinstance(spec, Sequence) and not isinstance(spec, str):
    if not spec:
      raise ValueError("no trajectory sources given")
    return [t for one in spec for t in load_trajectories(one, on_error=on_error)]
  if isinstance(spec, str) and spec.startswith(sources.TASK_PREFIX):
    name, n, seed, options = sources.parse_task_spec(spec, tasks=TRAJECTORY_TASKS)
    located: Iterable[tuple[str, Any]] = [
        (f"{spec}[{i}]", r) for i, r in enumerate(TRAJECTORY_TASKS[name](n, seed, **options))]
  else:
    located = sources.raw_records(spec)
  trajectories, _, _ = sources.validate_all(
      located, to_trajectory, name=os.fspath(spec), on_error=on_error, kind="trajectory",
      empty="no trajectory records")
  return trajectories


def write_trajectories(records: Iterable[Trajectory | Mapping[str, Any]],
                       path: str | os.PathLike[str]) -> int:
  """Writes trajectories (or raw records, validated first: a malformed one raises, naming its
  index, and nothing is written) as JSONL, atomically; the number written."""
  out = []
  for index, record in enumerate(records):
    trajectory = (record if isinstance(record, Trajectory)
                  else to_trajectory(record, f"records[{index}]"))
    out.append(trajectory.to_json())
  sources.write_jsonl(out, path)
  return len(out)
