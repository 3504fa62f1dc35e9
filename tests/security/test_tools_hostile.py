"""Tools on hostile arguments: bounded answers, fast, and a timeout that really stops a call."""

import re
import time

import pytest

from wakea_jax.toolbox import calculator
from wakea_jax.toolbox.registry import default_router
from wakea_jax.toolbox.router import Router, Tool


@pytest.fixture(scope="module")
def router():
  router = default_router(enabled=("calculator",), tool_timeout_s=5.0)
  yield router
  router.close()


@pytest.mark.parametrize("expression, message", [
    ("round(1, -10**8)", "exceed the bound"),     # once: minutes, holding the GIL
    ("round(1, 10**8)", "exceed the bound"),
    ("round(2.5, 0.5)", "integer number of digits"),
    ("9**9**9", "too large"),
    ("factorial(10**6)", "exceeds the bound"),
    ("10**999 * 10**999", "too large"),
    ("max(" + ",".join(["1"] * 100) + ")", "at most 64 arguments"),
    ("(" * 300 + "1" + ")" * 300, "syntax error|nested too deeply"),
    ("1" * 2000, "longer than"),
    ("exp(10**6)", "overflow|math error"),
    ("__import__('os')", "not allowed"),
])
def test_calculator_refuses_fast(router, expression, message):
  start = time.monotonic()
  result = router.call("calculator", {"expression": expression})
  assert not result.ok
  assert re.search(message, result.error), result.error
  assert time.monotonic() - start < 10.0  # includes the worker's start on first use


def test_calculator_still_computes(router):
  assert router.call("calculator", {"expression": "round(3.14159, 2) + max(1, 2)"}).text == "5.14"
  assert calculator.calculate("round(123456, -3)") == "123000"


def test_the_tool_timeout_is_a_hard_deadline():
  """A tool body that holds the GIL forever: a thread timeout would leave it running; the
  isolated tool's worker is killed and the router answers at the deadline."""
  tool = Tool("spin", "never returns", {"type": "object"}, run=lambda a: "unused",
              timeout_s=1.0, isolated="tests.security.slow_functions:spin_tool")
  router = Router([tool])
  try:
    start = time.monotonic()
    result = router.call("spin", {})
    assert not result.ok and "timed out after 1.0 s" in result.error
    assert time.monotonic() - start < 10.0
    start = time.monotonic()
    assert not router.call("spin", {}).ok           # and again, with a fresh worker
    assert time.monotonic() - start < 10.0
  finally:
    router.close()


def test_a_turn_with_hundreds_of_calls_runs_only_the_first_few():
  from wakea_jax.data import chat
  from wakea_jax.sampling import tool_loop
  runs = []
  tool = Tool("count", "counts", {"type": "object"}, run=lambda a: runs.append(1) or "ok")
  text = '<tool_call>{"name": "count", "arguments": {}}</tool_call>' * 300
  results = tool_loop._results_for(chat.parse_tool_calls(text, strict=False), Router([tool]))
  assert len(results) == 300 and len(runs) == tool_loop.MAX_CALLS_PER_TURN
  assert results[-1].startswith("Error: more than")
