"""The bundled equations task (data/tasks/equations.py): generation, expert steps checked by
an independent evaluator, the solution format, the step check, rewards and task specs."""

import ast
import operator
import re
from fractions import Fraction

import pytest

from wakea_jax.data import sources, trajectories
from wakea_jax.data.tasks import PROMPT_TASKS, TASK_LABELS, TASKS
from wakea_jax.data.tasks import equations as task
from wakea_jax.rl.rewards import math_reward
from wakea_jax.rl.samples import Sample

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _value(expression: str, x: int) -> Fraction:
  """The value of a rendered expression at `x`, computed without the module's parser: insert
  the implicit '*', substitute x, and fold Python's own AST of the result over Fractions."""
  text = re.sub(r"(\d|\))\s*(?=[x(])", r"\1*", expression.strip())
  text = text.replace("x", f"({x})")

  def fold(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
      return fold(node.body)
    if isinstance(node, ast.BinOp):
      return _OPS[type(node.op)](fold(node.left), fold(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
      return -fold(node.operand) if isinstance(node.op, ast.USub) else fold(node.operand)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
      return Fraction(node.value)
    raise AssertionError(f"unexpected {ast.dump(node)} in {expression!r}")

  return fold(ast.parse(text, mode="eval"))


def _holds(equation: str, x: int) -> bool:
  left, right = equation.split("=")
  return _value(left, x) == _value(right, x)


def test_expert_steps_are_valid_independently():
  for level in range(1, task.MAX_LEVEL + 1):
    for p in task.problems(40, 1, level=level) + task.problems(10, 1, split=1, level=level):
      assert p.level == level == len(p.steps), p
      assert p.steps[-1][1] == f"x = {p.answer}"
      # Each equation holds at the answer and not at answer + 1: a linear equation true at
      # exactly one point has the solution set {answer}, so every step is equivalent.
      for equation in (p.text, *(action for _, action in p.steps)):
        assert _holds(equation, p.answer) and not _holds(equation, p.answer + 1), (p, equation)
        assert max(map(int, re.findall(r"\d+", equation))) <= task.MAX_NUMBER
      assert all(reason and "\n" not in action for reason, action in p.steps)
      previous = p.text
      for _, action in p.steps:          # the module's own check agrees
        assert task.check_step(previous, action), (previous, action)
        previous = action


def test_deterministic_distinct_and_mixed():
  a = task.problems(60, 3)
  assert a == task.problems(60, 3) and a != task.problems(60, 4)
  assert task.problems(30, 3) == a[:30]
  # Pinned: a change to the generator changes every dataset, so it must be deliberate (and
  # `random.Random` seeded with a string draws the same on every platform).
  assert [p.text for p in task.problems(3, 0)] == ["x/3 = -10", "-9x - 6 = 84",
                                                   "9x + 5 = -x + 5"]
  assert len({p.text for p in a}) == len(a)
  assert [p.level for p in a[:12]] == [1, 2, 3, 4, 5, 6] * 2
  hard = task.problems(9, 0, min_level=4)
  assert [p.level for p in hard] == [4, 5, 6] * 3
  assert {p.level for p in task.problems(10, 0, level=5)} == {5}
  assert task.labels(4, 0, min_level=3) == [
      {"category": "level3", "difficulty": "medium"}, {"category": "level4", "difficulty": "hard"},
      {"category": "level5", "difficulty": "hard"}, {"category": "level6", "difficulty": "hard"}]
  # One draw per call backs every view, so records, prompts and labels align.
  n = 12
  records, prompts = task.generate(n, 5, split=1), task.prompts(n, 5, split=1)
  trajectories = task.trajectories(n, 5, split=1)
  for record, prompt, trajectory, label in zip(records, prompts, trajectories,
                                               task.labels(n, 5, split=1), strict=True):
    assert record["messages"][:2] == prompt["messages"]
    assert prompt["messages"][1]["content"] == trajectory["problem"]
    assert label["category"] == f"level{trajectory['meta']['level']}"
  for bad in ({"split": 2}, {"level": 7}, {"min_level": 5, "max_level": 4}):
    with pytest.raises(ValueError, match="equations: option"):
      task.problems(1, **bad)


def test_splits_are_disjoint():
  train = {p.text for p in task.problems(600, 0)} | {p.text for p in task.problems(300, 1)}
  held = {p.text for p in task.problems(300, 0, split=1)} | {
      p.text for p in task.problems(300, 9, split=1, min_level=4)}
  assert len(held) > 500 and not train & held
  assert not any(task.held_out(t) for t in train) and all(task.held_out(t) for t in held)
  # Worked examples (the retriever's corpus) come from train, not from the SFT stream.
  examples = task.worked_examples(6, 0)
  assert examples[0].startswith(task.PROMPT_PREFIX) and "Step 1:" in examples[0]
  assert not {e.splitlines()[0].removeprefix(task.PROMPT_PREFIX) for e in examples} & held
  assert len(task.RULES) >= 12


def test_render_and_parse_round_trip():
  p = task.problems(1, 0, level=4)[0]
  actions = [action for _, action in p.steps]
  text = task.render_solution(p.steps, p.answer)
  assert text.splitlines()[:2] == [f"<think>{p.steps[0][0]}</think>", f"Step 1: {actions[0]}"]
  assert text.endswith(f"\n<answer>{p.answer}</answer>")
  assert task.parse_steps(text) == actions
  bare = task.render_solution(p.steps, p.answer, with_reasoning=False)
  assert "<think>" not in bare and task.parse_steps(bare) == actions
  record = task.trajectories(1, 0, level=4)[0]
  assert task.render_solution(record["steps"], record["answer"]) == text
  assert record["meta"] == {"level": 4, "task": "equations"}
  assert TASKS["equations"](1, 0, level=4)[0]["messages"][2]["content"] == text
  # Tolerant: no think blocks, odd spacing, a Step line inside a monologue is not an action.
  messy = "<think>maybe Step 9: x = 0</think>Step 1:  2x = 4 \nstep 2: x=2\nStep 3: x = 2<answer>2"
  assert task.parse_steps(messy) == ["2x = 4", "x=2", "x = 2"]
  assert task.parse_steps("Misstep 1: x = 1\nno steps") == []


def test_trajectories_validate_as_trajectory_records():
  for i, record in enumerate(task.trajectories(12, 0)):
    trajectory = trajectories.to_trajectory(record, f"equations[{i}]")
    assert trajectories.solution_text(trajectory) == task.render_solution(
        record["steps"], record["answer"])


def test_check_step_and_parser():
  assert task.check_step("3(x + 4) - 5 = 2x + 9", "3x + 12 - 5 = 2x + 9")
  assert task.check_step("x + 7 = 9", "x = 2") and task.check_step("(x + 1)/3 = 2", "x = 5")
  assert not task.check_step("x + 7 = 9", "x = 3")            # a wrong step
  assert not task.check_step("3(x + 4) = 15", "3x + 4 = 15")   # a wrong expansion
  assert task.check_step("2x = 2x", "0 = 0") and not task.check_step("x = 1", "0 = 0")
  for garbage in ("x + = 3", "x = ", "x^2 = 4", "x*x = 4", "x = 1 = 1", "2(x + 1 = 4",
                  "x/0 = 1", "2/x = 1", "(" * 300 + "x = 1", "x3 = 6", "2 1 = x"):
    assert not task.check_step("x = 2", garbage), garbage
  # The parser agrees with the independent evaluator on every construct it accepts.
  for expression in ("3(x + 4) - 5", "-2(x - 3) + 4x", "(4(x + 4) + 12)/2", "x/3 - -2",
                     "2 * 3x - (x - 1)", "-x + 25", "+x - 3(2)", "(x + 1)(2) - 4"):
    a, b = task.parse_equation(f"{expression} = 0")
    for x in (-3, 0, 7):
      assert a * x + b == _value(expression, x), expression


def test_first_error_rejects_a_wrong_step_with_a_right_answer():
  p = task.problems(1, 2, level=3)[0]
  good = task.render_solution(p.steps, p.answer)
  assert task.first_error(task.PROMPT_PREFIX + p.text, good) is None
  steps = list(p.steps)
  steps[1] = (steps[1][0], steps[1][1].replace("=", "= 1 +"))
  error = task.first_error(p.text, task.render_solution(steps, p.answer))
  assert error is not None and error.startswith("step 2:")
  assert "answer" in task.first_error(p.text, task.render_solution(p.steps, p.answer + 1))
  assert task.first_error(p.text, "<answer>3</answer>") == "no 'Step k:' lines"


def test_math_reward_scores_rendered_solutions():
  reward = math_reward()
  records = task.prompts(6, 0)
  samples = []
  for record, p in zip(records, task.problems(6, 0), strict=True):
    assert isinstance(record["answer"], int) and record["messages"][0]["content"] == task.SYSTEM
    samples.append(Sample(prompt="", completion=task.render_solution(p.steps, p.answer),
                          answer=record["answer"]))
    samples.append(Sample(prompt="", completion=task.render_solution(p.steps, p.answer + 1),
                          answer=record["answer"]))
  assert reward(samples).tolist() == [1.0, 0.0] * 6


def test_task_spec_options():
  name, n, seed, options = sources.parse_task_spec(
      "task:equations?n=20&seed=3&split=1&level=4&reasoning=0")
  assert (name, n, seed) == ("equations", 20, 3)
  assert options == {"split": 1, "level": 4, "min_level": 1, "max_level": 6, "reasoning": 0}
  source = sources.load_task("task:equations?n=5&split=1&level=4&reasoning=0")
  assert len(source.records) == 5
  assert "<think>" not in sources.load_task(
      "task:equations?n=2&reasoning=0").records[0]["messages"][-1]["content"]
  _, _, _, prompt_options = sources.parse_task_spec("task:equations?min_level=4",
                                                    tasks=PROMPT_TASKS)
  assert PROMPT_TASKS["equations"](3, 0, **prompt_options)[0]["answer"] == \
      task.problems(1, 0, min_level=4)[0].answer
  assert TASK_LABELS["equations"](2, 0, **options)[0]["difficulty"] == "hard"
  with pytest.raises(ValueError, match="unknown parameter"):
    sources.parse_task_spec("task:equations?levels=3")
