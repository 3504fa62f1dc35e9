"""RL prompt sources: verifiable prompts with the reference a reward checks.

Record schemas (JSONL / JSON / Parquet files and `datasets` directories `DIR?split=..`, read
like SFT sources, or a bundled task spec `task:NAME?n=..&seed=..` from
`wakea_jax.data.tasks.PROMPT_TASKS`); TRL's prompt-only type, standard or conversational:

  {"prompt": str, "system"?: str, "answer"?: any, ...}      {"prompt": "2+2?", "answer": "4"}
  {"prompt": [... up to the assistant's turn], "answer"?: any, ...}
  {"messages": [... up to the assistant's turn], "answer"?: any, ...}

A prompt list (or "messages") may end with an assistant message marked `"continue": true`:
a partial assistant turn that the model continues (chat.py; SRL's step prompts, rl/srl.py).

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
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wakea_jax.data import chat, dataset_dirs, records, sources
from wakea_jax.data.order import EpochOrder
from wakea_jax.data.tasks import PROMPT_TASKS
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.parallel import multihost


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One RL prompt: the conversation so far, its reference answer and metadata."""

  messages: tuple[Mapping[str, Any], ...]   # system/user (and earlier) turns
  answer: Any = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  origin: str = ""

  def render(self, tokenizer: Tokenizer, tools: Sequence[Mapping[str, Any]] | None = None
             ) -> list[int]:
    """Prompt ids ending with the assistant generation prompt, or inside the final assistant
    message when it is a partial turn to continue (`"continue": true`)."""
    rendered = chat.render(list(self.messages), tokenizer, tools=tools,
                           add_generation_prompt=not self.continues)
    return rendered.input_ids.tolist()

  @property
  def continues(self) -> bool:
    """Whether the prompt ends inside a partial assistant turn (chat.py `continue`)."""
    return bool(self.messages) and self.messages[-1].get("continue") is True

  @property
  def text(self) -> str:
    """The messages' contents joined by newlines (what rewards and logs see)."""
    return "\n".join(str(m.get("content", "")) for m in self.messages)


def with_system_prompt(record: PromptRecord, system: str) -> PromptRecord:
  """`record` with `system` as its only system message (first); without a system message
  when `system` is empty. The RL run's `rl.system_prompt` and APO's candidates (rl/apo.py)
  replace every prompt's own system message with one text this way."""
  rest = tuple(m for m in record.messages if m.get("role") != "system")
  messages = (({"role": "system", "content": system},) if system else ()) + rest
  return dataclasses.replace(record, messages=messages)


def to_prompt_record(raw: Any, where: str) -> PromptRecord:
  """Validates one raw record (`prompt` or `messages`, `answer`, extra fields as meta);
  errors start with `where` and name the field."""
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a prompt record must be a JSON object, got "
                     f"{records.type_name(raw)}")
  field = "messages" if "messages" in raw else "prompt"
  value = raw.get(field)
  partial = None   # a final assistant message that the model continues
  if (isinstance(value, list) and len(value) > 1 and isinstance(value[-1], Mapping)
      and value[-1].get("role") == "assistant" and value[-1].get("continue") not in (None, False)):
    partial, raw = dict(value[-1]), {**raw, field: value[:-1]}
  messages = records.prompt_messages(raw, where)
  if partial is not None:
    messages.append(partial)
  rest = {k: v for k, v in raw.items() if k not in ("messages", "prompt", "system", "answer")}
  # chat.render validates roles, contents and tool calls; re-raise with the location.
  try:
    chat.render_text(messages, add_generation_prompt=partial is None)
  except ValueError as err:
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
  if not (isinstance(spec, str) and spec.startswith(sources.TASK_PREFIX)):
    path, _ = dataset_dirs.split_spec(spec)
    prompts = [_resolve_media(p, path if path.is_dir() else path.parent) for p in prompts]
  return prompts


MEDIA_FIELDS = ("images", "audios")


def _resolve_media(record: PromptRecord, base: pathlib.Path) -> PromptRecord:
  """Relative media paths (meta "images" / "audios", data/multimodal.py's fields) resolved
  against the prompt file's directory, as SFT media records are."""
  media = {f: record.meta[f] for f in MEDIA_FIELDS if isinstance(record.meta.get(f), list)}
  if not media:
    return record
  resolved = {f: [os.fspath(base / v) if isinstance(v, str) else v for v in values]
              for f, values in media.items()}
  return dataclasses.replace(record, meta={**record.meta, **resolved})


class PromptIterator:
  """Seeded, epoch-reshuffled batches of prompts with a JSON state for exact resume.

  Logical shards (`data.shards`, as for SFT data): with `shards` S > 1 the records are split
  into S shards (records s::S), each walked in its own seeded order; a draw of n prompts
  takes n / S from every shard, in shard order. A process keeps only the records of the
  shards it `owned` (process p of P: [p*S/P, (p+1)*S/P)) and draws only their share, so the
  processes together draw the same global prompts whatever their number. With S = 1 (one
  process, the default) this is the plain order over all records, as before shards existed.
  """

  def __init__(self, records: Sequence[PromptRecord], batch_size: int, seed: int = 0, *,
               shards: int = 1, owned: Sequence[int] | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shards < 1:
      raise ValueError(f"prompt shards must be >= 1, got {shards}")
    records = list(records)
    if len(records) < shards:
      raise ValueError(f"{len(records)} prompt records cannot be split into {shards} shards "
                       "(data.shards, or one per process)")
    self.shards = shards
    self.owned = list(range(shards) if owned is None else owned)
    self.batch_size = batch_size
    self.records = {s: records[s::shards] for s in self.owned}
    self.orders = {s: EpochOrder(len(self.records[s]), seed,
                                 name="prompts" if shards == 1 else f"prompts-{s}-of-{shards}")
                   for s in self.owned}

  def take(self, n: int) -> list[PromptRecord]:
    """This process's share of the next `n` prompts: n / shards from each owned shard's
    epoch order (an epoch boundary may fall inside)."""
    if n % self.shards:
      raise ValueError(f"{n} prompts cannot be drawn evenly from {self.shards} prompt shards "
                       "(data.shards, or one per process)")
    per = n // self.shards
    return [self.records[s][i] for s in self.owned for i in self.orders[s].take(per)]

  def __next__(self) -> list[PromptRecord]:
    return self.take(self.batch_size)

  def __iter__(self) -> PromptIterator:
    return self

  def get_state(self) -> dict[str, Any]:
    """The position as JSON: (epoch, offset) with one shard; else every shard's, gathered
    from all processes (so every process must call it at the same point, as the train loop
    does at each checkpoint)."""
    if self.shards == 1:
      return self.orders[0].get_state()
    states: dict[str, Any] = {}
    for part in multihost.gather_objects([{str(s): self.orders[s].get_state()
                                           for s in self.owned}]):
      states.update(part)
    return {"num_shards": self.shards, "shards": states}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a position `get_state` returned (each process takes its own shards,
    so the saving run may have had another process count)."""
    saved = int(state.get("num_shards", 1))
    if saved != self.shards:
      raise ValueError(f"the checkpoint's prompt position is for {saved} prompt shards, this "
                       f"run has {self.shards} (data.shards, or one per process): resume "
                       f"with --config.data.shards={saved}")
    if self.shards == 1:
      self.orders[0].set_state(state)
      return
    for s in self.owned:
      self.orders[s].set_state(state["shards"][str(s)])
