"""Off-policy traces for LUFFY (arXiv 2504.14945): a stronger model's solutions to the run's
prompts, which replace some members of a GRPO group (objectives/offpolicy.py is the loss).

Record schema (JSONL / JSON / Parquet files and `datasets` directories, read like every other
source, data/sources.py):

  {"prompt": str | [messages], "system"?: str,  or  "messages": [messages],
   "trace": str,                 the off-policy completion: the assistant's reply text
   "logprobs"?: [float, ...],    per-token log pi_phi of the trace under its model
   "reward"?: number,            its verifiable reward, if known
   "answer"?: any,               the reference its reward checks (else the run prompt's)
   ...}                          other fields travel to the rewards in `meta`, as for prompts

  {"prompt": "Solve 2x + 3 = 7.", "trace": "<think>..</think>\\n<answer>2</answer>",
   "reward": 1.0, "answer": "2"}

Each record is validated when loaded; an error names the location (`file:line`,
`file[INDEX]`, `DIR[SPLIT][ROW]`) and the field, e.g. `t.jsonl:3: field 'logprobs[4]' must
be a finite number <= 0, got 0.3`. With `on_error="skip_and_count"` a malformed record is
logged and counted instead (sources.validate_all).

Traces are keyed by their prompt (`trace_key`): the conversation without its system
messages, so a trace file written from the bare problems matches a run whose prompts add a
system prompt. The trace is tokenised later with the *run's* prompt rendering, never with a
system prompt of the file's. `logprobs`, when given, must have one entry per token of the
trace under the run's tokenizer (`check_logprobs`); without them the loss takes pi_phi = 1,
as the paper does (§3.2).

The mixer's filter (`select_traces`): a trace whose reward (given, or computed with the
run's reward function) is below `min_trace_reward` is dropped and counted: LUFFY guides with
correct solutions, and a wrong one would get a positive advantage in a group that fails.

In a run (`OffPolicyConfig`, config.offpolicy; rl/learner.py), `mix_traces` replaces up to
`per_group` sampled members of each group by traces of its prompt, as rollout rows marked
by their stop reason (`is_trace_row`), before the rewards: the run's reward function scores
them like any completion and the advantages are over the mixed group (§3.1). The sampler
still draws all G members (the replaced ones are wasted decode work; cheap next to the
update at these group sizes).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from wakea_jax.data import chat, sources
from wakea_jax.data.records import type_name
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.objectives.offpolicy import OffPolicyLossConfig
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl.samples import Sample

TRACE_FIELDS = ("trace", "logprobs", "reward")
# A trace row's stop reason: how the learner tells trace rows from sampled ones (it travels
# with the rows through Rollouts.select / concat like every other per-row field).
TRACE_STOP_REASON = "off_policy"


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig:
  """config.offpolicy: LUFFY's mix of off-policy traces into GRPO groups (arXiv 2504.14945)."""

  traces: str = ""                 # trace source spec(s), comma-separated; "" turns LUFFY off
  per_group: int = 1               # group members replaced by traces when the prompt has some
  gamma: float = 0.1               # policy shaping f(x) = x / (x + gamma), §3.2
  # Traces whose reward (the file's, or the run's reward function's) is below this are
  # dropped at load; None keeps every trace.
  min_trace_reward: float | None = None

  def __post_init__(self) -> None:
    OffPolicyLossConfig(self.gamma)   # validates gamma
    if self.per_group < 1:
      raise ValueError(f"offpolicy.per_group must be >= 1, got {self.per_group}")
    if self.min_trace_reward is not None and not _finite(self.min_trace_reward):
      raise ValueError(f"offpolicy.min_trace_reward must be a finite number or None, got "
                       f"{self.min_trace_reward!r}")

  @property
  def enabled(self) -> bool:
    """Whether traces are mixed in at all."""
    return bool(self.traces.strip())

  @property
  def specs(self) -> list[str]:
    """The trace source specs."""
    return [spec.strip() for spec in self.traces.split(",") if spec.strip()]


@dataclasses.dataclass(frozen=True)
class Trace:
  """One validated off-policy trace (see the module docstring)."""

  prompt: prompts_lib.PromptRecord   # as written in the file (answer and meta included)
  text: str
  logprobs: tuple[float, ...] | None = None
  reward: float | None = None
  origin: str = ""

  @property
  def key(self) -> str:
    """The prompt key a step looks the trace up by (`trace_key`)."""
    return trace_key(self.prompt)


