"""Rewards for search-augmented RL (issue 15): R-Search query DAGs and Search-R1.

Registered in rewards.REWARDS, so a config names them like any other reward:

  reward = {"rsearch": {"weight": 1.0, "curriculum_steps": 50}}           # R-Search
  reward = {"search_r1_em": {"weight": 1.0}, "search_r1_format": {"weight": 0.2}}  # Search-R1

R-Search components (each also usable on its own):
  dag_validity     1 when the model wrote at least one `<search>` block and every block parses
                   and validates (toolbox/search_dag.py); else 0, with the reason kept.
  dag_format       1 when the trajectory is `<search>` block(s), then one non-empty
                   `<answer>...</answer>`, then nothing.
  answer_accuracy  the LLM judge's score/10 when a judge is configured, else token F1 (or exact
                   match) with SQuAD normalisation, of the last `<answer>` against the reference.
  rsearch          0.5 accuracy + 0.25 validity + 0.25 format; for steps < curriculum_steps the
                   format-first curriculum 0.2 / 0.4 / 0.4. It takes the training step
                   (`takes_step`), and reports its components and, per reason code, the
                   fraction of samples whose DAG failed with it (rewards.CompositeReward puts
                   them under "rsearch/...": reward/rsearch/invalid/cycle_mean, ...).

Search-R1 (arXiv 2503.09516): `search_r1_em` is the paper's outcome reward, SQuAD exact match of
the last `<answer>`; `search_r1_format` is the optional format reward (the tag grammar below).
Tags are configurable (the Technical Features seed uses <context> for <information>).

Everything is read from the model's own text: injected `<r>` / `<information>` blocks and tool
responses are removed first, so a passage that contains "<answer>" earns nothing. This module
imports no other reward module (rewards.py imports it to register these).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from wakea_jax.rl import judge as judge_lib
from wakea_jax.rl.answers import squad_normalize, without_tool_responses
from wakea_jax.rl.samples import Sample
from wakea_jax.toolbox import search_dag

RewardFn = Callable[[Sequence[Sample]], np.ndarray]
DEFAULT_SOURCES = ("Local", "BM25", "Web", "News")
RSEARCH_WEIGHTS = (0.5, 0.25, 0.25)              # accuracy, validity, format
RSEARCH_CURRICULUM_WEIGHTS = (0.2, 0.4, 0.4)

# Failures on model output, per reward name (these rewards are written not to raise; this is
# the backstop, as rewards.FAILURES is for the others).
FAILURES: collections.Counter[str] = collections.Counter()

# Chat markup a rollout may leave in the completion ("<|im_end|>", "<|im_start|>assistant").
_MARKUP = re.compile(r"<\|im_start\|>[A-Za-z_]*\n?|<\|[A-Za-z_]{1,40}\|>")


def _per_sample(name: str, samples: Sequence[Sample], score: Callable[[Sample], float]
                ) -> np.ndarray:
  out = np.zeros(len(samples), np.float32)
  for i, sample in enumerate(samples):
    try:
      out[i] = score(sample)
    except Exception as e:  # noqa: BLE001  (model output must never crash the batch)
      if not FAILURES[name]:
        logging.warning("reward %r failed on a completion (scored 0; further failures are "
                        "only counted in search_rewards.FAILURES): %s: %s", name,
                        type(e).__name__, str(e)[:200])
      FAILURES[name] += 1
  return out


def _accepted(answer: Any) -> list[Any]:
  return list(answer) if isinstance(answer, (list, tuple)) else [answer]


def model_text(sample: Sample) -> str:
  """The whole completion as the model wrote it: tool responses, injected `<r>` blocks and
  chat markup removed."""
  return _MARKUP.sub("", search_dag.strip_results(without_tool_responses(sample.completion)))


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD v1.1 token F1 of the normalised strings (1.0 when both are empty)."""
  pred, gold = squad_normalize(prediction).split(), squad_normalize(reference).split()
  if not pred or not gold:
    return float(pred == gold)
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
  """1.0 when the SQuAD-normalised strings are equal."""
  return float(squad_normalize(prediction) == squad_normalize(reference))


# ------------------------------------------------------------------------------------------
# R-Search
# ------------------------------------------------------------------------------------------

