r"""APO, automatic prompt optimisation: beam search over system prompts with textual gradients
(ProTeGi, Pryzant et al. 2023, arXiv 2305.03495 §2; the APO algorithm of Microsoft's Agent
Lightning is the same loop).

A fixed target model answers a dev set under a system prompt; the score of a prompt is the
mean verifiable reward of its greedy answers. One round, for every prompt p of the beam:

  failures  the dev examples p got wrong (reward < `pass_threshold`); a seeded minibatch of
            `failures_shown` of them goes to the proposer (ProTeGi's minibatch of errors)
  gradient  the proposer says why p failed on them (the "textual gradient", §2.1) ...
  edit      ... and writes `branching` edited prompts against it (§2.1, the edit step);
            rl/apo_proposers.py has the LLM proposer (two calls: critique, then rewrite)
            and a rule-based one that needs no model
  dedupe    a candidate equal to any prompt seen so far (whitespace and case folded) is
            dropped, and so is an empty one or one over `max_prompt_chars`
  score     every new candidate on the whole dev set
The next beam is the `beam_width` best of the beam and its candidates (a tie keeps the older
prompt, so the start prompt is only replaced by a strictly better one). ProTeGi picks the
beam with bandits over dev minibatches (UCB, successive rejects, §2.2) because each of its
evaluations is an API call; a small target model samples a dev set of ~100 in seconds, so
every candidate is scored on all of it: the limit the bandits approximate, exactly.

Everything random (which failures are shown, the rule proposer's choices) draws from
generators seeded by (seed, round, parent id), so a search is a function of its inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
from absl import logging
from flax import nnx

from wakea_jax.checkpoints import loader
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl.rollout import RolloutConfig, generate_rollouts, router_for
from wakea_jax.sampling.sampler import chat_sampler, check_vocab


@dataclasses.dataclass(frozen=True)
class APOConfig:
  """config.apo (with config.seed): the beam search."""

  start_prompt: str = "You are a helpful assistant."
  beam_width: int = 2          # prompts kept after each round
  branching: int = 3           # candidates asked of the proposer per beam prompt and round
  rounds: int = 3
  failures_shown: int = 4      # the minibatch of failures the proposer sees
  pass_threshold: float = 0.5  # an example with reward below this is a failure
  max_prompt_chars: int = 1000
  temperature: float = 0.7     # the proposer's sampling (LLM proposers)
  max_tokens: int = 1024
  seed: int = 0

  def __post_init__(self) -> None:
    for name in ("beam_width", "branching", "rounds", "failures_shown", "max_prompt_chars",
                 "max_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"apo.{name} must be >= 1, got {getattr(self, name)}")
    if len(self.start_prompt) > self.max_prompt_chars:
      raise ValueError(f"apo.start_prompt has {len(self.start_prompt)} characters, over "
                       f"apo.max_prompt_chars={self.max_prompt_chars}")
    if self.temperature < 0:
      raise ValueError(f"apo.temperature must be >= 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class ScoredExample:
  """One dev example answered under a prompt: what the proposer is shown of a failure."""

  question: str      # the prompt's text without the system message
  completion: str    # the model's final answer turn
  answer: Any        # the reference
  reward: float
  truncated: bool = False


@dataclasses.dataclass(frozen=True)
class PromptScore:
  """A prompt's dev score: the mean reward, and every example behind it."""

  mean: float
  examples: tuple[ScoredExample, ...]

  def failures(self, threshold: float) -> list[ScoredExample]:
    """The examples whose reward is below `threshold`."""
    return [e for e in self.examples if e.reward < threshold]


# System prompts -> their scores, in order (TargetScorer, or a fake in tests).
Scorer = Callable[[Sequence[str]], list[PromptScore]]


@dataclasses.dataclass(frozen=True)
class Proposal:
  """An edited prompt and what the proposer said about it (its critique or rule)."""

  prompt: str
  note: str = ""


