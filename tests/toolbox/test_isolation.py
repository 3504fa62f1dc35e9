"""IsolatedPool: functions run in killable worker processes with a hard deadline."""

import time

import pytest

from wakea_jax.toolbox.isolation import IsolatedPool, WorkerError

CALC = "wakea_jax.toolbox.calculator:calculate"


@pytest.fixture()
def pool():
  pool = IsolatedPool([CALC, "builtins:round", "builtins:complex", "os:_exit"], size=1)
  yield pool
  pool.close()


def test_calls_return_results_and_errors(pool):
  assert pool.call(CALC, "2+3*4", timeout_s=30) == "14"
  with pytest.raises(WorkerError, match="CalculatorError: division by zero"):
    pool.call(CALC, "1/0", timeout_s=30)
  assert pool.call(CALC, "6*7", timeout_s=30) == "42"   # the same worker lives on


def test_a_call_holding_the_gil_is_killed_at_its_deadline(pool):
  pool.call(CALC, "1", timeout_s=30)   # start the worker outside the timed part
  start = time.monotonic()
  with pytest.raises(TimeoutError):
    pool.call("builtins:round", 1, -10**8, timeout_s=0.5)
  assert time.monotonic() - start < 10.0   # the call alone would run for minutes
  assert pool.call(CALC, "1+1", timeout_s=30) == "2"    # a fresh worker


def test_a_dying_worker_is_replaced(pool):
  with pytest.raises(WorkerError, match="exited"):
    pool.call("os:_exit", 3, timeout_s=30)
  assert pool.call(CALC, "2**10", timeout_s=30) == "1024"


def test_only_allowed_functions_run(pool):
  with pytest.raises(ValueError, match="not an allowed function"):
    pool.call("os:system", "true", timeout_s=30)


def test_results_must_be_json(pool):
  with pytest.raises(WorkerError, match="not JSON serializable|TypeError"):
    pool.call("builtins:complex", 1, 2, timeout_s=30)
