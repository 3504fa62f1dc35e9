"""Host-side rewards: what a completion earns, computed batched between jitted RL stages.

A reward function maps a batch of `Sample`s to float32 [n]. `REWARDS` names their factories;
`build_reward(spec)` turns a config mapping {name: {"weight": w, **options}} into a
`CompositeReward`, whose weights may follow a piecewise-linear schedule in the training step.

Answers are read from the model's *last assistant turn* only (`final_response`): text that
appears inside a tool response is the tool's, not the model's, and must not earn credit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import inspect
import math
import re
import secrets
import string
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wakea_jax.data.tokenizer import (
    IM_END,
    IM_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)
from wakea_jax.rl import judge as judge_lib
from wakea_jax.toolbox import sandbox


@dataclasses.dataclass(frozen=True)
class Sample:
  """What a reward sees about one completion."""
  prompt: str
  completion: str           # decoded completion text, ChatML markup included when tools ran
  answer: Any = None        # reference: str, number, or a list of accepted answers
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "tests" for code
  num_tool_calls: int = 0
  tool_errors: int = 0      # tool responses that were "Error: ..."
  truncated: bool = False   # hit the length limit
  num_tokens: int = 0       # completion tokens the model generated (tool responses excluded)


RewardFn = Callable[[Sequence[Sample]], np.ndarray]
Schedule = Sequence[tuple[float, float]]

# ------------------------------------------------------------------------------------------
# Reading the model's answer
# ------------------------------------------------------------------------------------------

_ASSISTANT = f"{IM_START}assistant\n"
_ENDOFTEXT = "<|endoftext|>"
_TOOL_CALL_BLOCK = re.compile(
    rf"{re.escape(TOOL_CALL_START)}.*?(?:{re.escape(TOOL_CALL_END)}|$)", re.DOTALL)
_TOOL_RESPONSE_BLOCK = re.compile(
    rf"{re.escape(TOOL_RESPONSE_START)}.*?(?:{re.escape(TOOL_RESPONSE_END)}|$)", re.DOTALL)


def final_response(completion: str) -> str:
  """The text of the model's last assistant turn, without markup or tool calls.

  The completion starts inside the first assistant turn (the prompt ends with the generation
  prompt), so without a later "<|im_start|>assistant\\n" the first turn is the last one. The turn
  ends at the first <|im_end|> or <|im_start|> after it: what follows is a tool response.
  """
  start = completion.rfind(_ASSISTANT)
  text = completion[start + len(_ASSISTANT):] if start >= 0 else completion
  for stop in (IM_END, IM_START):
    cut = text.find(stop)
    if cut >= 0:
      text = text[:cut]
  text = text.replace(_ENDOFTEXT, "")
  text = _TOOL_CALL_BLOCK.sub("", text)
  text = _TOOL_RESPONSE_BLOCK.sub("", text)  # defensive: never part of an assistant turn
  return text.strip()


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a word ("x2", "v1.2"): optional sign (only when not a binary minus, as
# in "3-5"), thousands groups or plain digits, optional decimals, optional "/denominator".
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])(?:(?<![0-9)])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:/\d+)?(?![0-9])")


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} whose braces balance (nesting allowed)."""
  found = None
  for match in _BOXED.finditer(text):
    depth, i = 1, match.end()
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      found = text[match.end():i - 1]
  return found.strip() if found is not None else None


def extract_answer(text: str, *, fallback: str | None = "last_number") -> str | None:
  """The last <answer>...</answer>, else the last \\boxed{...}, else (fallback="last_number")
  the last number (ints, decimals, negatives, 1,234, 3/4), else None."""
  if fallback not in (None, "last_number"):
    raise ValueError(f"extract_answer: fallback must be 'last_number' or None, got {fallback!r}")
  tagged = _ANSWER_TAG.findall(text)
  if tagged:
    return tagged[-1].strip()
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed
  if fallback == "last_number":
    numbers = _NUMBER.findall(text)
    if numbers:
      return numbers[-1]
  return None


# ------------------------------------------------------------------------------------------
# Math equivalence
# ------------------------------------------------------------------------------------------

