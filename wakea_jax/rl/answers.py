"""Reading a model's answer and comparing it with a reference: the parsing behind the
math and exact-match rewards (rl/rewards.py).

`final_response` keeps only the model's last assistant turn, so an answer that appears only
inside a tool response is the tool's, not the model's.
"""

from __future__ import annotations

import fractions
import importlib.util
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
from wakea_jax.toolbox.isolation import IsolatedPool, WorkerError

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


_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACES = re.compile(r"[{}]")
# A number not glued to a word ("x2", "v1.2"): optional sign (only when not a binary minus, as
# in "3-5"), thousands groups or plain digits, optional decimals, optional "/denominator".
_FALLBACKS = (None, "last_number", "last_word")
_WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])(?:(?<![0-9)])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:/\d+)?(?![0-9])")


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} whose braces balance (nesting allowed).

  One pass over the braces with a stack (linear: 100k characters of unclosed `\\boxed{`
  took minutes when each opening was scanned to the end separately).
  """
  boxed_opens = {match.end() - 1 for match in _BOXED.finditer(text)}
  if not boxed_opens:
    return None
  stack: list[int] = []
  best: tuple[int, int] | None = None   # (content start, content end) of the last one
  for match in _BRACES.finditer(text):
    i = match.start()
    if text[i] == "{":
      stack.append(i)
    elif stack:
      opened = stack.pop()
      if opened in boxed_opens and (best is None or opened + 1 > best[0]):
        best = (opened + 1, i)
  return text[best[0]:best[1]].strip() if best is not None else None


def _last_tagged(text: str) -> str | None:
  """Content of the last <answer>...</answer> (linear even with many unclosed tags)."""
  found, pos = None, 0
  while (start := text.find(_ANSWER_OPEN, pos)) >= 0:
    end = text.find(_ANSWER_CLOSE, start + len(_ANSWER_OPEN))
    if end < 0:
      break
    found = text[start + len(_ANSWER_OPEN):end]
    pos = end + len(_ANSWER_CLOSE)
  return found


def extract_answer(text: str, *, fallback: str | None = "last_number") -> str | None:
  """The last <answer>...</answer>, else the last \\boxed{...}, else with
  fallback="last_number" the last number (ints, decimals, negatives, 1,234, 3/4), with
  fallback="last_word" the last word (letters, digits, ' and -: the one-word answer after a
  description, "red circle 01, blue square 23: blue"), else None."""
  if fallback not in _FALLBACKS:
    raise ValueError(f"extract_answer: fallback must be one of {_FALLBACKS}, got {fallback!r}")
  tagged = _last_tagged(text)
  if tagged is not None:
    return tagged.strip()
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed
  if fallback == "last_number":
    numbers = _NUMBER.findall(text)
    if numbers:
      return numbers[-1]
  if fallback == "last_word":
    words = _WORD.findall(text)
    if words:
      return words[-1]
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
_REL_TOL = fractions.Fraction(1, 10**6)
_SYMPY_MAX_CHARS = 200
# An answer longer than this is not compared (a math answer is short; normalising and
# comparing unbounded text costs time a reward does not have).
MAX_ANSWER_CHARS = 1000
# Numbers compared exactly may have at most this many digits and this decimal exponent:
# enough for any answer, small enough that Fraction arithmetic stays microseconds
# ("1e400" compared to a float once raised OverflowError; "1/1e1000000" took 27 s).
_MAX_DIGITS = 400
_MAX_EXPONENT = 400
_DIGIT_RUN = re.compile(r"\d+")
_EXPONENT = re.compile(r"e[-+]?(\d+)", re.IGNORECASE)
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


def _oversized(s: str) -> bool:
  """Whether `s` has a digit run or a decimal exponent past what answers ever need."""
  if any(len(run) > _MAX_DIGITS for run in _DIGIT_RUN.findall(s)):
    return True
  return any(int(e[-6:]) > _MAX_EXPONENT or len(e) > 6 for e in _EXPONENT.findall(s))


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
  """Equal within a relative 1e-6, in exact arithmetic (no float overflow)."""
  return a == b or abs(a - b) <= _REL_TOL * max(abs(a), abs(b))


def _sympy_safe(s: str) -> bool:
  if len(s) > _SYMPY_MAX_CHARS or "__" in s or not re.fullmatch(r"[0-9A-Za-z+\-*/^(). ]+", s):
    return False
  if any(len(run) > 30 for run in _DIGIT_RUN.findall(s)):   # no huge literals for sympy
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


_SYMPY_FN = "wakea_jax.rl.answers:_sympy_equal_unguarded"
_sympy_pool: IsolatedPool | None = None
_sympy_lock = threading.Lock()


def _sympy_equal(a: str, b: str, timeout_s: float) -> bool:
  """sympy equivalence in a worker process killed at `timeout_s` (a thread could not be
  stopped while sympy holds the GIL); False on a parse error, a timeout or without sympy."""
  global _sympy_pool
  if importlib.util.find_spec("sympy") is None:  # optional: numeric-only comparison
    return False
  if not (_sympy_safe(a) and _sympy_safe(b)):
    return False
  with _sympy_lock:
    if _sympy_pool is None:
      _sympy_pool = IsolatedPool([_SYMPY_FN], size=1, memory_bytes=1 << 30)
  try:
    return bool(_sympy_pool.call(_SYMPY_FN, a, b, timeout_s=timeout_s))
  except (TimeoutError, WorkerError, OSError):
    return False


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
  if len(str(prediction)) > MAX_ANSWER_CHARS or len(str(reference)) > MAX_ANSWER_CHARS:
    return False
  a, a_percent = _normalize_math(prediction)
  b, b_percent = _normalize_math(reference)
  if not a or not b:
    return False
  if a == b or a.lower() == b.lower():
    return True
  if _oversized(a) or _oversized(b):
    return False
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