class DagValidityReward:
  """RewardFn: 1.0 for a trajectory whose search blocks are all valid DAGs, else 0.0.

  `reasons(samples)` gives each sample's reason code (None when valid); `counters` counts
  them over the run, as LLMJudge.counters counts judge failures.
  """

  def __init__(self, sources: Sequence[str] = DEFAULT_SOURCES,
               caps: search_dag.DAGCaps = search_dag.DAGCaps()) -> None:
    if isinstance(sources, str) or not sources:
      raise ValueError(f"dag_validity: sources must be a non-empty list of names, got "
                       f"{sources!r}")
    self.sources, self.caps = tuple(sources), caps
    self.counters: collections.Counter[str] = collections.Counter()

  def reason(self, sample: Sample) -> str | None:
    """The reason code of the sample's first invalid block, or None."""
    error = search_dag.trajectory_error(model_text(sample), self.sources, self.caps)
    return None if error is None else error.reason

  def reasons(self, samples: Sequence[Sample]) -> list[str | None]:
    """Each sample's reason code (None when valid), counted in `counters`."""
    out = []
    for sample in samples:
      try:
        reason = self.reason(sample)
      except Exception:  # noqa: BLE001  (never raises on model text; the backstop)
        FAILURES["dag_validity"] += 1
        reason = "unexpected_text"
      self.counters[reason or "valid"] += 1
      out.append(reason)
    return out

  def __call__(self, samples: Sequence[Sample]) -> np.ndarray:
    """1.0 / 0.0 per sample (valid / not)."""
    return np.asarray([r is None for r in self.reasons(samples)], np.float32)


def dag_validity_reward(*, sources: Sequence[str] = DEFAULT_SOURCES, max_nodes: int = 8,
                        max_edges: int = 16, max_query_chars: int = 200) -> DagValidityReward:
  """The "dag_validity" reward factory: source names and DAGCaps fields."""
  return DagValidityReward(sources, search_dag.DAGCaps(max_nodes, max_edges, max_query_chars))


def _answer_span(text: str, open_tag: str, close_tag: str) -> tuple[int, int] | None:
  """(start of the only open tag, end of the only close tag) when each occurs exactly once,
  in that order, around non-blank text; else None."""
  if text.count(open_tag) != 1 or text.count(close_tag) != 1:
    return None
  start, end = text.find(open_tag), text.find(close_tag)
  if end < start or not text[start + len(open_tag):end].strip():
    return None
  return start, end + len(close_tag)


def dag_format_score(text: str, min_searches: int = 1) -> float:
  """1.0 when the model's text (see `model_text`) has at least `min_searches` closed, unnested
  `<search>` blocks, all before one non-empty `<answer>...</answer>`, and nothing after it."""
  blocks = search_dag.search_blocks(text)
  if isinstance(blocks, search_dag.DAGError):
    return float(min_searches == 0 and "<search>" not in text and "</search>" not in text
                 and _answer_ok(text))
  if len(blocks) < min_searches or text.count("</search>") != len(blocks) or any(
      block.count("<search>") != 1 for block in blocks):
    return 0.0
  span = _answer_span(text, "<answer>", "</answer>")
  if span is None or text.rfind("</search>") > span[0] or text[span[1]:].strip():
    return 0.0
  return 1.0


def _answer_ok(text: str) -> bool:
  span = _answer_span(text, "<answer>", "</answer>")
  return span is not None and not text[span[1]:].strip()


def dag_format_reward(*, min_searches: int = 1) -> RewardFn:
  """The "dag_format" reward factory (see dag_format_score)."""
  if min_searches < 0:
    raise ValueError(f"dag_format: min_searches must be >= 0, got {min_searches}")
  return lambda samples: _per_sample(
      "dag_format", samples, lambda s: dag_format_score(model_text(s), min_searches))


def final_answer(sample: Sample, open_tag: str = "<answer>", close_tag: str = "</answer>",
                 injected: re.Pattern[str] | None = None) -> str | None:
  """The content of the last complete answer tag pair in the model's last turn, with `<r>`
  blocks (and what `injected` matches) removed first; None when there is none."""
  text = search_dag.strip_results(sample.final)
  if injected is not None:
    text = injected.sub("", text)
  end = text.rfind(close_tag)
  start = text.rfind(open_tag, 0, max(end, 0))
  return text[start + len(open_tag):end].strip() if 0 <= start < end else None