_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")  # \frac12
_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+|[A-Za-z])")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LEADING_VAR = re.compile(r"^[A-Za-z]\w{0,2}=(?!=)")  # "x=5" -> "5"
_SIMPLE_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$")
_FRACTION = re.compile(r"^(-?)\(?(-?(?:\d+(?:\.\d*)?|\.\d+))\)?/\(?(-?(?:\d+(?:\.\d*)?|\.\d+))\)?$")
_REL_TOL = 1e-6
_SYMPY_MAX_CHARS = 200
# Names the sympy path accepts; any other multi-letter identifier is refused, because
# parse_expr evaluates its input with eval().
_SYMPY_NAMES = ("sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "oo")


def _normalize_math(text: Any) -> tuple[str, bool]:
  """(normalised string, had a trailing percent sign).

  Percentages: a trailing "%" is dropped and remembered; the numeric comparison then accepts
  the value as written or divided by 100 (so "50%" matches "50" and "0.5"), which is what the
  common MATH/GSM8K graders do for answers whose unit the question already states.
  """
  s = str(text).strip()
  for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle"):
    s = s.replace(token, "")
  s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
  s = s.replace("$", "").replace("\\%", "%").replace("^\\circ", "").replace("^{\\circ}", "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi")
  s = s.replace("\\infty", "oo")
  while (t := _TEXT_COMMAND.sub(r"\1", s)) != s:
    s = t
  s = re.sub(r"\s+", "", s)
  s = s.rstrip(".")
  s = _THOUSANDS.sub("", s)
  # sqrt first, so that a \frac around it has brace-free arguments.
  while (t := _SQRT.sub(r"sqrt(\1)", s)) != s:
    s = t
  s = _SQRT_SHORT.sub(r"sqrt(\1)", s)
  s = _FRAC_SHORT.sub(r"(\1)/(\2)", s)
  while (t := _FRAC.sub(r"(\1)/(\2)", s)) != s:
    s = t
  s = s.replace("{", "(").replace("}", ")")
  if s.count("=") == 1:
    s = _LEADING_VAR.sub("", s)
  percent = s.endswith("%")
  return s.rstrip("%"), percent


def _to_number(s: str) -> fractions.Fraction | None:
  if _SIMPLE_NUMBER.match(s):
    return fractions.Fraction(s)
  match = _FRACTION.match(s)
  if match:
    sign, num, den = match.groups()
    if float(den) == 0:
      return None
    value = fractions.Fraction(num) / fractions.Fraction(den)
    return -value if sign else value
  return None


def _close(a: fractions.Fraction, b: fractions.Fraction) -> bool:
  return a == b or math.isclose(float(a), float(b), rel_tol=_REL_TOL)


def _sympy_safe(s: str) -> bool:
  if len(s) > _SYMPY_MAX_CHARS or "__" in s or not re.fullmatch(r"[0-9A-Za-z+\-*/^(). ]+", s):
    return False
  return all(len(name) == 1 or name in _SYMPY_NAMES for name in re.findall(r"[A-Za-z]+", s))


def _sympy_equal_unguarded(a: str, b: str) -> bool:
  import sympy
  from sympy.parsing import sympy_parser as sp

  names = {"__builtins__": {}, "Integer": sympy.Integer, "Float": sympy.Float,
           "Rational": sympy.Rational, "Symbol": sympy.Symbol, "Function": sympy.Function,
           "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow,  # for evaluate=False
           "sqrt": sympy.sqrt, "pi": sympy.pi, "sin": sympy.sin, "cos": sympy.cos,
           "tan": sympy.tan, "log": sympy.log, "ln": sympy.log, "exp": sympy.exp,
           "oo": sympy.oo}
  transformations = sp.standard_transformations + (
      sp.implicit_multiplication_application, sp.convert_xor)

  def parse(s: str) -> Any:
    expr = sympy.sympify(sp.parse_expr(s, global_dict=dict(names), transformations=transformations,
                                       evaluate=False))
    # Refuse power towers and huge exponents before anything evaluates them (9^9^9 would hang
    # or exhaust memory in a thread we cannot kill).
    for power in expr.atoms(sympy.Pow):
      exponent = power.exp
      if exponent.atoms(sympy.Pow) or (exponent.is_Number and abs(exponent) > 100):
        raise ValueError("exponent too large")
    return expr

  difference = sympy.simplify(parse(a) - parse(b))
  if difference == 0:
    return True
  if difference.is_number and difference.is_finite:
    scale = max(abs(complex(sympy.N(parse(b)))), 1.0)
    return abs(complex(sympy.N(difference))) <= _REL_TOL * scale
  return False


def _sympy_equal(a: str, b: str, timeout_s: float) -> bool:
  """sympy equivalence in a daemon thread, False on a parse error, timeout or missing sympy."""
  try:
    import sympy  # noqa: F401  (optional: numeric-only comparison without it)
  except ImportError:
    return False
  if not (_sympy_safe(a) and _sympy_safe(b)):
    return False
  result: list[bool] = []

  def work() -> None:
    try:
      result.append(_sympy_equal_unguarded(a, b))
    except Exception:  # any parse or evaluation failure means "not shown equal"
      result.append(False)

  worker = threading.Thread(target=work, daemon=True, name="math_equal_sympy")
  worker.start()
  worker.join(timeout_s)
  return bool(result and result[0])


def math_equal(prediction: Any, reference: Any, *, timeout_s: float = 2.0) -> bool:
  """Whether `prediction` equals `reference` (or any item of a list of references).

  Both are normalised ($, spaces, \\text{}, trailing period, thousands commas, \\frac/\\dfrac,
  "x = " prefix, percent), then compared as strings, as numbers (relative tolerance 1e-6) and
  finally symbolically with sympy (simplify(a - b) == 0), bounded by `timeout_s`.
  """
  if prediction is None:
    return False
  if isinstance(reference, (list, tuple)):
    return any(math_equal(prediction, r, timeout_s=timeout_s) for r in reference)
  if reference is None:
    return False
  a, a_percent = _normalize_math(prediction)
  b, b_percent = _normalize_math(reference)
  if not a or not b:
    return False
  if a == b or a.lower() == b.lower():
    return True
  x, y = _to_number(a), _to_number(b)
  if x is not None and y is not None:
    xs = [x, x / 100] if a_percent else [x]
    ys = [y, y / 100] if b_percent else [y]
    return any(_close(u, v) for u in xs for v in ys)
  return _sympy_equal(a, b, timeout_s)


# ------------------------------------------------------------------------------------------
# SQuAD exact match
# ------------------------------------------------------------------------------------------

def squad_normalize(text: str) -> str:
  """SQuAD v1.1 evaluation script's normalize_answer: lower case, drop punctuation, drop the
  articles a/an/the, collapse whitespace."""
  text = str(text).lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _accepted(answer: Any) -> list[Any]:
  return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def _require_answer(sample: Sample, index: int, reward: str) -> None:
  if sample.answer is None:
    raise ValueError(f"sample {index}: the {reward!r} reward needs an answer, got None")


# ------------------------------------------------------------------------------------------
# Reward factories
# ------------------------------------------------------------------------------------------

def math_reward(*, fallback: str | None = "last_number", timeout_s: float = 2.0) -> RewardFn:
  """1.0 when the final response's extracted answer is math_equal to the reference."""
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      _require_answer(s, i, "math")
      predicted = extract_answer(final_response(s.completion), fallback=fallback)
      out[i] = float(math_equal(predicted, s.answer, timeout_s=timeout_s))
    return out
  return reward


def exact_match_reward(*, whole_response: bool = False,
                       fallback: str | None = None) -> RewardFn:
  """SQuAD-normalised exact match against any accepted answer.

  The candidate is the final response's extracted answer (<answer>, \\boxed, or with
  fallback="last_number" the last number), or the whole final response when nothing was
  extracted or `whole_response` is set.
  """
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      _require_answer(s, i, "exact_match")
      text = final_response(s.completion)
      candidate = None if whole_response else extract_answer(text, fallback=fallback)
      candidate = squad_normalize(text if candidate is None else candidate)
      out[i] = float(any(candidate == squad_normalize(a) for a in _accepted(s.answer)))
    return out
  return reward


def _in_order(text: str, tags: Sequence[str]) -> int:
  """How many of `tags` occur in order (greedy: a missing tag is skipped)."""
  pos, found = 0, 0
  for tag in tags:
    at = text.find(tag, pos)
    if at >= 0:
      found, pos = found + 1, at + len(tag)
  return found


def format_reward(*, tags: Sequence[str] = ("<think>", "</think>", "<answer>", "</answer>"),
                  partial: bool = False, scope: str = "final") -> RewardFn:
  """1.0 when every tag occurs, in order; with `partial`, the fraction found in order.

  scope="final" checks the last assistant turn; "completion" the whole completion with tool
  responses removed (reasoning before a tool call then counts).
  """
  tags = tuple(tags)
  if not tags:
    raise ValueError("format reward: tags is empty")
  if scope not in ("final", "completion"):
    raise ValueError(f"format reward: scope must be 'final' or 'completion', got {scope!r}")

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      text = (final_response(s.completion) if scope == "final"
              else _TOOL_RESPONSE_BLOCK.sub("", s.completion))
      found = _in_order(text, tags)
      out[i] = found / len(tags) if partial else float(found == len(tags))
    return out
  return reward


_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Appended to the candidate code: each test runs in its own try, and reports with a per-run
# nonce so that ordinary prints cannot pass for results. Code that reads its own source could
# still forge them: the sandbox bounds harm, it does not make a hostile verifier-proof harness.
_TEST_HARNESS = """

def __wakea_run_tests(tests, marker):
  import sys
  for index, test in enumerate(tests):
    try:
      exec(compile(test, f"<test {index}>", "exec"), globals())
      ok = True
    except BaseException:
      ok = False
    sys.stdout.write(f"\\n{marker}{index}:{'pass' if ok else 'fail'}\\n")
    sys.stdout.flush()

__wakea_run_tests(%r, %r)
"""


def extract_code(text: str) -> str | None:
  """The last ```python (or ```py) fenced block, else the last unlabelled one, else None."""
  blocks = [(lang, body) for lang, body in _FENCE.findall(text)]
  labelled = [body for lang, body in blocks if lang]
  if labelled:
    return labelled[-1]
  return blocks[-1][1] if blocks else None


def _code_score(code: str | None, tests: Sequence[str], config: sandbox.SandboxConfig,
                all_or_nothing: bool) -> float:
  if code is None:
    return 0.0
  marker = f"@@wakea-test-{secrets.token_hex(8)}@@"
  result = sandbox.run_code(code + _TEST_HARNESS % (list(tests), marker), config)
  if not result.ok:  # crash, timeout or any other limit: nothing is trusted
    return 0.0
  passed = set(re.findall(rf"^{re.escape(marker)}(\d+):pass$", result.stdout, re.MULTILINE))
  fraction = len(passed) / len(tests)
  return float(fraction == 1.0) if all_or_nothing else fraction


def code_reward(*, timeout_s: float = 10.0, memory_mb: int = 512, all_or_nothing: bool = False,
                workers: int = 4) -> RewardFn:
  """Runs the final response's last ```python block then meta["tests"] (assert strings) in one
  sandbox process per sample; reward = fraction of tests passed (or 1/0 with all_or_nothing).
  A crash or timeout of the process gives 0."""
  config = sandbox.SandboxConfig(cpu_s=max(1, math.ceil(timeout_s)), wall_s=float(timeout_s),
                                 memory_mb=memory_mb)

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    jobs = []
    for i, s in enumerate(samples):
      tests = s.meta.get("tests")
      if not tests or isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"sample {i}: the 'code' reward needs meta['tests'], a non-empty list "
                         f"of assert strings, got {tests!r}")
      jobs.append((extract_code(final_response(s.completion)), list(tests)))
    # Sandboxes are separate processes: threads only wait on them.
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      scores = pool.map(lambda job: _code_score(*job, config, all_or_nothing), jobs)
      return np.asarray(list(scores), np.float32).reshape(len(samples))
  return reward


