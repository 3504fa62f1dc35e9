"""RL prompt sources: verifiable prompts with the reference a reward checks.

Record schemas (JSONL / JSON / Parquet files and `datasets` directories `DIR?split=..`, read
like SFT sources, or a bundled task spec `task:NAME?n=..&seed=..` from
`wakea_jax.data.tasks.PROMPT_TASKS`); TRL's prompt-only type, standard or conversational:

  {"prompt": str, "system"?: str, "answer"?: any, ...}      {"prompt": "2+2?", "answer": "4"}
  {"prompt": [... up to the assistant's turn], "answer"?: any, ...}
  {"messages": [... up to the assistant's turn], "answer"?: any, ...}

Any other field (e.g. "tests" for code tasks) travels to the rewards in `meta`. Every record
is validated when loaded; an error names the location (`file:line`, `file[INDEX]`,
`DIR[SPLIT][ROW]`) and the field. A malformed record raises, or with
`on_error="skip_and_count"` is logged with its location and skipped.

`PromptIterator` walks the prompts in a seeded order, reshuffled every epoch, and its state
(epoch, position) is a small JSON dict saved with each checkpoint, so a resumed RL run sees
the prompts it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wakea_jax.data import chat, records, sources
from wakea_jax.data.order import EpochOrder
from wakea_jax.data.tasks import PROMPT_TASKS
from wakea_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One RL prompt: the conversation so far, its reference answer and metadata."""

  messages: tuple[Mapping[str, Any], ...]   # system/user (and earlier) turns
  answer: Any = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  origin: str = ""

  def render(self, tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None
             ) -> list[int]:
    """Prompt ids ending with the assistant generation prompt."""
    rendered = chat.render(list(self.messages), tokenizer, tools=tools,
                           add_generation_prompt=True)
    return rendered.input_ids.tolist()

  @property
  def text(self) -> str:
    """The messages' contents joined by newlines (what rewards and logs see)."""
    return "\n".join(str(m.get("content", "")) for m in self.messages)


def to_prompt_record(raw: Any, where: str) -> PromptRecord:
  """Validates one raw record (`prompt` or `messages`, `answer`, extra fields as meta);
  errors start with `where` and name the field."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a prompt record must be a JSON object, got "
                     f"{records.type_name(raw)}")
  messages = records.prompt_messages(raw, where)
  rest = {k: v for k, v in raw.items() if k not in ("messages", "prompt", "system", "answer")}
  # chat.render validates roles, contents and tool calls; re-raise with the location.
  try:
    chat.render_text(messages, add_generation_prompt=True)
  except ValueError as err:
    field = "messages" if "messages" in raw else "prompt"
    raise ValueError(f"{where}: field '{field}': {err}") from None
  return PromptRecord(messages=tuple(messages), answer=raw.get("answer"), meta=rest,
                      origin=where)


def load_prompts(spec: str | os.PathLike[str] | Sequence[str], *, on_error: str = "raise"
                 ) -> list[PromptRecord]:
  """A .jsonl/.json/.parquet file, a `datasets` directory or `task:NAME?n=..&seed=..` ->
  validated prompt records; a list of them -> their records pooled, in order."""
  if isinstance(spec, Sequence) and not isinstance(spec, str):
    if not spec:
      raise ValueError("no prompt sources given")
    return [record for one in spec for record in load_prompts(one, on_error=on_error)]
  if isinstance(spec, str) and spec.startswith(sources.TASK_PREFIX):
    name, n, seed, options = sources.parse_task_spec(spec, tasks=PROMPT_TASKS)
    located: Iterable[tuple[str, Any]] = [
        (f"{spec}[{i}]", r) for i, r in enumerate(PROMPT_TASKS[name](n, seed, **options))]
  else:
    located = sources.raw_records(spec)
  prompts, _, _ = sources.validate_all(located, to_prompt_record, name=str(spec),
                                       on_error=on_error, kind="prompt record",
                                       empty="no prompt records")
  return prompts


class PromptIterator:
  """Seeded, epoch-reshuffled batches of prompts with a JSON state for exact resume."""

  def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int = 0):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.records = list(records)
    self.batch_size = batch_size
    self.order = EpochOrder(len(self.records), seed, name="prompts")

  def take(self, n: int) -> list[PromptRecord]:
    """The next `n` prompts of the epoch order (an epoch boundary may fall inside)."""
    return [self.records[i] for i in self.order.take(n)]

  def __next__(self) -> list[PromptRecord]:
    return self.take(self.batch_size)

  def __iter__(self) -> PromptIterator:
    return self

  def get_state(self) -> dict[str, int]:
    """The position (epoch, offset) as JSON."""
    return self.order.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position `get_state` returned."""
    self.order.set_state(state)
