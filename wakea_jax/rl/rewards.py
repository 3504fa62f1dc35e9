"""Host-side rewards: what a completion earns, computed batched between jitted RL stages.

A reward function maps a batch of `Sample`s to float32 [n]. `REWARDS` names their factories;
`build_reward(spec)` turns a config mapping {name: {"weight": w, **options}} into a
`CompositeReward`, whose weights may follow a piecewise-linear schedule in the training step.

Answers are read from the model's *last assistant turn* only (`Sample.final`): text that
appears inside a tool response is the tool's, not the model's, and must not earn credit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from wakea_jax.rl import judge as judge_lib
from wakea_jax.rl.answers import (  # re-exported: the rewards' public parsing helpers
  extract_answer,
  math_equal,
  squad_normalize,
  without_tool_responses,
)
from wakea_jax.rl.samples import Sample
from wakea_jax.rl.search_rewards import SEARCH_REWARDS
from wakea_jax.rl.srl import srl_similarity_reward
from wakea_jax.toolbox import sandbox

RewardFn = Callable[[Sequence[Sample]], np.ndarray]
Schedule = Sequence[tuple[float, float]]

def _accepted(answer: Any) -> list[Any]:
  return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def _require_answer(sample: Sample, index: int, reward: str) -> None:
  if sample.answer is None:
    raise ValueError(f"sample {index}: the {reward!r} reward needs an answer, got None")


# Failures on model output, per reward name: a reward never raises for what a model wrote
# (one bad completion must not cost the whole batch), it scores 0 and is counted here.
FAILURES: collections.Counter[str] = collections.Counter()


def _guarded(reward: str, score: Callable[[], float]) -> float:
  """score(), or 0.0 (logged once per reward, counted in FAILURES) when it raises."""
  try:
    return score()
  except Exception as e:  # noqa: BLE001  (model output must never crash the batch)
    if not FAILURES[reward]:
      logging.warning("reward %r failed on a completion (scored 0; further failures are only "
                      "counted in rewards.FAILURES): %s: %s", reward, type(e).__name__,
                      str(e)[:200])
    FAILURES[reward] += 1
    return 0.0


# ------------------------------------------------------------------------------------------
# Reward factories
# ------------------------------------------------------------------------------------------

def math_reward(*, fallback: str | None = "last_number", timeout_s: float = 2.0) -> RewardFn:
  """1.0 when the final response's extracted answer is math_equal to the reference."""
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      _require_answer(s, i, "math")
      out[i] = _guarded("math", lambda s=s: float(math_equal(
          extract_answer(s.final, fallback=fallback), s.answer,
          timeout_s=timeout_s)))
    return out
  return reward


def exact_match_reward(*, whole_response: bool = False,
                       fallback: str | None = None) -> RewardFn:
  """SQuAD-normalised exact match against any accepted answer.

  The candidate is the final response's extracted answer (<answer>, \\boxed, or with
  fallback="last_number" / "last_word" the last number / word), or the whole final response
  when nothing was extracted or `whole_response` is set.
  """
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    def score(s: Sample) -> float:
      text = s.final
      candidate = None if whole_response else extract_answer(text, fallback=fallback)
      candidate = squad_normalize(text if candidate is None else candidate)
      return float(any(candidate == squad_normalize(a) for a in _accepted(s.answer)))

    for i, s in enumerate(samples):
      _require_answer(s, i, "exact_match")
      out[i] = _guarded("exact_match", lambda s=s: score(s))
    return out
  return reward


def _in_order(text: str, tags: Sequence[str]) -> int:
  """How many of `tags` occur in order (greedy: a missing tag is skipped)."""
  pos, found = 0, 0
  for tag in tags:
    at = text.find(tag, pos)
    if at >= 0:
      found, pos = found + 1, at + len(tag)
  return found


def format_reward(*, tags: Sequence[str] = ("<think>", "</think>", "<answer>", "</answer>"),
                  partial: bool = False, scope: str = "final") -> RewardFn:
  """1.0 when every tag occurs, in order; with `partial`, the fraction found in order.

  scope="final" checks the last assistant turn; "completion" the whole completion with tool
  responses removed (reasoning before a tool call then counts).
  """
  tags = tuple(tags)
  if not tags:
    raise ValueError("format reward: tags is empty")
  if scope not in ("final", "completion"):
    raise ValueError(f"format reward: scope must be 'final' or 'completion', got {scope!r}")

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    def score(s: Sample) -> float:
      text = (s.final if scope == "final"
              else without_tool_responses(s.completion))
      found = _in_order(text, tags)
      return found / len(tags) if partial else float(found == len(tags))

    for i, s in enumerate(samples):
      out[i] = _guarded("format", lambda s=s: score(s))
    return out
  return reward