def tool_use_reward(*, require_call: bool = True, error_penalty: float | None = None) -> RewardFn:
  """1.0 for a completion that called a tool (unless not `require_call`) without tool errors.

  error_penalty=None: any tool error gives 0. A float p: 1 - p * tool_errors instead (may be
  negative), for a softer signal.
  """
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      base = 1.0 if (s.num_tool_calls >= 1 or not require_call) else 0.0
      if error_penalty is None:
        out[i] = base if s.tool_errors == 0 else 0.0
      else:
        out[i] = base - error_penalty * s.tool_errors if base else 0.0
    return out
  return reward


def overlong_reward(*, max_len: int, cache: int) -> RewardFn:
  """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13), on `Sample.num_tokens` = L:
  0 for L <= max_len - cache, (max_len - cache - L) / cache up to max_len, -1 beyond."""
  if not 0 < cache <= max_len:
    raise ValueError(f"overlong reward: need 0 < cache <= max_len, got cache={cache}, "
                     f"max_len={max_len}")

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    length = np.asarray([s.num_tokens for s in samples], np.float32).reshape(len(samples))
    soft = (max_len - cache - length) / cache
    return np.where(length <= max_len - cache, 0.0,
                    np.where(length <= max_len, soft, -1.0)).astype(np.float32)
  return reward


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "code": code_reward,
    "tool_use": tool_use_reward,
    "overlong": overlong_reward,
    "length_penalty": overlong_reward,
    "judge": judge_lib.judge_reward,
}


