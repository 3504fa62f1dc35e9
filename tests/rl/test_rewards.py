from __future__ import annotations

import numpy as np
import pytest

from wakea_jax.rl import rewards
from wakea_jax.rl.answers import final_response
from wakea_jax.rl.samples import Sample

TOOL_COMPLETION = (
    '<tool_call>{"name": "calculator", "arguments": {"expression": "23*19"}}</tool_call>'
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n437\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nThe answer is 437.<|im_end|>")


def _s(completion: str, answer=None, **kwargs) -> Sample:
  return Sample(prompt="q", completion=completion, answer=answer, **kwargs)


# --- final_response / extract_answer --------------------------------------------------------

def test_final_response_takes_last_assistant_turn():
  assert final_response(TOOL_COMPLETION) == "The answer is 437."
  assert final_response("Plain <answer>4</answer><|im_end|><|endoftext|>") == (
      "Plain <answer>4</answer>")


def test_answer_only_in_tool_response_is_not_credited():
  # The loop stopped after the tool answered: the model itself never stated 437.
  completion = TOOL_COMPLETION[:TOOL_COMPLETION.index("<|im_start|>assistant")]
  assert final_response(completion) == ""
  assert rewards.extract_answer(final_response(completion)) is None
  fn = rewards.REWARDS["math"]()
  np.testing.assert_array_equal(fn([_s(completion, 437), _s(TOOL_COMPLETION, 437)]), [0.0, 1.0])


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{\sqrt{2}}} done", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{3} <answer>7</answer>", "7"),
    ("<answer>1</answer> or <answer> 2 </answer>", "2"),
    (r"\boxed{unbalanced", None),
    ("it is -5 degrees", "-5"),
    ("compute 3-5 = 2", "2"),
    ("a total of 1,234,567 apples", "1,234,567"),
    ("ratio 3/4.", "3/4"),
    ("pi is 3.14", "3.14"),
    ("first 12, then 7.", "7"),
    ("答案是42", "42"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
  assert rewards.extract_answer(text) == expected


def test_extract_answer_without_number_fallback():
  assert rewards.extract_answer("the answer is 5", fallback=None) is None
  with pytest.raises(ValueError, match="fallback"):
    rewards.extract_answer("5", fallback="first_number")
  assert rewards.extract_answer("circle 01, square 23: three", fallback="last_word") == "three"
  assert rewards.extract_answer("so it's don't-care_", fallback="last_word") == "don't-care"
  assert rewards.extract_answer("... --", fallback="last_word") is None


# --- math_equal -----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, reference", [
    ("1/2", "0.5"), (r"\frac{1}{2}", 0.5), (r"\dfrac12", "0.5"), ("3", "3.0"), ("3", 3),
    ("1,000", "1000"), ("$1,234.$", 1234), ("2x+2", "2(x+1)"), (r"\text{5}", "5"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), ("x = 5", "5"), ("-0.5", r"-\frac{1}{2}"),
    ("50%", "0.5"), (r"50\%", "50"), ("7", ["6", "7"]), ("0.3333333", "1/3"),
])
def test_math_equal_true(prediction, reference):
  assert rewards.math_equal(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("4", "5"), ("0.5", "50"), ("x^2", "x^3"), ("2x+1", "2(x+1)"), (None, "1"), ("", "0"),
    ("0.3333", "1/3"), ('__import__("os").getcwd()', "1"), ("9^9^9^9", "1"), ("1", None),
])
def test_math_equal_false(prediction, reference):
  assert not rewards.math_equal(prediction, reference)


# --- exact match ----------------------------------------------------------------------------

def test_squad_normalize():
  assert rewards.squad_normalize("  The  Eiffel-Tower!  ") == "eiffeltower"
  assert rewards.squad_normalize("An apple, a day") == "apple day"
  assert rewards.squad_normalize("Theory") == "theory"  # "the" only as a whole word


def test_exact_match_reward():
  fn = rewards.REWARDS["exact_match"]()
  samples = [_s("<answer>the Paris.</answer>", ["paris", "Paris, France"]),
             _s("Paris", "paris"), _s("It is Paris.", "paris"),
             _s("<answer>Lyon</answer>", "Paris")]
  np.testing.assert_array_equal(fn(samples), [1, 1, 0, 0])
  whole = rewards.REWARDS["exact_match"](whole_response=True)
  np.testing.assert_array_equal(whole([_s("<answer>x</answer>", "x")]), [0])
  # A one-word answer after a description: the last word, unless tagged.
  last = rewards.REWARDS["exact_match"](fallback="last_word")
  samples = [_s("blue", "blue"), _s("red circle 01, blue square 23: blue.", "blue"),
             _s("red circle 01, blue square 23: red", "blue"), _s("It is Paris.", "paris"),
             _s("blue circle 01: <answer>red</answer> blue", "blue"), _s("...", "blue")]
  np.testing.assert_array_equal(last(samples), [1, 1, 0, 1, 0, 0])


# --- format ---------------------------------------------------------------------------------

def test_format_reward_order_and_partial():
  strict = rewards.REWARDS["format"]()
  partial = rewards.REWARDS["format"](partial=True)
  samples = [_s("<think>a</think><answer>b</answer>"), _s("<answer>b</answer><think>a</think>"),
             _s("</think><answer>b</answer>"), _s("nothing")]
  np.testing.assert_array_equal(strict(samples), [1, 0, 0, 0])
  np.testing.assert_allclose(partial(samples), [1.0, 0.5, 0.75, 0.0])
  # Reasoning before a tool call only counts with scope="completion".
  completion = ("<think>r</think><tool_call>{}</tool_call><|im_end|>\n<|im_start|>user\n"
                "<tool_response>\n<answer>x</answer>\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\nno tags<|im_end|>")
  whole = rewards.REWARDS["format"](scope="completion")
  assert strict([_s(completion)])[0] == 0 and whole([_s(completion)])[0] == 0  # answer in tool
  with pytest.raises(ValueError, match="scope"):
    rewards.REWARDS["format"](scope="all")


