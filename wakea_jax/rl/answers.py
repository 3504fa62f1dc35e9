"""Reading a model's answer and comparing it with a reference: the parsing behind the
math and exact-match rewards (rl/rewards.py).

`final_response` keeps only the model's last assistant turn, so an answer that appears only
inside a tool response is the tool's, not the model's.
"""

from __future__ import annotations

import fractions
import math
import re
import string
import threading
from typing import Any

from wakea_jax.data.tokenizer import (
    IM_END,
    IM_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)

# ------------------------------------------------------------------------------------------
# Reading the model's answer
# ------------------------------------------------------------------------------------------

_ASSISTANT = f"{IM_START}assistant\n"
_ENDOFTEXT = "<|endoftext|>"
_TOOL_CALL_BLOCK = re.compile(
    rf"{re.escape(TOOL_CALL_START)}.*?(?:{re.escape(TOOL_CALL_END)}|$)", re.DOTALL)
_TOOL_RESPONSE_BLOCK = re.compile(
    rf"{re.escape(TOOL_RESPONSE_START)}.*?(?:{re.escape(TOOL_RESPONSE_END)}|$)", re.DOTALL)


def without_tool_responses(text: str) -> str:
  """`text` with every <tool_response> block removed (what the model itself wrote)."""
  return _TOOL_RESPONSE_BLOCK.sub("", text)


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

_TEXT_COMMAND = re.compile(
    r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
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
