"""Preference pairs: loading, validation, tokenisation, batches, reference log-probs.

Sources: JSONL / JSON / Parquet files and `datasets` directories (`DIR?split=..`), read with
`sources.raw_records`; a list of dicts in memory; or a bundled generator
`task:NAME?n=..&seed=..` from `PREFERENCE_TASKS`. Several are pooled.

Record schemas (TRL's preference type, standard or conversational, explicit or implicit
prompt; [...] is a list of chat messages):

  {"prompt": str, "system"?: str, "chosen": RESPONSE, "rejected": RESPONSE}
  {"prompt": [... up to the assistant's turn], "chosen": RESPONSE, "rejected": RESPONSE}
  {"messages": [... up to the assistant's turn], "chosen": RESPONSE, "rejected": RESPONSE}
  {"chosen": [...whole conversation], "rejected": [...whole conversation]}   implicit prompt

e.g. {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
     {"prompt": [{"role": "user", "content": "2+2?"}],
      "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]},
     {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}

RESPONSE is a non-empty string (the assistant's reply), one assistant message
(`{"role": "assistant", "content": ..., "tool_calls"?: ...}`), or a list of messages that
starts and ends with an assistant message (only assistant and tool messages between). A
string prompt becomes a user turn (this stack trains chat models).

Implicit prompt (`extract_prompt`, TRL's semantics): when chosen and rejected are both whole
conversations (message lists that start before the assistant's turn), the prompt is the
messages they both start with, up to the first message that differs (unlike TRL, never
ending with an assistant turn: shared assistant messages at its end start both responses);
the rest of each is its response. Two conversations that differ from their first message, or
a side with nothing after the shared prompt, are errors. A string "prompt" (or "messages")
beside whole conversations is ignored, as in TRL (UltraFeedback-binarized has both). TRL's
standard implicit form (chosen and rejected as plain strings with the prompt inside) is
refused: a character-level prefix is no chat turn; give "prompt".

Every record is validated at load; an error names the location (`path:LINE` for JSONL,
`path[INDEX]` for JSON/Parquet/in-memory records, `DIR[SPLIT][ROW]` for a `datasets`
directory) and the field:
`pairs.jsonl:7: field 'chosen' must be a non-empty string, an assistant message or a list of
messages`. A malformed record raises, or with `on_error="skip_and_count"` is logged with its
location and counted in `stats["skipped_malformed"]`.

chosen == rejected is allowed (such a pair carries no preference: DPO's gradient on it is
zero, ORPO still trains the chosen NLL) but counted in `stats["identical"]` and logged with
the location of the first one, since it usually means a broken export.

Tokenisation. Each side is rendered with `chat.render(prompt + response)`; the loss mask
is the renderer's assistant mask with everything up to the end of the prompt's generation
prompt (`render(prompt, add_generation_prompt=True)`) set to 0, so only the response
(including its closing `<|im_end|>`) is scored. Rows follow the SFT next-token convention
(pipeline.py): input_ids = ids[:-1], targets = ids[1:], loss_mask = mask[1:], right-padded
with id 0 to `seq_len`. A side longer than seq_len + 1 tokens is truncated from the right
(the response loses its tail) with `overlength="truncate"`, or the pair is dropped with
`"drop"`; a pair whose prompt alone leaves no response token inside seq_len is always
dropped. Both are counted (`stats["truncated"]`, `stats["dropped"]`) and logged.

Batches (numpy, b = `batch_size` pairs): input_ids, targets, loss_mask [2b, seq_len], rows
[:b] the chosen sides and rows [b:] the rejected sides of the same pairs in the same order
(objectives/dpo.py `dpo_loss_fn`); pair_index [b] int32 (the pair's index in the dataset);
pair_mask [b] float32 (0 on padding rows of the last eval batch); and, once reference
log-probs are attached, ref_chosen_logps and ref_rejected_logps [b] float32.

Multi-host. `batch_size` is the global number of pairs. The losses read a global batch
as [chosen of all b pairs; rejected of all b pairs] (objectives/dpo.py), so a process cannot
build its rows from its own pairs alone: every process loads and tokenises every pair (they
are held in memory anyway), draws the same global batch from the same seeded order, and
keeps its slice of the rows (`process_rows`: process p of P the rows [p*n/P, (p+1)*n/P) of
each field with n rows), which `mesh.shard_batch` reassembles into exactly the one-process
batch. The iterator state is the same on every process, so it resumes on any process count.

Reference log-probs (dpo, ipo) are computed once, before training, by the preference
runner (`train/preference.py`) over the dataset's batches, and stored per pair index in the
dataset (`PreferenceDataset.set_reference`), so every later batch just looks them up; the
reference is the initial model (with LoRA: the base, since fresh adapters are zero).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from wakea_jax.data import chat, records, sources
from wakea_jax.data.config import OVERLENGTH
from wakea_jax.data.order import EpochOrder
from wakea_jax.data.tasks import arithmetic
from wakea_jax.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
# The per-row fields of a pair batch (rows [:b] chosen, rows [b:] rejected).
PAIR_FIELDS = ("input_ids", "targets", "loss_mask")


def _is_conversation(value: Any) -> bool:
  """A message list that starts before the assistant's turn: a whole conversation."""
  return (isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)
          and value[0].get("role") != "assistant")


