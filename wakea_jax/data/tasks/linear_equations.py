"""A linear equation in x, read without eval: the equations task's step check.

`parse_equation` turns "3(x + 4) - 5 = 2x + 9" into (a, b) with the equation equivalent to
a*x + b = 0, by recursive descent over + - * / brackets, integers and x (implicit
multiplication before x or a bracket); anything else, a product of two x terms, a division
by x or by zero, and text longer than MAX_EQUATION_CHARS (model output bounds the
recursion) are errors. `check_step` compares the solution sets of two equations, so a
verifier rejects a wrong step even when the final answer is right (equations.first_error,
rl/task_types.py). Exact: Fractions throughout.

Its own module because it is the one piece of tasks/equations.py that is a parser rather than
a data generator; equations re-exports its public names.
"""

from __future__ import annotations

import re
from fractions import Fraction

_TOKEN = re.compile(r"\s*(?:(\d+)|(x)|([-+*/()]))")
MAX_EQUATION_CHARS = 200   # bounds the parser's recursion on model output


class _Parser:
  """Recursive descent over a linear expression in x: value (a, b) means a*x + b.

  expr := term (("+" | "-") term)*;  term := factor (("*" | "/" | implicit) factor)*;
  factor := ("+" | "-") factor | INT | "x" | "(" expr ")". Implicit multiplication only before
  "x" or "(" ("3x", "3(x + 4)", "(x + 1)(2)"; "x3" and "2 3" are refused). A product of two x
  terms or a division by an x term or by zero is refused: the result would not be linear.
  """

  def __init__(self, text: str) -> None:
    self.tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
      m = _TOKEN.match(text, pos)
      if not m:
        raise ValueError(f"unexpected {text[pos:pos + 10]!r} at {pos} in {text!r}")
      self.tokens.append(m.group(m.lastindex or 0))
      pos = m.end()
    self.i = 0

  def peek(self) -> str | None:
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self) -> str:
    token = self.peek()
    if token is None:
      raise ValueError("unexpected end of expression")
    self.i += 1
    return token

  def parse(self) -> tuple[Fraction, Fraction]:
    value = self.expr()
    if self.peek() is not None:
      raise ValueError(f"unexpected {self.peek()!r}")
    return value

  def expr(self) -> tuple[Fraction, Fraction]:
    a, b = self.term()
    while self.peek() in ("+", "-"):
      sign = 1 if self.take() == "+" else -1
      c, d = self.term()
      a, b = a + sign * c, b + sign * d
    return a, b

  def term(self) -> tuple[Fraction, Fraction]:
    value = self.factor()
    while (token := self.peek()) in ("*", "/", "x", "("):
      if token in ("*", "/"):
        self.take()
      right = self.factor()
      if token == "/":
        if right[0] or not right[1]:
          raise ValueError("division by an x term or by zero")
        value = (value[0] / right[1], value[1] / right[1])
      elif value[0] and right[0]:
        raise ValueError("product of two x terms is not linear")
      else:
        value = (value[0] * right[1] + right[0] * value[1], value[1] * right[1])
    return value

  def factor(self) -> tuple[Fraction, Fraction]:
    token = self.take()
    if token in ("+", "-"):
      a, b = self.factor()
      return (a, b) if token == "+" else (-a, -b)
    if token == "x":
      return Fraction(1), Fraction(0)
    if token == "(":
      value = self.expr()
      if self.take() != ")":
        raise ValueError("unbalanced brackets")
      return value
    if token.isdigit():
      return Fraction(0), Fraction(int(token))
    raise ValueError(f"unexpected {token!r}")


def parse_equation(equation: str) -> tuple[Fraction, Fraction]:
  """(a, b) with `equation` equivalent to a*x + b = 0 (left minus right); ValueError when it is
  not one linear equation in x."""
  if len(equation) > MAX_EQUATION_CHARS:
    raise ValueError(f"equation longer than {MAX_EQUATION_CHARS} characters")
  sides = equation.split("=")
  if len(sides) != 2:
    raise ValueError(f"expected one '=' in {equation!r}")
  (a, b), (c, d) = (_Parser(side).parse() for side in sides)
  return a - c, b - d


def solution_set(equation: str) -> Fraction | str:
  """The unique solution of `equation`, or "all" (an identity) or "none" (a contradiction)."""
  a, b = parse_equation(equation)
  if a:
    return -b / a
  return "all" if b == 0 else "none"


def check_step(previous_equation: str, equation: str) -> bool:
  """Whether `equation` has the same solution set as `previous_equation` (a valid step);
  False when either is not a linear equation in x (model output never raises here)."""
  try:
    return solution_set(previous_equation) == solution_set(equation)
  except (ValueError, ZeroDivisionError, RecursionError):
    return False
