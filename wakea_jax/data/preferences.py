"""Preference pairs: loading, validation, tokenisation, batches, reference log-probs.

Record schemas (JSONL / JSON / Parquet files read with `sources.raw_records`, a list of
dicts in memory, or a bundled generator `task:NAME?n=..&seed=..` from `PREFERENCE_TASKS`):

  {"prompt": str, "system"?: str, "chosen": RESPONSE, "rejected": RESPONSE}
  {"messages": [... up to the assistant's turn], "chosen": RESPONSE, "rejected": RESPONSE}

RESPONSE is a non-empty string (the assistant's reply), one assistant message
(`{"role": "assistant", "content": ..., "tool_calls"?: ...}`), or a list of messages that
starts and ends with an assistant message (tool calls and tool results in between). Every
record is validated at load; an error names the location (`path:LINE` for JSONL,
`path[INDEX]` for JSON/Parquet/in-memory records) and the field:
`pairs.jsonl:7: field 'chosen' must be a non-empty string, an assistant message or a list of
messages`.

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

Reference log-probs (dpo, ipo) are computed once, before training, by the preference
runner (`train/preference.py`) over the dataset's batches, and stored per pair index in the
dataset (`PreferenceDataset.set_reference`), so every later batch just looks them up; the
reference is the initial model (with LoRA: the base, since fresh adapters are zero).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from wakea_jax.data import chat, sources
from wakea_jax.data.config import OVERLENGTH
from wakea_jax.data.order import EpochOrder
from wakea_jax.data.tasks import arithmetic
from wakea_jax.data.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
# The per-row fields of a pair batch (rows [:b] chosen, rows [b:] rejected).
PAIR_FIELDS = ("input_ids", "targets", "loss_mask")


def _response_messages(value: Any, field: str, where: str) -> list[dict[str, Any]]:
  bad = ValueError(f"{where}: field '{field}' must be a non-empty string, an assistant message "
                   f"or a list of messages, got {sources.type_name(value)}")
  if isinstance(value, str):
    if not value.strip():
      raise ValueError(f"{where}: field '{field}' must be a non-empty string")
    return [{"role": "assistant", "content": value}]
  if isinstance(value, Mapping):
    value = [value]
  if not isinstance(value, list) or not value:
    raise bad
  for k, message in enumerate(value):
    if not isinstance(message, Mapping):
      raise ValueError(f"{where}: field '{field}[{k}]' must be a message object, got "
                       f"{sources.type_name(message)}")
  for k in (0, len(value) - 1):
    if value[k].get("role") != "assistant":
      raise ValueError(f"{where}: field '{field}[{k}].role' must be 'assistant' (a response "
                       f"starts and ends with an assistant message), got "
                       f"{value[k].get('role')!r}")
  return [dict(m) for m in value]


def to_pair(raw: Any, where: str) -> dict[str, Any]:
  """Validates one raw record -> {"prompt": [messages], "chosen": [...], "rejected": [...]}.

  Raises ValueError starting with `where` and naming the field.
  """
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a preference record must be a JSON object, got "
                     f"{sources.type_name(raw)}")
  prompt = sources.prompt_messages(raw, where)
  pair: dict[str, Any] = {"prompt": prompt}
  for side in SIDES:
    if side not in raw:
      raise ValueError(f"{where}: field '{side}' is missing")
    pair[side] = _response_messages(raw[side], side, where)
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
  records = []
  for prompt in arithmetic.prompts(num_examples, seed, max_operand=max_operand, tools=0):
    answer = int(prompt["answer"])
    wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 9)
    records.append({"messages": prompt["messages"], "chosen": str(answer),
                    "rejected": str(wrong)})
  return records


PREFERENCE_TASKS = {"arithmetic": arithmetic_pairs}


def load_pairs(spec: str | os.PathLike[str] | Sequence[Mapping[str, Any]], *,
               name: str = "records") -> tuple[list[dict[str, Any]], list[str]]:
  """(validated pairs, their locations) from a file, a task spec or in-memory records."""
  if isinstance(spec, (str, os.PathLike)):
    if isinstance(spec, str) and spec.startswith(sources.TASK_PREFIX):
      task, n, seed, options = sources.parse_task_spec(spec, tasks=PREFERENCE_TASKS)
      located: Iterable[tuple[str, Any]] = [
          (f"{spec}[{i}]", r) for i, r in enumerate(PREFERENCE_TASKS[task](n, seed, **options))]
    else:
      located = sources.raw_records(spec)
    name = str(spec)
  else:
    located = [(f"{name}[{i}]", r) for i, r in enumerate(spec)]
  pairs, origins = [], []
  for where, raw in located:
    if isinstance(raw, Exception):
      raise raw
    pairs.append(to_pair(raw, where))
    origins.append(where)
  if not pairs:
    raise ValueError(f"{name}: no preference pairs")
  return pairs, origins


# ---- tokenisation and the dataset -----------------------------------------------------------

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
               name: str = "pairs") -> None:
    if overlength not in OVERLENGTH:
      raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    self.name = name
    self.seq_len = seq_len
    self.stats = {"pairs": 0, "truncated": 0, "dropped": 0, "identical": 0}
    rows: dict[str, list[np.ndarray]] = {f"{s}_{f}": [] for s in SIDES for f in PAIR_FIELDS}
    self.origins: list[str] = []
    for pair, where in zip(pairs, origins):
      if pair["chosen"] == pair["rejected"]:
        if not self.stats["identical"]:
          logging.warning("%s: chosen == rejected (a pair without a preference; counted)", where)
        self.stats["identical"] += 1
      sides, reason = {}, None
      for side in SIDES:
        ids, mask, prompt_len = _tokenize_side(pair["prompt"], pair[side], tokenizer)
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
      self.origins.append(where)
    self.stats["pairs"] = len(self.origins)
    if not self.origins:
      raise ValueError(f"{name}: no preference pairs left after dropping {self.stats['dropped']} "
                       f"over-length pair(s) (seq_len={seq_len})")
    if self.stats["dropped"] or self.stats["truncated"]:
      logging.info("%s: %s", name, self.stats)
    self.arrays = {k: np.stack(v) for k, v in rows.items()}
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
                 overlength: str = "truncate") -> PreferenceDataset:
  """One dataset from a file / task spec, several of them (pooled), or in-memory records."""
  if isinstance(specs, (str, os.PathLike)):
    specs = [specs]
  if specs and all(isinstance(s, Mapping) for s in specs):
    pairs, origins = load_pairs(specs)  # type: ignore[arg-type]
    name = "records"
  else:
    pairs, origins = [], []
    for spec in specs:
      p, o = load_pairs(spec)  # type: ignore[arg-type]
      pairs += p
      origins += o
    name = ",".join(str(s) for s in specs)
  return PreferenceDataset(pairs, origins, tokenizer, seq_len=seq_len, overlength=overlength,
                           name=name)


class PreferenceIterator:
  """Endless batches of pairs in a seeded order reshuffled every epoch; exact resume.

  `get_state()` is a JSON dict {"epoch", "position", "num_pairs"}; `set_state` on an
  iterator over the same dataset continues with the batches the original would have given.
  A batch may span an epoch boundary. Single-host: every process reads every pair.
  """

  def __init__(self, dataset: PreferenceDataset, batch_size: int, seed: int = 0) -> None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.dataset = dataset
    self.batch_size = batch_size
    self.order = EpochOrder(len(dataset), seed, name="preferences")

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.dataset.batch(self.order.take(self.batch_size))

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