class AnswerAccuracyReward:
  """RewardFn: the judge's score/10 on the extracted answer when a judge is configured, else
  the best token F1 (metric="f1") or exact match ("em") over the accepted answers. A sample
  without an `<answer>` scores 0 and is not sent to the judge."""

  def __init__(self, judge: judge_lib.LLMJudge | None = None, metric: str = "f1") -> None:
    if metric not in ("f1", "em"):
      raise ValueError(f"answer_accuracy: metric must be 'f1' or 'em', got {metric!r}")
    self.judge, self.metric = judge, metric

  def __call__(self, samples: Sequence[Sample]) -> np.ndarray:
    """Scores in [0, 1] per sample."""
    answers = [final_answer(s) for s in samples]
    if self.judge is not None:
      out = np.zeros(len(samples), np.float32)
      asked = [i for i, a in enumerate(answers) if a]
      if asked:
        # The judge reads `final`: here the extracted answer alone.
        out[asked] = self.judge([Sample(samples[i].prompt, answers[i], samples[i].answer,
                                        final_text=answers[i]) for i in asked])
      return out
    compare = token_f1 if self.metric == "f1" else exact_match
    for i, s in enumerate(samples):
      if s.answer is None:
        raise ValueError(f"sample {i}: the 'answer_accuracy' reward needs an answer (or a "
                         "judge), got None")
    return _per_sample("answer_accuracy", samples, lambda s: 0.0 if not (a := final_answer(s))
                       else max(compare(a, str(ref)) for ref in _accepted(s.answer)))


def answer_accuracy_reward(*, judge: Mapping[str, Any] | None = None,
                           metric: str = "f1") -> AnswerAccuracyReward:
  """The "answer_accuracy" reward factory. `judge`: None (EM/F1 by `metric`) or the
  judge_reward options, e.g. {"url": "http://localhost:8000/v1", "model": "qwen"}."""
  if judge is None:
    return AnswerAccuracyReward(None, metric)
  options = judge.to_dict() if hasattr(judge, "to_dict") else dict(judge)
  missing = [f for f in ("url", "model") if not options.get(f)]
  if missing:
    raise ValueError(f"answer_accuracy: judge needs {' and '.join(missing)}; got "
                     f"{sorted(options)}")
  return AnswerAccuracyReward(judge_lib.judge_reward(**options), metric)


