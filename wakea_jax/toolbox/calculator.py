"""Safe arithmetic: the expression is parsed with `ast` and walked over an allow-list; never eval.

Size bounds are checked *before* an operation is computed (from log10 magnitudes), so
`9**9**9` or `factorial(10**6)` is rejected in microseconds instead of hanging the host.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from wakea_jax.toolbox.router import Tool, ToolError

MAX_EXPRESSION_CHARS = 1000
MAX_RESULT_DIGITS = 1000  # integers past 10**1000 are rejected
MAX_FACTORIAL = 400  # 400! has 869 digits, within MAX_RESULT_DIGITS
MAX_DEPTH = 50

Number = int | float


class CalculatorError(ToolError, ValueError):
  """An expression the calculator refuses or cannot evaluate."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _factorial(n: Number) -> int:
  if isinstance(n, float):
    if not n.is_integer():
      raise CalculatorError("factorial() needs an integer")
    n = int(n)
  if n < 0:
    raise CalculatorError("factorial() of a negative number")
  if n > MAX_FACTORIAL:
    raise CalculatorError(f"factorial() argument {n} exceeds the bound {MAX_FACTORIAL}")
  return math.factorial(n)


def _log(x: Number, base: Number | None = None) -> float:
  return math.log(x) if base is None else math.log(x, base)


def _round(x: Number, ndigits: Number | None = None) -> Number:
  # round(1, -10**8) computes 10**(10**8): bound the digits before Python tries.
  if ndigits is None:
    return round(x)
  if isinstance(ndigits, float):
    if not ndigits.is_integer():
      raise CalculatorError("round() needs an integer number of digits")
    ndigits = int(ndigits)
  if abs(ndigits) > MAX_RESULT_DIGITS:
    raise CalculatorError(f"round() digits {_fmt_short(ndigits)} exceed the bound "
                          f"{MAX_RESULT_DIGITS}")
  return round(x, ndigits)


def _bounded_args(fn: Callable[..., Number], max_args: int = 2) -> Callable[..., Number]:
  """`fn` refusing more than `max_args` arguments (min/max take any number otherwise)."""
  def call(*args: Number) -> Number:
    if len(args) > max_args:
      raise CalculatorError(f"at most {max_args} arguments")
    return fn(*args)
  return call


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "log": _log, "log10": math.log10, "log2": math.log2, "exp": math.exp,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": _round,
    "min": _bounded_args(min, 64), "max": _bounded_args(max, 64), "factorial": _factorial,
    "gcd": _bounded_args(math.gcd, 64),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}

# Node types with a specific message, so the model learns what it did wrong.
_REJECTED = {
    ast.Attribute: "attribute access is", ast.Subscript: "subscripts are",
    ast.Lambda: "lambdas are", ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are", ast.NamedExpr: "assignments are",
    ast.Compare: "comparisons are", ast.BoolOp: "boolean operators are",
    ast.IfExp: "conditionals are", ast.List: "lists are", ast.Tuple: "tuples are",
    ast.Dict: "dicts are", ast.Set: "sets are", ast.JoinedStr: "strings are",
    ast.Starred: "star arguments are",
}


def _log10_abs(x: Number) -> float:
  """log10(|x|) without converting huge ints to float (which would overflow)."""
  if x == 0:
    return -math.inf
  if isinstance(x, int):
    return (x.bit_length() - 1) * math.log10(2) if abs(x) > 2**53 else math.log10(abs(x))
  return math.log10(abs(x))


def check_power(base: Number, exponent: Number) -> None:
  """Rejects `base ** exponent` past MAX_RESULT_DIGITS digits, from magnitudes alone.

  digits(b ** x) ~ x * log10|b|, so log10(digits) = log10|x| + log10|log10|b||: two logs of the
  operands, never the power itself."""
  if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0 or abs(base) <= 1:
    return  # float powers are O(1) and overflow with OverflowError; |result| <= 1 otherwise
  magnitude = _log10_abs(exponent) + math.log10(max(abs(_log10_abs(base)), 1e-300))
  if magnitude > math.log10(MAX_RESULT_DIGITS):
    raise CalculatorError(f"result of {_fmt_short(base)} ** {_fmt_short(exponent)} is too large "
                          f"(more than {MAX_RESULT_DIGITS} digits)")


