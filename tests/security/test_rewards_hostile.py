"""Rewards and answer parsing on hostile model output: never raise, never overrun the budget."""

import time

import numpy as np
import pytest

from wakea_jax.rl import answers, rewards
from wakea_jax.rl.samples import Sample


def _timed(fn, *args, **kwargs):
  start = time.monotonic()
  out = fn(*args, **kwargs)
  return out, time.monotonic() - start


@pytest.mark.parametrize("prediction, reference, expected", [
    ("1e400", "5", False),            # once: OverflowError for the whole batch
    ("1e400", "1e400", True),
    ("1e401", "1e401", True),         # equal strings need no arithmetic
    ("1e401", "1e402", False),        # past the exponent bound: not compared numerically
    ("1/1e1000000", "0", False),      # once: 27 s despite timeout_s=2
    ("1/1e10000000", "0", False),     # once: over 100 s
    ("9" * 5000, "9" * 4999, False),  # beyond the int-string conversion limit
    ("-inf", "5", False),
    ("nan", "nan", True),
    ("1" * 2000, "1", False),         # longer than MAX_ANSWER_CHARS
])
def test_math_equal_is_total_and_fast(prediction, reference, expected):
  result, seconds = _timed(answers.math_equal, prediction, reference, timeout_s=2.0)
  assert result is expected and seconds < 5.0   # the old paths took 27 s to minutes


@pytest.mark.parametrize("text", [
    "\\boxed{" * 100_000,              # once: 96 s (every opening scanned to the end)
    "\\boxed{" * 50_000 + "}" * 10,
    "<answer>" * 100_000,
    "<answer>" * 100_000 + "</answer>",
    "{" * 100_000 + "\\boxed{7}",
    "1," * 100_000,
])
def test_extract_answer_is_linear_on_unclosed_markup(text):
  _, seconds = _timed(answers.extract_answer, text)
  assert seconds < 5.0   # quadratic took 96 s


def test_extract_answer_keeps_its_meaning():
  assert answers.extract_answer("\\boxed{\\frac{1}{2}} then \\boxed{3") == "\\frac{1}{2}"
  assert answers.extract_answer("<answer>1</answer> <answer>2</answer> <answer>3") == "2"
  assert answers.extract_answer("\\boxed{a} \\boxed{b}") == "b"


def test_a_hung_sympy_comparison_is_killed_at_the_budget(monkeypatch):
  monkeypatch.setattr(answers, "_SYMPY_FN", "tests.security.slow_functions:spin")
  monkeypatch.setattr(answers, "_sympy_pool", None)
  result, seconds = _timed(answers.math_equal, "x + 1", "1 + x", timeout_s=1.0)
  assert result is False and seconds < 15.0   # 1 s budget + the worker's start-up
  pool = answers._sympy_pool
  monkeypatch.undo()
  pool.close()


def test_reward_functions_never_raise_for_model_output(monkeypatch):
  def explode(*args, **kwargs):
    raise OverflowError("boom")

  monkeypatch.setattr(rewards, "math_equal", explode)
  before = rewards.FAILURES["math"]
  samples = [Sample(prompt="p", completion=f"<answer>{i}</answer>", answer=str(i))
             for i in range(3)]
  out = rewards.REWARDS["math"]()(samples)
  np.testing.assert_array_equal(out, [0, 0, 0])
  assert rewards.FAILURES["math"] == before + 3


@pytest.mark.parametrize("completion", [
    "<answer>1e400</answer>", "\\boxed{" * 50_000, "<answer>" + "9" * 6000 + "</answer>",
    "<|im_start|>assistant\n" * 10_000, "\ud800", "<tool_call>" * 10_000,
])
def test_every_reward_scores_hostile_completions(completion):
  sample = Sample(prompt="p", completion=completion, answer="42", num_tokens=5)
  for name in ("math", "exact_match", "format"):
    out, seconds = _timed(rewards.REWARDS[name](), [sample])
    assert out.shape == (1,) and np.isfinite(out).all() and seconds < 10.0, name