class RSearchReward:
  """accuracy / validity / format weighted by `weights`, or by `curriculum_weights` while
  step < curriculum_steps; returns (total [n], components) like rewards.CompositeReward."""

  takes_step = True   # rewards.CompositeReward passes the step and reports the components

  def __init__(self, accuracy: RewardFn, validity: DagValidityReward, format_fn: RewardFn, *,
               weights: Sequence[float] = RSEARCH_WEIGHTS,
               curriculum_weights: Sequence[float] = RSEARCH_CURRICULUM_WEIGHTS,
               curriculum_steps: int = 0) -> None:
    for name, value in (("weights", weights), ("curriculum_weights", curriculum_weights)):
      if len(value) != 3:
        raise ValueError(f"rsearch: {name} must be (accuracy, validity, format), got {value!r}")
    if curriculum_steps < 0:
      raise ValueError(f"rsearch: curriculum_steps must be >= 0, got {curriculum_steps}")
    self.accuracy, self.validity, self.format = accuracy, validity, format_fn
    self.weights_after = tuple(float(w) for w in weights)
    self.curriculum_weights = tuple(float(w) for w in curriculum_weights)
    self.curriculum_steps = curriculum_steps

  def weights(self, step: float = 0) -> dict[str, float]:
    """The (accuracy, validity, format) weights at `step`."""
    values = (self.curriculum_weights if step < self.curriculum_steps else self.weights_after)
    return dict(zip(("accuracy", "validity", "format"), values))

  def __call__(self, samples: Sequence[Sample], step: float = 0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(weighted total [n], components [n] each: accuracy, validity, format, search_blocks,
    and invalid/<reason> for every reason code)."""
    n = len(samples)
    reasons = self.validity.reasons(samples)
    parts = {"accuracy": np.asarray(self.accuracy(samples), np.float32).reshape(n),
             "validity": np.asarray([r is None for r in reasons], np.float32),
             "format": np.asarray(self.format(samples), np.float32).reshape(n)}
    total = np.zeros(n, np.float32)
    for name, weight in self.weights(step).items():
      total += np.float32(weight) * parts[name]
    texts = [model_text(s) for s in samples]
    parts["search_blocks"] = np.asarray([t.count("<search>") for t in texts], np.float32)
    # Every reason code, every step: a constant set of keys (rounds and hosts are merged by key).
    for code in search_dag.REASONS:
      parts[f"invalid/{code}"] = np.asarray([r == code for r in reasons], np.float32)
    return total, parts


def rsearch_reward(*, curriculum_steps: int = 0, weights: Sequence[float] = RSEARCH_WEIGHTS,
                   curriculum_weights: Sequence[float] = RSEARCH_CURRICULUM_WEIGHTS,
                   judge: Mapping[str, Any] | None = None, metric: str = "f1",
                   sources: Sequence[str] = DEFAULT_SOURCES, max_nodes: int = 8,
                   max_edges: int = 16, max_query_chars: int = 200,
                   min_searches: int = 1) -> RSearchReward:
  """The "rsearch" reward factory: the three components' options plus the weights."""
  return RSearchReward(answer_accuracy_reward(judge=judge, metric=metric),
                       dag_validity_reward(sources=sources, max_nodes=max_nodes,
                                           max_edges=max_edges, max_query_chars=max_query_chars),
                       dag_format_reward(min_searches=min_searches), weights=weights,
                       curriculum_weights=curriculum_weights, curriculum_steps=curriculum_steps)


# ------------------------------------------------------------------------------------------
# Search-R1
# ------------------------------------------------------------------------------------------

def _tags(name: str) -> tuple[str, str]:
  if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
    raise ValueError(f"search_r1: a tag name must be an identifier like 'information', got "
                     f"{name!r}")
  return f"<{name}>", f"</{name}>"


def search_r1_format_score(text: str, search: str = "search", information: str = "information",
                           answer: str = "answer", information_required: bool = True) -> float:
  """1.0 when `text` (markup and tool responses removed) follows Search-R1's turn grammar:
  (<search>q</search> <information>...</information>)* <answer>a</answer>, then nothing, with
  q and a non-empty; reasoning text (and <think>) may come between the tags. The inside of an
  information block is the retriever's and is not read. With not `information_required`, a
  search need not be followed by an information block (results injected elsewhere)."""
  (s_open, s_close), (i_open, i_close), (a_open, a_close) = (
      _tags(search), _tags(information), _tags(answer))
  tag = re.compile("|".join(re.escape(t) for t in (s_open, s_close, i_open, i_close, a_open,
                                                   a_close)))
  state, pos, start = "idle", 0, 0    # idle: may search or answer
  while (match := tag.search(text, pos)) is not None:
    found, pos = match.group(0), match.end()
    if state in ("idle", "searched") and found == s_open and (
        state == "idle" or not information_required):
      state, start = "search", pos
    elif state in ("idle", "searched") and found == a_open and (
        state == "idle" or not information_required):
      state, start = "answer", pos
    elif state == "search" and found == s_close and text[start:match.start()].strip():
      state = "searched"
    elif state == "searched" and found == i_open:
      end = text.find(i_close, pos)
      if end < 0:
        return 0.0
      state, pos = "idle", end + len(i_close)
    elif state == "answer" and found == a_close and text[start:match.start()].strip():
      return float(not text[pos:].strip())
    else:
      return 0.0
  return 0.0


def search_r1_format_reward(*, search_tag: str = "search",
                            information_tag: str = "information", answer_tag: str = "answer",
                            information_required: bool = True) -> RewardFn:
  """The "search_r1_format" reward factory (see search_r1_format_score), on the whole
  completion with tool responses and chat markup removed."""
  for name in (search_tag, information_tag, answer_tag):
    _tags(name)
  return lambda samples: _per_sample(
      "search_r1_format", samples, lambda s: search_r1_format_score(
          _MARKUP.sub("", without_tool_responses(s.completion)), search_tag, information_tag,
          answer_tag, information_required))


def search_r1_em_reward(*, answer_tag: str = "answer",
                        information_tag: str = "information") -> RewardFn:
  """The "search_r1_em" reward factory: 1.0 when the last `<answer>` of the final turn,
  injected `<information>` blocks removed, SQuAD-exactly matches an accepted answer."""
  a_open, a_close = _tags(answer_tag)
  i_open, i_close = _tags(information_tag)
  injected = re.compile(re.escape(i_open) + ".*?" + re.escape(i_close), re.DOTALL)

  def reward(samples: Sequence[Sample]) -> np.ndarray:
    for i, s in enumerate(samples):
      if s.answer is None:
        raise ValueError(f"sample {i}: the 'search_r1_em' reward needs an answer, got None")

    def score(s: Sample) -> float:
      candidate = final_answer(s, a_open, a_close, injected)
      return 0.0 if candidate is None else max(exact_match(candidate, str(ref))
                                               for ref in _accepted(s.answer))
    return _per_sample("search_r1_em", samples, score)
  return reward


# name -> factory; rewards.REWARDS includes these.
SEARCH_REWARDS: dict[str, Callable[..., Any]] = {
    "dag_validity": dag_validity_reward,
    "dag_format": dag_format_reward,
    "answer_accuracy": answer_accuracy_reward,
    "rsearch": rsearch_reward,
    "search_r1_em": search_r1_em_reward,
    "search_r1_format": search_r1_format_reward,
}