_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Appended to the candidate code: each test runs in its own try, and reports with a per-run
# nonce so that ordinary prints cannot pass for results. Code that reads its own source could
# still forge them: the sandbox bounds harm, it does not make a hostile verifier-proof harness.
_TEST_HARNESS = """

def __wakea_run_tests(tests, marker):
  import sys
  for index, test in enumerate(tests):
    try:
      exec(compile(test, f"<test {index}>", "exec"), globals())
      ok = True
    except BaseException:
      ok = False
    sys.stdout.write(f"\\n{marker}{index}:{'pass' if ok else 'fail'}\\n")
    sys.stdout.flush()

__wakea_run_tests(%r, %r)
"""


def extract_code(text: str) -> str | None:
  """The last ```python (or ```py) fenced block, else the last unlabelled one, else None."""
  blocks = [(lang, body) for lang, body in _FENCE.findall(text)]
  labelled = [body for lang, body in blocks if lang]
  if labelled:
    return labelled[-1]
  return blocks[-1][1] if blocks else None


def _code_score(code: str | None, tests: Sequence[str], config: sandbox.SandboxConfig,
                all_or_nothing: bool) -> float:
  return _guarded("code", lambda: _run_tests(code, tests, config, all_or_nothing))


def _run_tests(code: str | None, tests: Sequence[str], config: sandbox.SandboxConfig,
               all_or_nothing: bool) -> float:
  if code is None:
    return 0.0
  marker = f"@@wakea-test-{secrets.token_hex(8)}@@"
  result = sandbox.run_code(code + _TEST_HARNESS % (list(tests), marker), config)
  if not result.ok:  # crash, timeout or any other limit: nothing is trusted
    return 0.0
  passed = set(re.findall(rf"^{re.escape(marker)}(\d+):pass$", result.stdout, re.MULTILINE))
  fraction = len(passed) / len(tests)
  return float(fraction == 1.0) if all_or_nothing else fraction


def code_reward(*, timeout_s: float = 10.0, memory_mb: int = 512, all_or_nothing: bool = False,
                workers: int = 4) -> RewardFn:
  """Runs the final response's last ```python block then meta["tests"] (assert strings) in one
  sandbox process per sample; reward = fraction of tests passed (or 1/0 with all_or_nothing).
  A crash or timeout of the process gives 0."""
  config = sandbox.SandboxConfig(cpu_s=max(1, math.ceil(timeout_s)), wall_s=float(timeout_s),
                                 memory_mb=memory_mb)

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    jobs = []
    for i, s in enumerate(samples):
      tests = s.meta.get("tests")
      if not tests or isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"sample {i}: the 'code' reward needs meta['tests'], a non-empty list "
                         f"of assert strings, got {tests!r}")
      jobs.append((extract_code(s.final), list(tests)))
    # Sandboxes are separate processes: threads only wait on them.
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      scores = pool.map(lambda job: _code_score(*job, config, all_or_nothing), jobs)
      return np.asarray(list(scores), np.float32).reshape(len(samples))
  return reward


def tool_use_reward(*, require_call: bool = True, error_penalty: float | None = None) -> RewardFn:
  """1.0 for a completion that called a tool (unless not `require_call`) without tool errors.

  error_penalty=None: any tool error gives 0. A float p: 1 - p * tool_errors instead (may be
  negative), for a softer signal.
  """
  def reward(samples: Sequence[Sample]) -> np.ndarray:
    out = np.zeros(len(samples), np.float32)
    for i, s in enumerate(samples):
      base = 1.0 if (s.num_tool_calls >= 1 or not require_call) else 0.0
      if error_penalty is None:
        out[i] = base if s.tool_errors == 0 else 0.0
      else:
        out[i] = base - error_penalty * s.tool_errors if base else 0.0
    return out
  return reward


def overlong_reward(*, max_len: int, cache: int) -> RewardFn:
  """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13), on `Sample.num_tokens` = L:
  0 for L <= max_len - cache, (max_len - cache - L) / cache up to max_len, -1 beyond."""
  if not 0 < cache <= max_len:
    raise ValueError(f"overlong reward: need 0 < cache <= max_len, got cache={cache}, "
                     f"max_len={max_len}")

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    length = np.asarray([s.num_tokens for s in samples], np.float32).reshape(len(samples))
    soft = (max_len - cache - length) / cache
    return np.where(length <= max_len - cache, 0.0,
                    np.where(length <= max_len, soft, -1.0)).astype(np.float32)
  return reward


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
    "code": code_reward,
    "tool_use": tool_use_reward,
    "overlong": overlong_reward,
    "length_penalty": overlong_reward,
    "judge": judge_lib.judge_reward,
    "srl_similarity": srl_similarity_reward,   # SRL's step reward, arXiv 2510.25992
    # dag_validity, dag_format, answer_accuracy, rsearch, search_r1_em, search_r1_format
    **SEARCH_REWARDS,
}