def trace_key(prompt: prompts_lib.PromptRecord | Sequence[Mapping[str, Any]]) -> str:
  """sha256 of the prompt's non-system messages (role and content) as canonical JSON."""
  messages = getattr(prompt, "messages", prompt)
  kept = [{"role": m.get("role"), "content": m.get("content")} for m in messages
          if m.get("role") != "system"]
  text = json.dumps(kept, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _finite(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def to_trace(raw: Any, where: str) -> Trace:
  """Validates one raw record; errors start with `where` and name the field."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a trace record must be a JSON object, got {type_name(raw)}")
  text = raw.get("trace")
  if text is None:
    raise ValueError(f"{where}: field 'trace' is missing (the off-policy completion text)")
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{where}: field 'trace' must be a non-empty string, got "
                     f"{repr(text) if isinstance(text, str) else type_name(text)}")
  logprobs = raw.get("logprobs")
  if logprobs is not None:
    if not isinstance(logprobs, (list, tuple)) or not logprobs:
      raise ValueError(f"{where}: field 'logprobs' must be a non-empty list of numbers, got "
                       f"{type_name(logprobs)}")
    for k, value in enumerate(logprobs):
      if not _finite(value) or value > 0:
        raise ValueError(f"{where}: field 'logprobs[{k}]' must be a finite number <= 0 (a "
                         f"log-probability), got {value!r}")
    logprobs = tuple(float(v) for v in logprobs)
  reward = raw.get("reward")
  if reward is not None and not _finite(reward):
    raise ValueError(f"{where}: field 'reward' must be a finite number, got {reward!r}")
  rest = {k: v for k, v in raw.items() if k not in TRACE_FIELDS}
  prompt = prompts_lib.to_prompt_record(rest, where)
  if prompt.continues:
    raise ValueError(f"{where}: field '{'messages' if 'messages' in raw else 'prompt'}' ends "
                     "inside an assistant turn; a trace answers a whole prompt")
  return Trace(prompt=prompt, text=text, logprobs=logprobs,
               reward=None if reward is None else float(reward), origin=where)


def load_traces(spec: str | os.PathLike[str] | Sequence[str], *, on_error: str = "raise"
                ) -> list[Trace]:
  """A .jsonl/.json/.parquet file or `datasets` directory (or a list of them) -> traces."""
  if isinstance(spec, Sequence) and not isinstance(spec, str):
    if not spec:
      raise ValueError("no trace sources given")
    return [t for one in spec for t in load_traces(one, on_error=on_error)]
  traces, _, _ = sources.validate_all(sources.raw_records(spec), to_trace, name=str(spec),
                                      on_error=on_error, kind="trace record",
                                      empty="no trace records")
  return traces


def check_logprobs(trace: Trace, num_tokens: int) -> None:
  """Raises naming the trace's location when its log-probs do not match its token count under
  the run's tokenizer (the file's were computed with another tokenisation)."""
  if trace.logprobs is not None and len(trace.logprobs) != num_tokens:
    raise ValueError(f"{trace.origin}: field 'logprobs' has {len(trace.logprobs)} entries, but "
                     f"the trace is {num_tokens} tokens under the run's tokenizer; give one "
                     "log-prob per token of that tokenisation, or leave 'logprobs' out "
                     "(pi_phi = 1, as the paper)")


def trace_samples(traces: Sequence[Trace], answers: Sequence[Any] | None = None,
                  num_tokens: Sequence[int] | None = None) -> list[Sample]:
  """What a reward sees about each trace: its text as the completion, its answer (or
  `answers[i]`, the run prompt's, where the trace has none) and meta."""
  out = []
  for i, t in enumerate(traces):
    answer = t.prompt.answer if t.prompt.answer is not None or answers is None else answers[i]
    out.append(Sample(prompt=t.prompt.text, completion=t.text, answer=answer,
                      meta=t.prompt.meta, num_tokens=0 if num_tokens is None else num_tokens[i]))
  return out


def _reward_values(reward: Callable[..., Any], samples: Sequence[Sample]) -> np.ndarray:
  """A RewardFn's [n], or a CompositeReward's total (it returns (total, components))."""
  values = reward(samples)
  if isinstance(values, tuple):
    values = values[0]
  return np.asarray(values, np.float32).reshape(len(samples))


class TraceIndex:
  """Traces by prompt key, for a GRPO step to find those of its prompts."""

  def __init__(self, traces: Iterable[Trace]):
    self._by_key: dict[str, list[Trace]] = collections.defaultdict(list)
    for t in traces:
      self._by_key[t.key].append(t)
    self._by_key = dict(self._by_key)

  def __len__(self) -> int:
    return sum(len(v) for v in self._by_key.values())

  def __contains__(self, prompt: Any) -> bool:
    return trace_key(prompt) in self._by_key

  @property
  def num_prompts(self) -> int:
    """How many distinct prompts have traces."""
    return len(self._by_key)

  @property
  def most_per_prompt(self) -> int:
    """The most traces any one prompt has (0 when empty): a group takes at most that many."""
    return max((len(v) for v in self._by_key.values()), default=0)

  def for_prompt(self, prompt: prompts_lib.PromptRecord | Sequence[Mapping[str, Any]]
                 ) -> list[Trace]:
    """Every trace of `prompt` (in file order); [] when it has none."""
    return list(self._by_key.get(trace_key(prompt), ()))

  def pick(self, prompt: prompts_lib.PromptRecord, n: int, rng: np.random.Generator
           ) -> list[Trace]:
    """Up to `n` distinct traces of `prompt`, drawn with `rng` (seed it from the run's seed
    and step so a resumed run draws the same ones)."""
    found = self._by_key.get(trace_key(prompt), [])
    if n <= 0 or not found:
      return []
    if len(found) <= n:
      return list(found)
    return [found[i] for i in sorted(rng.choice(len(found), size=n, replace=False))]


def per_group_shortfall(index: TraceIndex, per_group: int) -> str | None:
  """A warning when `per_group` asks for more traces than any prompt has (a group takes
  min(per_group, its prompt's traces), so the extra members stay on-policy); else None."""
  most = index.most_per_prompt
  if per_group <= most:
    return None
  return (f"offpolicy.per_group={per_group} but no prompt has more than {most} trace"
          f"{'s' if most != 1 else ''}: each group takes at most {most} (write several traces "
          f"per prompt for more off-policy members, or lower per_group)")


def select_traces(traces: Sequence[Trace], *, min_trace_reward: float | None = None,
                  reward: Callable[..., Any] | None = None,
                  prompts: Sequence[prompts_lib.PromptRecord] = ()
                  ) -> tuple[TraceIndex, dict[str, int]]:
  """The mixer's filter -> (index of the kept traces, counts).

  A trace's reward is its file's "reward" or, when that is missing, `reward(samples)` (the
  run's reward function; the answer is the trace's, else that of the run prompt with its
  key in `prompts`). Traces below `min_trace_reward` are dropped (None keeps all and scores
  nothing). Counts: "loaded", "kept", "below_min_reward", and "unmatched" (kept traces whose
  prompt is not among `prompts`, when `prompts` are given: no step will ever use them).
  """
  traces = list(traces)
  counts = {"loaded": len(traces), "kept": 0, "below_min_reward": 0, "unmatched": 0}
  run_answers = {trace_key(p): p.answer for p in prompts}
  if min_trace_reward is not None:
    if not _finite(min_trace_reward):
      raise ValueError(f"min_trace_reward must be a finite number, got {min_trace_reward!r}")
    scores = [t.reward for t in traces]
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
      if reward is None:
        raise ValueError(f"{traces[missing[0]].origin}: field 'reward' is missing and no reward "
                         "function was given to score it (min_trace_reward is set)")
      todo = [traces[i] for i in missing]
      try:
        values = _reward_values(reward, trace_samples(
            todo, answers=[run_answers.get(t.key) for t in todo]))
      except ValueError as err:   # e.g. a reward that needs an answer nobody gave
        raise ValueError(f"scoring the {len(todo)} traces without a 'reward' (the first at "
                         f"{todo[0].origin}) for min_trace_reward: {err}") from None
      for i, value in zip(missing, values):
        scores[i] = float(value)
    kept = [t for t, s in zip(traces, scores) if s >= min_trace_reward]
    counts["below_min_reward"] = len(traces) - len(kept)
    traces = kept
  if prompts:
    counts["unmatched"] = sum(t.key not in run_answers for t in traces)
  counts["kept"] = len(traces)
  return TraceIndex(traces), counts


def trace_completion(trace: Trace, prompt: prompts_lib.PromptRecord, tokenizer: Tokenizer,
                     prompt_ids: Sequence[int] | None = None) -> list[int]:
  """The trace's completion ids as a rollout of `prompt` would hold them: the run prompt's
  chat rendering followed by the trace as the assistant's reply, cut after its last trained
  token (the end-of-turn id a sampled completion stops at)."""
  prompt_ids = list(prompt.render(tokenizer) if prompt_ids is None else prompt_ids)
  rendered = chat.render([*prompt.messages, {"role": "assistant", "content": trace.text}],
                         tokenizer)
  ids, trained = rendered.input_ids.tolist(), rendered.loss_mask.tolist()
  if ids[:len(prompt_ids)] != prompt_ids or 1 not in trained[len(prompt_ids):]:
    raise ValueError(f"{trace.origin}: the prompt's chat rendering is not a prefix of the "
                     "rendering with the trace as the reply; this chat template cannot take "
                     "off-policy traces")
  end = len(trained) - trained[::-1].index(1)
  return ids[len(prompt_ids):end]


def mix_traces(rollouts: rollout_lib.Rollouts, index: TraceIndex, *, per_group: int,
               rng: np.random.Generator, tokenizer: Tokenizer, stop_ids: Sequence[int],
               max_new_tokens: int) -> rollout_lib.Rollouts:
  """LUFFY's mixed groups: in each group whose prompt has traces, its last k = min(per_group,
  traces) sampled members are replaced by k traces (stop reason TRACE_STOP_REASON; their
  `sampler_logprobs` are the trace's behaviour log-probs, 0 = log 1 without them). A trace
  longer than `max_new_tokens` is cut there, as a sampled completion would be."""
  g = rollouts.group_size
  fields = {f.name: list(getattr(rollouts, f.name)) for f in dataclasses.fields(rollouts)
            if f.name not in ("group_size", "media")}   # media runs mix nothing in (learner)
  for group in range(rollouts.num_groups):
    first = group * g
    prompt = rollouts.prompts[first]
    picked = index.pick(prompt, min(per_group, g), rng)
    for j, trace in enumerate(picked):
      row = first + g - len(picked) + j
      ids = trace_completion(trace, prompt, tokenizer, rollouts.prompt_ids[row])
      check_logprobs(trace, len(ids))
      behaviour = np.zeros(len(ids), np.float32) if trace.logprobs is None else np.asarray(
          trace.logprobs, np.float32)
      ids, behaviour = ids[:max_new_tokens], behaviour[:max_new_tokens]
      fields["completion_ids"][row] = ids
      fields["sampler_logprobs"][row] = behaviour
      fields["tool_mask"][row] = np.zeros(len(ids), np.int32)
      fields["num_tool_calls"][row] = 0
      fields["tool_errors"][row] = 0
      fields["stop_reason"][row] = TRACE_STOP_REASON
      fields["texts"][row] = tokenizer.decode(ids)
      fields["finals"][row] = tokenizer.decode(rollout_lib.final_turn(ids, [0] * len(ids),
                                                                      stop_ids))
  return rollout_lib.Rollouts(**fields, group_size=g)


def is_trace_row(rollouts: rollout_lib.Rollouts) -> np.ndarray:
  """bool [rows]: which rows are off-policy traces."""
  return np.array([r == TRACE_STOP_REASON for r in rollouts.stop_reason], bool)


def shaped_weights(logprobs: np.ndarray, behaviour_logprobs: np.ndarray, mask: np.ndarray,
                   gamma: float) -> np.ndarray:
  """LUFFY's shaped weights f(pi_theta / pi_phi), f(x) = x / (x + gamma), of the `mask`ed
  tokens (flat; host-side, from the trainer's scoring of the trace rows)."""
  valid = np.asarray(mask) > 0
  log_ratio = np.asarray(logprobs, np.float64)[valid] - np.asarray(behaviour_logprobs,
                                                                   np.float64)[valid]
  # f = 1 / (1 + gamma / x), overflow-free in both directions.
  return 1.0 / (1.0 + gamma * np.exp(np.clip(-log_ratio, -700.0, 700.0)))