def extract_prompt(chosen: Any, rejected: Any, where: str
                   ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
  """An implicit prompt: (the messages both conversations start with, {side: its response}).

  TRL's `extract_prompt`: the prompt is the longest common prefix of the two message lists,
  which ends before the first message that differs. Unlike TRL, a prefix that ends with
  assistant messages is shortened to end before them (they start both responses), so that a
  prompt never ends with the assistant's turn; identical conversations thus become a pair
  whose responses are their trailing assistant messages. Raises ValueError naming the field when
  the conversations share no prompt or a side has no response after it.
  """
  sides = {"chosen": chosen, "rejected": rejected}
  for side, value in sides.items():
    if not isinstance(value, list) or not value:
      raise ValueError(f"{where}: field '{side}' must be a whole conversation (a list of "
                       "messages) like the other side, for an implicit prompt; got "
                       f"{records.type_name(value)}")
    for k, message in enumerate(value):
      if not isinstance(message, Mapping):
        raise ValueError(f"{where}: field '{side}[{k}]' must be a message object, got "
                         f"{records.type_name(message)}")
  shared = 0
  while (shared < min(len(chosen), len(rejected))
         and dict(chosen[shared]) == dict(rejected[shared])):
    shared += 1
  while shared and chosen[shared - 1].get("role") == "assistant":
    shared -= 1
  if not shared:
    raise ValueError(f"{where}: fields 'chosen' and 'rejected' differ from their first "
                     "message, so they share no prompt (an implicit prompt is the messages "
                     "both start with); give field 'prompt'")
  responses = {}
  for side, value in sides.items():
    if len(value) == shared:
      raise ValueError(f"{where}: field '{side}' has no response after the prompt it shares "
                       f"with the other side (messages 0-{shared - 1})")
    responses[side] = records.response_messages(value[shared:], side, where, start=shared)
  return [dict(m) for m in chosen[:shared]], responses


def to_pair(raw: Any, where: str) -> dict[str, Any]:
  """Validates one raw record -> {"prompt": [messages], "chosen": [...], "rejected": [...]}.

  Raises ValueError starting with `where` and naming the field.
  """
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a preference record must be a JSON object, got "
                     f"{records.type_name(raw)}")
  for side in SIDES:
    if side not in raw:
      raise ValueError(f"{where}: field '{side}' is missing")
  if _is_conversation(raw["chosen"]) and _is_conversation(raw["rejected"]):
    if isinstance(raw.get("prompt"), list):
      raise ValueError(f"{where}: field 'prompt' is a message list, but 'chosen' and "
                       "'rejected' hold whole conversations too; give the prompt once")
    # A string "prompt" or "messages" beside whole conversations is ignored, as TRL does
    # (UltraFeedback-binarized carries both).
    prompt, responses = extract_prompt(raw["chosen"], raw["rejected"], where)
  else:
    if "prompt" not in raw and "messages" not in raw:
      raise ValueError(f"{where}: field 'prompt' is missing (string or single-turn 'chosen' "
                       "and 'rejected' need a prompt; for an implicit prompt both must be whole "
                       "conversations)")
    prompt = records.prompt_messages(raw, where)
    responses = {side: records.response_messages(raw[side], side, where) for side in SIDES}
  pair: dict[str, Any] = {"prompt": prompt}
  for field in ("images", "audios"):   # media pairs (data/media_pairs.py); refs as given
    if raw.get(field):
      pair[field] = raw[field]
  for side in SIDES:
    pair[side] = responses[side]
    try:  # what SFT targets must satisfy: no empty turns, no malformed inline tool calls
      chat.validate_training_messages(prompt + pair[side])
      chat.render_text(prompt + pair[side])
    except ValueError as err:
      raise ValueError(f"{where}: field '{side}' (with the prompt): {err}") from None
  return pair