# ------------------------------------------------------------------------------------------
# Weighted sums
# ------------------------------------------------------------------------------------------

def _check_schedule(name: str, weight: Any) -> float | tuple[tuple[float, float], ...]:
  if isinstance(weight, (int, float)) and not isinstance(weight, bool):
    return float(weight)
  try:
    points = tuple((float(step), float(w)) for step, w in weight)
  except (TypeError, ValueError):
    raise ValueError(f"reward {name!r}: weight must be a number or ((step, weight), ...), "
                     f"got {weight!r}") from None
  steps = [p[0] for p in points]
  if not points or any(b <= a for a, b in zip(steps, steps[1:])):
    raise ValueError(f"reward {name!r}: a weight schedule needs at least one point and "
                     f"strictly increasing steps, got {weight!r}")
  return points


def schedule_value(weight: float | Schedule, step: float) -> float:
  """A constant, or piecewise-linear in `step` through (step, weight) points and constant
  outside them."""
  if isinstance(weight, (int, float)):
    return float(weight)
  steps, values = zip(*weight)
  return float(np.interp(step, steps, values))


class CompositeReward:
  """Weighted sum of reward components; weights are constants or schedules in the step.

  A component with `takes_step` set (a CompositeReward, or search_rewards.RSearchReward with
  its curriculum) is called as fn(samples, step) -> (values, parts); its parts are reported
  as "name/part".
  """

  takes_step = True

  def __init__(self, components: Mapping[str, tuple[RewardFn, float | Schedule]]) -> None:
    if not components:
      raise ValueError("CompositeReward: no components")
    self.components = {name: (fn, _check_schedule(name, weight))
                       for name, (fn, weight) in components.items()}

  def weights(self, step: float = 0) -> dict[str, float]:
    """Each component's weight at `step`."""
    return {name: schedule_value(w, step) for name, (_, w) in self.components.items()}

  def __call__(self, samples: Sequence[Sample], step: float = 0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [n], raw value of each component [n])."""
    n = len(samples)
    total = np.zeros(n, np.float32)
    raw: dict[str, np.ndarray] = {}
    for name, (fn, weight) in self.components.items():
      parts: Mapping[str, Any] = {}
      if getattr(fn, "takes_step", False):
        values, parts = fn(samples, step)
      else:
        values = fn(samples)
      values = np.asarray(values, np.float32)
      if values.shape != (n,):
        raise ValueError(f"reward {name!r} returned shape {values.shape}, expected ({n},)")
      raw[name] = values
      for part, part_values in parts.items():
        raw[f"{name}/{part}"] = np.asarray(part_values, np.float32).reshape(n)
      w = schedule_value(weight, step)
      if w != 0.0:
        total += np.float32(w) * values
    return total, raw


def _option_names(factory: Callable[..., RewardFn]) -> list[str]:
  return [p.name for p in inspect.signature(factory).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_reward(spec: Mapping[str, Any]) -> CompositeReward:
  """{name: {"weight": float | ((step, w), ...), "type"?: registry name, **options}}.

  "type" lets one reward appear twice under different names (e.g. two format rewards);
  it defaults to the name.
  """
  if not spec:
    raise ValueError(f"reward spec is empty; valid rewards: {', '.join(sorted(REWARDS))}")
  components = {}
  for name, options in spec.items():
    options = dict(options or {})
    kind = options.pop("type", name)
    if kind not in REWARDS:
      raise ValueError(f"unknown reward {kind!r} (key {name!r}); valid rewards: "
                       f"{', '.join(sorted(REWARDS))}")
    weight = options.pop("weight", 1.0)
    valid = _option_names(REWARDS[kind])
    unknown = sorted(set(options) - set(valid))
    if unknown:
      raise ValueError(f"reward {name!r}: unknown option {unknown[0]!r}; valid options: "
                       f"{', '.join(['weight', 'type', *valid])}")
    try:
      fn = REWARDS[kind](**options)
    except TypeError as e:  # a missing required option
      raise ValueError(f"reward {name!r}: {e}; valid options: "
                       f"{', '.join(['weight', 'type', *valid])}") from None
    components[name] = (fn, weight)
  return CompositeReward(components)


def correctness_reward(name: str) -> RewardFn:
  """samples -> [n] raw values of the single reward `name` (e.g. "math"): what evaluation
  counts as correct (with a threshold of 0.5)."""
  composite = build_reward({name: {"weight": 1.0}})
  return lambda samples: composite(samples)[0]
