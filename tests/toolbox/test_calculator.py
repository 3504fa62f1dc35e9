import math
import re

import pytest

from wakea_jax.toolbox import calculator
from wakea_jax.toolbox.calculator import CalculatorError, calculate, check_power


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", "7"),
    ("2 ** 100", str(2**100)),
    ("7 // 2", "3"),
    ("-7 % 3", "2"),
    ("+-3", "-3"),
    ("1 / 4", "0.25"),
    ("10 / 2", "5"),
    ("sqrt(16)", "4"),
    ("factorial(20)", str(math.factorial(20))),
    ("max(1, 5, 3) - min(4, 2)", "3"),
    ("round(pi, 3)", "3.142"),
    ("floor(e) + ceil(0.1)", "3"),
    ("log(8, 2)", "3"),
    ("2 ** -1", "0.5"),
    ("2.0 ** -5000", "0"),
    ("0.1 + 0.2", "0.3"),
    ("abs(-12345678901234567890)", "12345678901234567890"),
])
def test_evaluates(expression, expected):
  assert calculate(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "function '__import__' is not allowed"),
    ("().__class__", "attribute access is not allowed"),
    ("(1).__class__", "attribute access is not allowed"),
    ("x", "unknown name 'x'"),
    ("9**9**9", "too large"),
    ("10 ** 100000", "too large"),
    ("factorial(100000)", "exceeds the bound"),
    ("[1, 2]", "lists are not allowed"),
    ("(1, 2)[0]", "subscripts are not allowed"),
    ("(lambda: 1)()", "function 'lambda: 1' is not allowed"),
    ("lambda: 1", "lambdas are not allowed"),
    ("[i for i in range(3)]", "comprehensions are not allowed"),
    ("'abc'", "only numbers are allowed"),
    ("True + 1", "only numbers are allowed"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "math error"),
    ("2 +", "syntax error"),
    ("1 < 2", "comparisons are not allowed"),
    ("exp(1000)", "numeric overflow"),
    ("2.0 ** 5000", "numeric overflow"),
    ("(-8) ** 0.5", "complex results are not supported"),
])
def test_rejects(expression, message):
  with pytest.raises(CalculatorError, match=re.escape(message)):
    calculate(expression)


def test_power_bound_checked_before_computing():
  # check_power runs on the operands alone; these would take forever (or all memory) to compute.
  with pytest.raises(CalculatorError, match="too large"):
    check_power(9, 9**9)
  with pytest.raises(CalculatorError, match="too large"):
    check_power(10**500, 10**500)
  check_power(2, 1000)  # ~302 digits: allowed
  check_power(1, 10**100)
  check_power(-1, 10**100)


def test_tool_reports_errors_as_results():
  from wakea_jax.toolbox import Router
  router = Router([calculator.make_tool()])
  assert router.call("calculator", {"expression": "6*7"}).text == "42"
  result = router.call("calculator", {"expression": "__import__('os')"})
  assert not result.ok
  assert result.text == ("Error: calculator: function '__import__' is not allowed (allowed: "
                         + ", ".join(calculator.FUNCTIONS) + ")")