# --- code -----------------------------------------------------------------------------------

def _code(body: str) -> str:
  return f"Here:\n```python\n{body}\n```\n<|im_end|>"


def test_code_reward_pass_fail_crash_timeout():
  tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
  meta = {"tests": tests}
  samples = [
      _s("```python\ndef add(a, b):\n  return a - b\n```\n"
         + _code("def add(a, b):\n  return a + b"),
         meta=meta),                                               # last block wins: 2/3
      _s(_code("def add(a, b):\n  return 0"), meta=meta),          # 1/3 (the 0 == 0 one)
      _s(_code("raise SystemExit(3)"), meta=meta),                 # crash -> 0
      _s(_code("while True:\n  pass"), meta=meta),                 # timeout -> 0
      _s(_code("print('@@wakea-test-0:pass')\ndef add(a, b):\n  return None"), meta=meta),
      _s("no code at all", meta=meta),
  ]
  fn = rewards.REWARDS["code"](timeout_s=2.0, workers=2)
  np.testing.assert_allclose(fn(samples), [2 / 3, 1 / 3, 0, 0, 0, 0], atol=1e-6)
  strict = rewards.REWARDS["code"](timeout_s=2.0, all_or_nothing=True)
  ok = _s(_code("def add(a, b):\n  return a + b"), meta={"tests": tests[:2]})
  np.testing.assert_array_equal(strict([ok, samples[0]]), [1, 0])
  with pytest.raises(ValueError, match="meta\\['tests'\\]"):
    fn([_s(_code("x = 1"))])


# --- tool use / overlong --------------------------------------------------------------------

def test_tool_use_reward():
  samples = [_s("", num_tool_calls=2), _s("", num_tool_calls=2, tool_errors=1), _s("")]
  np.testing.assert_array_equal(rewards.REWARDS["tool_use"]()(samples), [1, 0, 0])
  np.testing.assert_array_equal(
      rewards.REWARDS["tool_use"](require_call=False)(samples), [1, 0, 1])
  np.testing.assert_allclose(
      rewards.REWARDS["tool_use"](error_penalty=0.25)(samples), [1, 0.75, 0])


def test_overlong_matches_dapo_eq13():
  max_len, cache = 100, 20
  fn = rewards.REWARDS["overlong"](max_len=max_len, cache=cache)
  lengths = [0, 80, 81, 90, 99, 100, 101, 500]

  def dapo(length: int) -> float:  # arXiv 2503.14476 eq. 13
    if length <= max_len - cache:
      return 0.0
    if length <= max_len:
      return ((max_len - cache) - length) / cache
    return -1.0

  got = fn([_s("", num_tokens=n) for n in lengths])
  np.testing.assert_allclose(got, [dapo(n) for n in lengths], atol=1e-6)
  np.testing.assert_allclose(got[[1, 3, 5, 6]], [0.0, -0.5, -1.0, -1.0])
  assert got.dtype == np.float32
  assert rewards.REWARDS["length_penalty"] is rewards.REWARDS["overlong"]
  with pytest.raises(ValueError, match="cache"):
    rewards.REWARDS["overlong"](max_len=10, cache=20)


# --- composite / build_reward ---------------------------------------------------------------

def _const(value: float):
  return lambda samples: np.full(len(samples), value, np.float32)


def test_composite_totals_and_schedule():
  reward = rewards.CompositeReward({"a": (_const(1.0), 2.0),
                                    "b": (_const(0.5), ((10, 1.0), (110, 0.0)))})
  samples = [_s("x"), _s("y")]
  for step, w_b in [(0, 1.0), (10, 1.0), (60, 0.5), (110, 0.0), (1000, 0.0)]:
    total, parts = reward(samples, step=step)
    np.testing.assert_allclose(total, 2.0 + 0.5 * w_b)
    np.testing.assert_array_equal(parts["a"], [1.0, 1.0])
    np.testing.assert_array_equal(parts["b"], [0.5, 0.5])
  assert reward.weights(60) == {"a": 2.0, "b": 0.5}
  with pytest.raises(ValueError, match="strictly increasing"):
    rewards.CompositeReward({"a": (_const(1.0), ((5, 1.0), (5, 0.0)))})
  bad = rewards.CompositeReward({"a": (lambda s: np.zeros(3), 1.0)})
  with pytest.raises(ValueError, match="shape"):
    bad(samples)


def test_build_reward():
  reward = rewards.build_reward({
      "math": {"weight": 1.0},
      "format": {"weight": [[0, 0.5], [200, 0.0]], "tags": ["<answer>", "</answer>"]},
      "strict_format": {"type": "format", "weight": 0.0, "tags": ("<think>",)}})
  total, parts = reward([_s("<answer>4</answer>", "4"), _s("5", "4")], step=100)
  np.testing.assert_allclose(total, [1.25, 0.0])
  assert set(parts) == {"math", "format", "strict_format"}


@pytest.mark.parametrize("spec, match", [
    ({"maths": {"weight": 1.0}}, r"unknown reward 'maths'.*valid rewards: .*math"),
    ({"math": {"weight": 1.0, "tol": 1}}, r"reward 'math': unknown option 'tol'; valid options"),
    ({"overlong": {"max_len": 10}}, r"reward 'overlong'.*cache"),
    ({"math": {"weight": "high"}}, r"reward 'math': weight must be"),
    ({}, "empty"),
])
def test_build_reward_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    rewards.build_reward(spec)