# ---- bundled generators ---------------------------------------------------------------------

def arithmetic_pairs(num_examples: int, seed: int = 0, *, max_operand: int = 20
                     ) -> list[dict[str, Any]]:
  """Direct-answer arithmetic questions; chosen = the right result, rejected = a wrong one
  (off by 1-9 in either direction). Deterministic in its arguments."""
  rng = random.Random(f"arithmetic-pairs-{seed}")
  pairs = []
  for prompt in arithmetic.prompts(num_examples, seed, max_operand=max_operand, tools=0):
    answer = int(prompt["answer"])
    wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 9)
    pairs.append({"messages": prompt["messages"], "chosen": str(answer),
                  "rejected": str(wrong)})
  return pairs


PREFERENCE_TASKS = {"arithmetic": arithmetic_pairs}


def load_pairs(spec: str | os.PathLike[str] | Sequence[Mapping[str, Any]], *,
               name: str = "records", on_error: str = "raise"
               ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """(validated pairs, their locations, skipped-record messages) from a file, a `datasets`
  directory, a task spec or in-memory records. A malformed record raises, or with
  `on_error="skip_and_count"` is logged and its message returned in the third list."""
  if isinstance(spec, (str, os.PathLike)):
    if isinstance(spec, str) and spec.startswith(sources.TASK_PREFIX):
      task, n, seed, options = sources.parse_task_spec(spec, tasks=PREFERENCE_TASKS)
      located: Iterable[tuple[str, Any]] = [
          (f"{spec}[{i}]", r) for i, r in enumerate(PREFERENCE_TASKS[task](n, seed, **options))]
    else:
      located = sources.raw_records(spec)
    name = os.fspath(spec)
  else:
    located = [(f"{name}[{i}]", r) for i, r in enumerate(spec)]
  return sources.validate_all(located, to_pair, name=name, on_error=on_error,
                              kind="preference record", empty="no preference pairs")


# ---- tokenisation and the dataset -----------------------------------------------------------

# (pair, side, tokenizer) -> (ids, response mask, prompt length) of prompt + that side.
TokenizeSide = Callable[[Mapping[str, Any], str, Tokenizer], tuple[np.ndarray, np.ndarray, int]]


def _tokenize_side(prompt: list[dict[str, Any]], response: list[dict[str, Any]],
                   tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
  """(ids, response mask, prompt length) of prompt + response."""
  full = chat.render(prompt + response, tokenizer)
  prompt_len = len(chat.render(prompt, tokenizer, add_generation_prompt=True).input_ids)
  mask = np.array(full.loss_mask, dtype=np.float32)
  mask[:prompt_len] = 0.0  # earlier assistant turns of a multi-turn prompt are context only
  return np.asarray(full.input_ids, np.int32), mask, prompt_len


class PreferenceDataset:
  """Tokenised pairs as fixed-shape arrays [num_pairs, seq_len] per side, plus stats.

  `arrays[f"{side}_{field}"]` for side in chosen/rejected and field in input_ids, targets,
  loss_mask; `origins[i]` is pair i's location; `reference` is None or
  (ref_chosen_logps, ref_rejected_logps), float32 [num_pairs] each.
  """

  def __init__(self, pairs: Sequence[Mapping[str, Any]], origins: Sequence[str],
               tokenizer: Tokenizer, *, seq_len: int, overlength: str = "truncate",
               name: str = "pairs", skipped: int = 0,
               tokenize_side: TokenizeSide | None = None,
               media_of: Callable[[Mapping[str, Any], str], dict[str, np.ndarray]] | None = None
               ) -> None:
    """`tokenize_side(pair, side, tokenizer) -> (ids, mask, prompt_len)` replaces the chat
    rendering (media pairs expand their placeholders there, data/media_pairs.py), and
    `media_of(pair, where)` gives each kept pair's media in the per-row layout
    (models/media.py), which every batch then carries for both sides."""
    tokenize_side = tokenize_side or (
        lambda pair, side, tok: _tokenize_side(pair["prompt"], pair[side], tok))
    if overlength not in OVERLENGTH:
      raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    self.name = name
    self.seq_len = seq_len
    self.stats = {"pairs": 0, "truncated": 0, "dropped": 0, "identical": 0,
                  "skipped_malformed": skipped}
    rows: dict[str, list[np.ndarray]] = {f"{s}_{f}": [] for s in SIDES for f in PAIR_FIELDS}
    media_rows: dict[str, list[np.ndarray]] = {}
    self.origins: list[str] = []
    for pair, where in zip(pairs, origins):
      if pair["chosen"] == pair["rejected"]:
        if not self.stats["identical"]:
          logging.warning("%s: chosen == rejected (a pair without a preference; counted)", where)
        self.stats["identical"] += 1
      sides, reason = {}, None
      for side in SIDES:
        ids, mask, prompt_len = tokenize_side(pair, side, tokenizer)
        if len(ids) > seq_len + 1:
          if overlength == "drop":
            reason = f"'{side}' has {len(ids) - 1} tokens > seq_len={seq_len}"
          elif prompt_len >= seq_len:
            reason = f"the prompt alone has {prompt_len} tokens >= seq_len={seq_len}"
          ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
          sides[f"{side}_cut"] = True
        sides[side] = (ids, mask)
      if reason is not None:
        if not self.stats["dropped"]:
          logging.warning("%s: pair dropped (%s; counted)", where, reason)
        self.stats["dropped"] += 1
        continue
      if any(k.endswith("_cut") for k in sides):
        if not self.stats["truncated"]:
          logging.warning("%s: response truncated to seq_len=%d (counted)", where, seq_len)
        self.stats["truncated"] += 1
      for side in SIDES:
        ids, mask = sides[side]
        n = len(ids) - 1
        for field, values in (("input_ids", ids[:-1]), ("targets", ids[1:]),
                              ("loss_mask", mask[1:])):
          row = np.zeros(seq_len, np.float32 if field == "loss_mask" else np.int32)
          row[:n] = values
          rows[f"{side}_{field}"].append(row)
      if media_of is not None:
        for key, value in media_of(pair, where).items():
          media_rows.setdefault(key, []).append(value)
      self.origins.append(where)
    self.stats["pairs"] = len(self.origins)
    if not self.origins:
      raise ValueError(f"{name}: no preference pairs left after dropping {self.stats['dropped']} "
                       f"over-length pair(s) (seq_len={seq_len})")
    if self.stats["dropped"] or self.stats["truncated"]:
      logging.info("%s: %s", name, self.stats)
    self.arrays = {k: np.stack(v) for k, v in rows.items()}
    self.media = {k: np.stack(v) for k, v in media_rows.items()}   # [num_pairs, slots, ...]
    self.reference: tuple[np.ndarray, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.origins)

  def set_reference(self, ref_chosen_logps: np.ndarray, ref_rejected_logps: np.ndarray) -> None:
    """Attaches per-pair reference log-probs [num_pairs] to every later batch."""
    refs = (np.asarray(ref_chosen_logps, np.float32), np.asarray(ref_rejected_logps, np.float32))
    if any(r.shape != (len(self),) for r in refs):
      raise ValueError(f"reference log-probs must be [{len(self)}], got "
                       f"{[r.shape for r in refs]}")
    self.reference = refs

  def batch(self, indices: Sequence[int], batch_size: int | None = None
            ) -> dict[str, np.ndarray]:
    """The pairs at `indices`, padded with masked rows to `batch_size`."""
    index = np.asarray(indices, np.int32)
    size = len(index) if batch_size is None else batch_size
    pad = size - len(index)
    if pad < 0:
      raise ValueError(f"{len(index)} indices for a batch of {size}")
    take = np.concatenate([index, np.zeros(pad, np.int32)])
    pair_mask = np.concatenate([np.ones(len(index)), np.zeros(pad)]).astype(np.float32)
    batch = {f: np.concatenate([self.arrays[f"{s}_{f}"][take] for s in SIDES])
             for f in PAIR_FIELDS}
    batch["loss_mask"] = batch["loss_mask"] * np.tile(pair_mask, 2)[:, None]  # padding: 0
    for key, value in self.media.items():   # both sides see the pair's media
      batch[key] = np.concatenate([value[take], value[take]])
    batch["pair_index"] = take
    batch["pair_mask"] = pair_mask
    if self.reference is not None:
      batch["ref_chosen_logps"] = self.reference[0][take]
      batch["ref_rejected_logps"] = self.reference[1][take]
    return batch

  def batches(self, batch_size: int, num_batches: int | None = None
              ) -> list[dict[str, np.ndarray]]:
    """All pairs in order (or the first `num_batches` batches), the last batch padded."""
    starts = range(0, len(self), batch_size)
    if num_batches is not None:
      starts = starts[:num_batches]
    return [self.batch(range(s, min(s + batch_size, len(self))), batch_size) for s in starts]


def load_dataset(specs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
                 | Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, seq_len: int,
                 overlength: str = "truncate", on_error: str = "raise") -> PreferenceDataset:
  """One dataset from a file / directory / task spec, several of them (pooled), or in-memory
  records; `on_error="skip_and_count"` skips malformed records (`stats["skipped_malformed"]`)."""
  if isinstance(specs, (str, os.PathLike)):
    specs = [specs]
  if specs and all(isinstance(s, Mapping) for s in specs):
    pairs, origins, skipped = load_pairs(specs, on_error=on_error)  # type: ignore[arg-type]
    name = "records"
  else:
    pairs, origins, skipped = [], [], []
    for spec in specs:
      p, o, s = load_pairs(spec, on_error=on_error)  # type: ignore[arg-type]
      pairs += p
      origins += o
      skipped += s
    name = ",".join(str(s) for s in specs)
  return PreferenceDataset(pairs, origins, tokenizer, seq_len=seq_len, overlength=overlength,
                           name=name, skipped=len(skipped))


def process_rows(batch: Mapping[str, np.ndarray], process_index: int, process_count: int
                 ) -> dict[str, np.ndarray]:
  """Process `process_index`'s rows of a global batch: of every field with n rows, rows
  [p*n/P, (p+1)*n/P) (the layout `mesh.shard_batch` reassembles). Raises ValueError naming
  the field when n does not split over the processes."""
  if process_count == 1:
    return dict(batch)
  out = {}
  for key, value in batch.items():
    n = len(value)
    if n % process_count:
      raise ValueError(f"preference batch field {key!r} has {n} rows, which cannot be split "
                       f"over {process_count} processes: data.batch_size (pairs, global) must "
                       "be divisible by the process count")
    per = n // process_count
    out[key] = value[process_index * per:(process_index + 1) * per]
  return out


class PreferenceIterator:
  """Endless batches of pairs in a seeded order reshuffled every epoch; exact resume.

  `get_state()` is a JSON dict {"epoch", "position", "num_pairs"}; `set_state` on an
  iterator over the same dataset continues with the batches the original would have given.
  A batch may span an epoch boundary. `batch_size` pairs is the global batch; each process
  yields its rows of it (module docstring, "Multi-host"); `process_index`/`process_count`
  default to the JAX process's.
  """

  def __init__(self, dataset: PreferenceDataset, batch_size: int, seed: int = 0, *,
               process_index: int | None = None, process_count: int | None = None) -> None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.process_count = jax.process_count() if process_count is None else process_count
    self.process_index = jax.process_index() if process_index is None else process_index
    if batch_size % self.process_count:
      raise ValueError(f"data.batch_size={batch_size} pairs (the global batch) must be "
                       f"divisible by the process count {self.process_count}")
    self.dataset = dataset
    self.batch_size = batch_size
    self.order = EpochOrder(len(dataset), seed, name="preferences")

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return process_rows(self.dataset.batch(self.order.take(self.batch_size)),
                        self.process_index, self.process_count)

  def get_state(self) -> dict[str, int]:
    """{"epoch", "position", "num_pairs"}, JSON-serialisable (see the class docstring)."""
    return {**self.order.get_state(), "num_pairs": len(self.dataset)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `get_state()`; warns if it was saved over a different number of pairs."""
    if int(state.get("num_pairs", len(self.dataset))) != len(self.dataset):
      logging.warning("resuming a preference iterator saved over %s pairs on %d pairs; the "
                   "order differs", state.get("num_pairs"), len(self.dataset))
    self.order.set_state(state)

  @property
  def stats(self) -> dict[str, int]:
    """The dataset's counters (pairs, truncated, dropped, identical) plus the current epoch."""
    return {**self.dataset.stats, "epoch": self.order.epoch}
