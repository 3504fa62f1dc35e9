r"""APO's proposers (rl/apo.py): from a prompt and failures it caused, edited prompts.

  LLMProposer   any rl/backends.py backend (`openai`: an OpenAI-compatible endpoint; `local`:
                a checkpoint sampled in-process) in two calls, as ProTeGi (arXiv 2305.03495
                §2.1): the critique (the textual gradient: why did the prompt fail on these
                examples?), then the rewrite (edit the prompt against the critique), whose
                reply holds the candidates between <prompt> and </prompt>
  RuleProposer  `programmatic`, no model at all: a RULE-BASED stand-in for the critique that
                works offline. It reads failure categories off answer-task completions
                (`failure_categories`: too long, no <answer> tags, no answer, wrong answer)
                and applies edits from a small library (`RULES`: a sentence to append per
                category). It knows nothing about the task beyond those categories; the beam
                search's scoring decides which edit helps.

`build_proposer(spec)` builds one from config.proposer ({"kind": ..., options}).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from wakea_jax.rl import backends
from wakea_jax.rl.answers import extract_answer
from wakea_jax.rl.apo import Proposal, Proposer, ScoredExample
from wakea_jax.rl.chat_api import ChatError

# Failure category -> sentences that address it, appended to the prompt one at a time.
# The phrasing is plain instructions; a small target model follows only the instructions it
# was trained on (the APO demonstration trains one that knows two of these), an LLM target
# any phrasing.
RULES: dict[str, tuple[str, ...]] = {
    "missing_answer_tags": ("Put the final answer in <answer></answer> tags.",),
    "no_answer": ("Always end with the final answer.",),
    "wrong_answer": ("Show your work step by step.",
                     "Check your arithmetic before you answer.",
                     "Think about the question carefully."),
    "too_long": ("Be brief.",),
}
# Sentences an edit for a category removes (they cause it): work shown makes replies long.
REMOVALS: dict[str, tuple[str, ...]] = {"too_long": ("Show your work step by step.",)}

_TAGS = ("<answer>", "\\boxed{")


def failure_categories(example: ScoredExample) -> list[str]:
  """What went wrong in a failed answer-task example (a subset of RULES' keys, in order):
  cut off at the length limit; no <answer> tags (or \\boxed); no answer at all (not even a
  last number); an answer that is not the reference."""
  text = example.completion
  found: list[str] = []
  if example.truncated:
    found.append("too_long")
  if not any(tag in text for tag in _TAGS):
    found.append("missing_answer_tags")
  given = extract_answer(text)
  if given is None or not given.strip():
    found.append("no_answer")
  elif str(given).strip() != str(example.answer).strip():
    found.append("wrong_answer")
  return found


def _sentences(prompt: str) -> list[str]:
  return [s for s in re.split(r"(?<=[.!?])\s+", prompt.strip()) if s]


class RuleProposer:
  """The rule-based proposer (see the module docstring): failure categories -> edits.

  Categories are ranked by how many shown failures have them (ties in RULES' order). The
  edits, in order: for each category one sentence it lacks (the order within a category is
  drawn from `rng`), round-robin over the categories; then the removals of REMOVALS; then
  the first two single edits together. The first n distinct ones are proposed.
  """

  name = "programmatic"
  model = "apo-rules"

  def __init__(self, rules: Mapping[str, Sequence[str]] | None = None) -> None:
    self.rules = {k: tuple(v) for k, v in (rules or RULES).items()}
    if not self.rules or not all(self.rules.values()):
      raise ValueError("the rule proposer needs at least one category with sentences")

  def propose(self, prompt: str, failures: Sequence[ScoredExample], *, n: int,
              rng: random.Random) -> list[Proposal]:
    """Up to n rule edits of `prompt` for the categories of `failures` (class docstring)."""
    counts: dict[str, int] = {}
    for example in failures:
      for category in failure_categories(example):
        if category in self.rules:
          counts[category] = counts.get(category, 0) + 1
    order = list(self.rules)
    ranked = sorted(counts, key=lambda c: (-counts[c], order.index(c)))
    have = {s.casefold() for s in _sentences(prompt)}
    queues = []
    for category in ranked:
      options = [s for s in self.rules[category] if s.casefold() not in have]
      rng.shuffle(options)
      queues.append([(category, s) for s in options])
    singles: list[tuple[str, str]] = []
    while any(queues):
      for queue in queues:
        if queue:
          singles.append(queue.pop(0))
    proposals = [Proposal(f"{prompt.strip()} {sentence}".strip(), f"{category}: + {sentence!r}")
                 for category, sentence in singles]
    for category in ranked:
      for sentence in REMOVALS.get(category, ()):
        if sentence.casefold() in have:
          kept = " ".join(s for s in _sentences(prompt) if s.casefold() != sentence.casefold())
          proposals.append(Proposal(kept, f"{category}: - {sentence!r}"))
    if len(singles) >= 2:
      (c1, s1), (c2, s2) = singles[:2]
      proposals.append(Proposal(f"{prompt.strip()} {s1} {s2}".strip(),
                                f"{c1}+{c2}: + {s1!r} + {s2!r}"))
    out, keys = [], set()
    for proposal in proposals:
      key = " ".join(proposal.prompt.split()).casefold()
      if key not in keys:
        keys.add(key)
        out.append(proposal)
    return out[:n]


CRITIC_SYSTEM = "You review the system prompts of language models and improve them."
CRITIQUE_TEMPLATE = """\
A language model answered questions with this system prompt:
<prompt>
{prompt}
</prompt>

It got these {count} examples wrong:
{examples}

Give up to {reasons} reasons why the system prompt may have led the model to these mistakes.
Be specific and brief."""
REWRITE_TEMPLATE = """\
A language model answered questions with this system prompt:
<prompt>
{prompt}
</prompt>

It got these {count} examples wrong:
{examples}

A reviewer explained why:
{critique}

Write {n} different improved versions of the system prompt that fix these problems. Write each
version between <prompt> and </prompt>."""
EXAMPLE_TEMPLATE = """\
<example>
Question: {question}
Model's answer: {completion}
Expected answer: {answer}
</example>"""

# Candidate blocks in a rewrite reply, tried in order: our tags, ProTeGi's <START>/<END>,
# fenced code blocks.
_BLOCKS = (re.compile(r"<prompt>(.*?)</prompt>", re.DOTALL | re.IGNORECASE),
           re.compile(r"<START>(.*?)<END>", re.DOTALL),
           re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL))


def parse_candidates(reply: str) -> list[str]:
  """The prompts in a rewrite reply: the first block form that occurs (_BLOCKS), each
  stripped of whitespace and wrapping quotes; an unterminated last <prompt> block counts
  (a reply cut at max_tokens). Empty when the reply has no block."""
  for pattern in _BLOCKS:
    found = pattern.findall(reply)
    if pattern is _BLOCKS[0]:
      closed = reply.lower().rfind("</prompt>")
      tail = reply[closed + len("</prompt>"):] if closed >= 0 else reply
      opened = tail.lower().rfind("<prompt>")
      if opened >= 0:
        found.append(tail[opened + len("<prompt>"):])
    texts = [t.strip().strip('"').strip() for t in found]
    texts = [t for t in texts if t]
    if texts:
      return texts
  return []


def _examples(failures: Sequence[ScoredExample], max_chars: int = 600) -> str:
  return "\n".join(EXAMPLE_TEMPLATE.format(
      question=e.question[:max_chars], completion=e.completion[:max_chars] or "(empty)",
      answer=e.answer) for e in failures)


class LLMProposer:
  """Critique-then-rewrite with a backend (module docstring). A failed request (ChatError)
  or a reply without candidates proposes nothing for that parent; both are counted in
  `errors`."""

  name = "llm"

  def __init__(self, backend: backends.Backend, *, temperature: float = 0.7,
               max_tokens: int = 1024, reasons: int = 3) -> None:
    self.backend = backend
    self.name = backend.name
    self.model = backend.model
    self.temperature, self.max_tokens, self.reasons = temperature, max_tokens, reasons
    self.errors: dict[str, int] = {}

  def _ask(self, content: str) -> str:
    messages = [{"role": "system", "content": CRITIC_SYSTEM},
                {"role": "user", "content": content}]
    return self.backend.generate(messages, n=1, temperature=self.temperature,
                                 max_tokens=self.max_tokens)[0]

  def propose(self, prompt: str, failures: Sequence[ScoredExample], *, n: int,
              rng: random.Random) -> list[Proposal]:
    """Up to n rewrites of `prompt`: a critique of `failures`, then a rewrite against it."""
    del rng   # the backend samples (its own seed, or the endpoint's)
    shown = _examples(failures)
    try:
      critique = self._ask(CRITIQUE_TEMPLATE.format(prompt=prompt, count=len(failures),
                                                    examples=shown, reasons=self.reasons))
      reply = self._ask(REWRITE_TEMPLATE.format(prompt=prompt, count=len(failures),
                                                examples=shown, critique=critique.strip(),
                                                n=n))
    except ChatError as error:
      self.errors[error.kind] = self.errors.get(error.kind, 0) + 1
      return []
    texts = parse_candidates(reply)
    if not texts:
      self.errors["unparsed_reply"] = self.errors.get("unparsed_reply", 0) + 1
    note = " ".join(critique.split())[:300]
    return [Proposal(t, note) for t in texts[:n]]


PROPOSERS = ("programmatic", "openai", "local")


def build_proposer(spec: Mapping[str, Any], *, temperature: float = 0.7,
                   max_tokens: int = 1024) -> Proposer:
  """config.proposer ({"kind": ..., options}) -> a proposer; errors name the field."""
  options = dict(spec)
  kind = options.get("kind")
  if kind not in PROPOSERS:
    raise ValueError(f"config.proposer.kind: {kind!r} is not a proposer; known: "
                     f"{', '.join(PROPOSERS)}")
  if kind == "programmatic":
    options.pop("kind")
    unknown = sorted(set(options) - {"rules"})
    if unknown:
      raise ValueError(f"config.proposer: the programmatic proposer takes only 'rules', got "
                       f"{unknown[0]!r}")
    return RuleProposer(options.get("rules"))
  return LLMProposer(backends.build_backend(options, where="proposer"),
                     temperature=temperature, max_tokens=max_tokens)