class Proposer(Protocol):
  """Writes edited prompts from a prompt and failures it caused (rl/apo_proposers.py)."""

  name: str
  model: str

  def propose(self, prompt: str, failures: Sequence[ScoredExample], *, n: int,
              rng: random.Random) -> list[Proposal]:
    """Up to n edited versions of `prompt` that should fix `failures`."""
    ...


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One prompt of the search: the score table's row."""

  id: int
  round: int                 # 0 for the start prompt
  parent: int | None
  prompt: str
  score: float               # mean dev reward
  correct: int               # dev examples at or above the pass threshold
  num_examples: int
  note: str = ""

  def row(self) -> dict[str, Any]:
    """The JSON record of scores.jsonl."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Every candidate (by id), the beam after each round and the search's counts."""

  candidates: tuple[Candidate, ...]
  beams: tuple[tuple[int, ...], ...]   # beam ids after round 0 (the start), 1, ...
  counts: Mapping[str, int]
  seconds: Mapping[str, float]

  @property
  def best(self) -> Candidate:
    """The best prompt (the head of the last beam)."""
    return self.candidates[self.beams[-1][0]]

  @property
  def start(self) -> Candidate:
    """The start prompt (id 0)."""
    return self.candidates[0]


def prompt_key(prompt: str) -> str:
  """What dedupe compares: whitespace runs collapsed, case folded."""
  return " ".join(prompt.split()).casefold()


def rank(candidates: Sequence[Candidate]) -> list[Candidate]:
  """Best first; a tie keeps the older candidate (smaller id) first."""
  return sorted(candidates, key=lambda c: (-c.score, c.id))


def search(scorer: Scorer, proposer: Proposer, config: APOConfig,
           log: Callable[[str], None] = logging.info) -> SearchResult:
  """The beam search of the module docstring, from `config.start_prompt`."""
  counts = {"proposed": 0, "duplicates": 0, "empty": 0, "too_long": 0, "scored": 0,
            "parents_without_failures": 0}
  seconds = {"scoring": 0.0, "proposing": 0.0}

  def score(prompts: list[str]) -> list[PromptScore]:
    start = time.perf_counter()
    out = scorer(prompts)
    seconds["scoring"] += time.perf_counter() - start
    counts["scored"] += len(prompts)
    if len(out) != len(prompts):
      raise ValueError(f"the scorer returned {len(out)} scores for {len(prompts)} prompts")
    return out

  def make(prompt: str, result: PromptScore, **fields: Any) -> Candidate:
    correct = sum(e.reward >= config.pass_threshold for e in result.examples)
    return Candidate(id=len(candidates), prompt=prompt, score=float(result.mean),
                     correct=int(correct), num_examples=len(result.examples), **fields)

  (first,) = score([config.start_prompt])
  if not first.examples:
    raise ValueError("the dev set is empty: the scorer returned no examples")
  candidates: list[Candidate] = []
  candidates.append(make(config.start_prompt, first, round=0, parent=None, note="start"))
  results = {0: first}
  seen = {prompt_key(config.start_prompt)}
  beam = [candidates[0]]
  beams = [(0,)]
  log(f"APO round 0: start prompt dev score {first.mean:.3f}")
  for round_ in range(1, config.rounds + 1):
    fresh: list[tuple[str, str, int]] = []   # (prompt, note, parent id)
    for parent in beam:
      failures = results[parent.id].failures(config.pass_threshold)
      if not failures:
        counts["parents_without_failures"] += 1
        continue
      rng = random.Random(f"apo:{config.seed}:{round_}:{parent.id}")
      shown = rng.sample(failures, min(config.failures_shown, len(failures)))
      start = time.perf_counter()
      proposals = proposer.propose(parent.prompt, shown, n=config.branching, rng=rng)
      seconds["proposing"] += time.perf_counter() - start
      for proposal in proposals[:config.branching]:
        counts["proposed"] += 1
        text = proposal.prompt.strip()
        if not text:
          counts["empty"] += 1
        elif len(text) > config.max_prompt_chars:
          counts["too_long"] += 1
        elif prompt_key(text) in seen:
          counts["duplicates"] += 1
        else:
          seen.add(prompt_key(text))
          fresh.append((text, proposal.note, parent.id))
    scored = score([text for text, _, _ in fresh]) if fresh else []
    for (text, note, parent_id), result in zip(fresh, scored):
      candidates.append(make(text, result, round=round_, parent=parent_id, note=note))
      results[candidates[-1].id] = result
    beam = rank(beam + candidates[len(candidates) - len(fresh):])[:config.beam_width]
    beams.append(tuple(c.id for c in beam))
    log(f"APO round {round_}: {len(fresh)} new candidates, beam "
        + ", ".join(f"#{c.id} {c.score:.3f}" for c in beam))
    if not fresh and all(not results[c.id].failures(config.pass_threshold) for c in beam):
      break   # nothing left to fix
  return SearchResult(candidates=tuple(candidates), beams=tuple(beams), counts=counts,
                      seconds=seconds)