# ------------------------------------------------------------------------------------------
# Weighted sums
# ------------------------------------------------------------------------------------------

def _check_schedule(name: str, weight: Any) -> float | tuple[tuple[float, float], ...]:
  if isinstance(weight, (int, float)) and not isinstance(weight, bool):
    return float(weight)
  try:
    points = tuple((float(step), float(w)) for step, w in weight)
  except (TypeError, ValueError):
    raise ValueError(f"reward {name!r}: weight must be a number or ((step, weight), ...), "
                     f"got {weight!r}") from None
  steps = [p[0] for p in points]
  if not points or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f"reward {name!r}: a weight schedule needs at least one point and "
                     f"strictly increasing steps, got {weight!r}")
  return points


def schedule_value(weight: float | Schedule, step: float) -> float:
  """A constant, or piecewise-linear in `step` through (step, weight) points and constant
  outside them."""
  if isinstance(weight, (int, float)):
    return float(weight)
  steps, values = zip(*weight)
  return float(np.interp(step, steps, values))


class CompositeReward:
  """Weighted sum of reward components; weights are constants or schedules in the step."""

  def __init__(self, components: Mapping[str, tuple[RewardFn, float | Schedule]]) -> None:
    if not components:
      raise ValueError("CompositeReward: no components")
    self.components = {name: (fn, _check_schedule(name, weight))
                       for name, (fn, weight) in components.items()}

  def weights(self, step: float = 0) -> dict[str, float]:
    return {name: schedule_value(w, step) for name, (_, w) in self.components.items()}

  def __call__(self, samples: Sequence[Sample], step: float = 0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [n], raw value of each component [n])."""
    n = len(samples)
    total = np.zeros(n, np.float32)
    raw: dict[str, np.ndarray] = {}
    for name, (fn, weight) in self.components.items():
      values = np.asarray(fn(samples), np.float32)
      if values.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {values.shape}, expected ({n},)")
      raw[name] = values
      w = schedule_value(weight, step)
      if w != 0.0:
        total += np.float32(w) * values
    return total, raw


def _option_names(factory: Callable[..., RewardFn]) -> list[str]:
  return [p.name for p in inspect.signature(factory).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_reward(spec: Mapping[str, Any]) -> CompositeReward:
  """{name: {"weight": float | ((step, w), ...), "type"?: registry name, **options}}.

  "type" lets one reward appear twice under different names (e.g. two format rewards);
  it defaults to the name.
  """
  if not spec:
    raise ValueError(f"reward spec is empty; valid rewards: {', '.join(sorted(REWARDS))}")
  components = {}
  for name, options in spec.items():
    options = dict(options or {})
    kind = options.pop("type", name)
    if kind not in REWARDS:
      raise ValueError(f"unknown reward {kind!r} (key {name!r}); valid rewards: "
                       f"{', '.join(sorted(REWARDS))}")
    weight = options.pop("weight", 1.0)
    valid = _option_names(REWARDS[kind])
    unknown = sorted(set(options) - set(valid))
    if unknown:
      raise ValueError(f"reward {name!r}: unknown option {unknown[0]!r}; valid options: "
                       f"{', '.join(['weight', 'type', *valid])}")
    try:
      fn = REWARDS[kind](**options)
    except TypeError as e:  # a missing required option
      raise ValueError(f"reward {name!r}: {e}; valid options: "
                       f"{', '.join(['weight', 'type', *valid])}") from None
    components[name] = (fn, weight)
  return CompositeReward(components)