def check_product(a: Number, b: Number) -> None:
  """Rejects an int * int product past MAX_RESULT_DIGITS digits before computing it."""
  if (isinstance(a, int) and isinstance(b, int)
      and _log10_abs(a) + _log10_abs(b) > MAX_RESULT_DIGITS):
    raise CalculatorError(f"result is too large (more than {MAX_RESULT_DIGITS} digits)")


def _fmt_short(x: Number) -> str:
  text = format_number(x)
  return text if len(text) <= 20 else f"{text[:8]}...({len(text)} digits)"


def _eval(node: ast.AST, depth: int = 0) -> Number:
  if depth > MAX_DEPTH:
    raise CalculatorError("expression is nested too deeply")
  if isinstance(node, ast.Expression):
    return _eval(node.body, depth + 1)
  if isinstance(node, ast.Constant):
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
      raise CalculatorError(f"only numbers are allowed, got {type(node.value).__name__} "
                            f"{node.value!r}"[:120])
    return node.value
  if isinstance(node, ast.Name):
    if node.id in CONSTANTS:
      return CONSTANTS[node.id]
    raise CalculatorError(f"unknown name {node.id!r} (constants: {', '.join(CONSTANTS)})")
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_eval(node.operand, depth + 1))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
    if isinstance(node.op, ast.Pow):
      check_power(left, right)
    elif isinstance(node.op, ast.Mult):
      check_product(left, right)
    result = _BINARY[type(node.op)](left, right)
    if isinstance(result, complex):  # e.g. (-8) ** 0.5
      raise CalculatorError("complex results are not supported")
    return result
  if isinstance(node, ast.Call):
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
      what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:60]
      raise CalculatorError(f"function {what!r} is not allowed (allowed: {', '.join(FUNCTIONS)})")
    if node.keywords:
      raise CalculatorError("keyword arguments are not allowed")
    args = [_eval(arg, depth + 1) for arg in node.args]
    return FUNCTIONS[node.func.id](*args)
  for kind, label in _REJECTED.items():
    if isinstance(node, kind):
      raise CalculatorError(f"{label} not allowed")
  raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def format_number(value: Number) -> str:
  """Formats a result: ints exactly, integral floats below 1e16 as ints, else 12 digits."""
  if isinstance(value, bool):
    raise CalculatorError("boolean result")
  if isinstance(value, int):
    return str(value)
  if math.isnan(value) or math.isinf(value):
    return str(value)
  if value.is_integer() and abs(value) < 1e16:
    return str(int(value))
  return f"{value:.12g}"


def evaluate(expression: str) -> Number:
  """Evaluates an arithmetic expression; raises CalculatorError with a clear reason."""
  if len(expression) > MAX_EXPRESSION_CHARS:
    raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise CalculatorError(f"syntax error: {e.msg}") from None
  try:
    return _eval(tree)
  except ZeroDivisionError:
    raise CalculatorError("division by zero") from None
  except OverflowError:
    raise CalculatorError("numeric overflow") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, CalculatorError):
      raise
    raise CalculatorError(f"math error: {e}") from None


def calculate(expression: str) -> str:
  """Evaluates `expression` and returns the formatted result (raises CalculatorError)."""
  return format_number(evaluate(expression))


def run_isolated(arguments: dict[str, Any]) -> list[Any]:
  """The tool call as the router's worker process runs it: [ok, text]."""
  try:
    return [True, calculate(arguments["expression"])]
  except CalculatorError as e:
    return [False, str(e)]


def make_tool(timeout_s: float | None = 10.0) -> Tool:
  """The `calculator` tool: one required string argument, `expression`. The router runs
  it in a killable worker process (`run_isolated`), so `timeout_s` is a hard deadline."""
  return Tool(
      name="calculator",
      description=("Evaluate an arithmetic expression exactly. Supports + - * / // % **, "
                   f"functions {', '.join(FUNCTIONS)} and constants {', '.join(CONSTANTS)}."),
      parameters={"type": "object", "required": ["expression"],
                  "properties": {"expression": {"type": "string",
                                                "description": "e.g. (3 + 4) * sqrt(2)"}}},
      run=lambda arguments: calculate(arguments["expression"]),
      timeout_s=timeout_s,
      isolated="wakea_jax.toolbox.calculator:run_isolated",
  )