class TargetScorer:
  """Scores system prompts by sampling a fixed checkpoint greedily on prompt records.

  Each record's own system message is replaced by the prompt under test
  (prompts.with_system_prompt); the completions are sampled like `rollout` (tools
  included) `batch_size` rows per sampler call (a short call padded with copies of its
  first row: the sampler compiles per batch size); each is rewarded by `reward` (a
  rewards.build_reward spec), whose weighted total is the example's reward. Scores are
  cached by prompt text.
  """

  def __init__(self, checkpoint: str, records: Sequence[prompts_lib.PromptRecord], *,
               reward: Mapping[str, Any], rollout: RolloutConfig, tokenizer: str = "",
               batch_size: int = 64, seed: int = 0) -> None:
    if not records:
      raise ValueError("the dev set is empty: no prompt records to score prompts on")
    if batch_size < 1:
      raise ValueError(f"target.batch_size must be >= 1, got {batch_size}")
    self.records = list(records)
    self.reward = rewards_lib.build_reward(reward)
    self.rollout = dataclasses.replace(rollout, group_size=1)
    self.router = router_for(rollout)
    model = loader.load_model(checkpoint)
    self.graphdef, self.params = nnx.split(model)
    self.tokenizer = tokenizer_from(tokenizer or loader.tokenizer_path(checkpoint))
    check_vocab(self.tokenizer, model.config, model_source=f"the checkpoint {checkpoint}")
    # Candidates differ in length by a sentence or two: one prompt bucket of >= 64 tokens
    # keeps most of them on one compiled prefill (the sampler rounds widths to powers of 2).
    self.sampler = chat_sampler(self.graphdef, model.config, self.tokenizer, temperature=0.0,
                                min_prompt_bucket=64,
                                model_source=f"the checkpoint {checkpoint}")
    self.batch_size, self.seed = batch_size, seed
    self.cache: dict[str, PromptScore] = {}

  def with_records(self, records: Sequence[prompts_lib.PromptRecord]) -> TargetScorer:
    """A scorer of the same model (loaded once) on other records (the held-out set)."""
    if not records:
      raise ValueError("no prompt records to score prompts on")
    other = copy.copy(self)
    other.records, other.cache = list(records), {}
    return other

  def __call__(self, prompts: Sequence[str]) -> list[PromptScore]:
    """The score of each prompt (sampled once per distinct new prompt)."""
    todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
    rows = [prompts_lib.with_system_prompt(r, p) for p in todo for r in self.records]
    rewards: list[float] = []
    finals: list[str] = []
    truncated: list[bool] = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      real = len(chunk)
      chunk = chunk + [chunk[0]] * (self.batch_size - real)
      out = generate_rollouts(self.sampler, self.params, chunk, tokenizer=self.tokenizer,
                              config=self.rollout, rng=jax.random.key(self.seed),
                              router=self.router)
      samples = out.samples()[:real]
      rewards += [float(v) for v in self.reward(samples)[0]]
      finals += [s.final for s in samples]
      truncated += [s.truncated for s in samples]
    n = len(self.records)
    for i, prompt in enumerate(todo):
      examples = tuple(
          ScoredExample(question=_question(r), completion=finals[i * n + j],
                        answer=r.answer, reward=rewards[i * n + j],
                        truncated=truncated[i * n + j])
          for j, r in enumerate(self.records))
      self.cache[prompt] = PromptScore(mean=sum(e.reward for e in examples) / n,
                                       examples=examples)
    return [self.cache[p] for p in prompts]


def _question(record: prompts_lib.PromptRecord) -> str:
  """The record's conversation without its system message, as text."""
  return "\n".join(str(m.get("content", "")) for m in record.messages
                   if m.get("role") != "system")
