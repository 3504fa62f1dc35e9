"""grain input pipeline: sources -> shuffle -> chat tokenisation -> mixture -> packing -> batches.

Batches are dicts of numpy arrays [batch_size, seq_len] in the next-token convention:
  input_ids    int32  the tokens fed to the model (ids[:-1] of each example)
  targets      int32  the tokens to predict (ids[1:])
  loss_mask    float32  1 where the target is assistant-generated (chat.render's mask[1:])
  segment_ids  int32  1, 2, ... per packed example; 0 on padding
  positions    int32  restart at 0 for every example

Exact resume: `PipelineIterator.get_state()` is a JSON-able dict (grain's iterator state);
`set_state` on a pipeline built from the same config continues with exactly the batches the
original would have produced. Multi-host: each process reads the records with index
`process_index (mod process_count)` of every source and yields its own per-host batch.

Over-length examples (more than seq_len + 1 tokens) are truncated or dropped per the
config, and counted per source in `PipelineIterator.stats` (as are examples whose
assistant tokens all fall past the cut, which are dropped); the trainer logs the summary.
The counters count examples tokenised by this process, read-ahead included, since start
(they are not part of the resume state).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import grain
import jax
import numpy as np

from wakea_jax.data import chat
from wakea_jax.data import sources as sources_lib
from wakea_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)
OVERLENGTH = ("truncate", "drop")
FEATURES = ("input_ids", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  path: str            # .jsonl / .json / .parquet path, or "task:NAME?n=..&seed=.."
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  sources: tuple[SourceSpec, ...]
  seq_len: int
  batch_size: int
  seed: int = 0
  packing: bool = True
  overlength: str = "truncate"
  num_epochs: int | None = None        # None: repeat forever (training); 1 for evaluation
  shuffle: bool = True
  on_error: str = "raise"              # or "skip_and_count" for malformed records

  def __post_init__(self) -> None:
    if not self.sources:
      raise ValueError("data.sources is empty")
    for spec in self.sources:
      if spec.weight <= 0:
        raise ValueError(f"data source {spec.path!r} has weight {spec.weight}; must be > 0")
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"data.seq_len ({self.seq_len}) must be >= 2 and data.batch_size "
                       f"({self.batch_size}) >= 1")
    if self.overlength not in OVERLENGTH:
      raise ValueError(f"data.overlength must be one of {OVERLENGTH}, got {self.overlength!r}")


class DataStats:
  """Per-source counters, updated by the tokenising map (thread-safe)."""

  def __init__(self, names: list[str]):
    self._lock = threading.Lock()
    self.counts = {name: {"examples": 0, "truncated": 0, "dropped_overlength": 0,
                          "dropped_no_target": 0} for name in names}

  def add(self, source: str, key: str) -> None:
    with self._lock:
      self.counts[source][key] += 1

  def __repr__(self) -> str:
    return repr(self.counts)


def tokenize(record: dict[str, Any], tokenizer: Tokenizer, seq_len: int, overlength: str,
             stats: DataStats, source: str) -> dict[str, np.ndarray] | None:
  """One chat record -> next-token arrays of length <= seq_len, or None (dropped, counted)."""
  rendered = chat.render(record["messages"], tokenizer)
  ids, mask = rendered.input_ids, rendered.loss_mask
  stats.add(source, "examples")
  if len(ids) - 1 > seq_len:
    if overlength == "drop":
      stats.add(source, "dropped_overlength")
      return None
    stats.add(source, "truncated")
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  loss_mask = np.asarray(mask[1:], np.float32)
  if not loss_mask.any():
    stats.add(source, "dropped_no_target")
    return None
  return {"input_ids": np.asarray(ids[:-1], np.int32), "targets": np.asarray(ids[1:], np.int32),
          "loss_mask": loss_mask}


def _pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  n = len(example["input_ids"])
  out = {k: np.pad(v, (0, seq_len - n)) for k, v in example.items()}
  out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return out


def _rename_packed(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"input_ids": example["input_ids"], "targets": example["targets"],
          "loss_mask": example["loss_mask"], "segment_ids": example["input_ids_segment_ids"],
          "positions": example["input_ids_positions"]}


class PipelineIterator:
  """Iterator of batches with get_state/set_state for exact resume, and data stats."""

  def __init__(self, dataset: grain.IterDataset, stats: DataStats):
    self._iterator = iter(dataset)
    self.stats = stats

  def __iter__(self) -> "PipelineIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)


def _dataset(config: PipelineConfig, tokenizer: Tokenizer
             ) -> tuple[grain.IterDataset, DataStats]:
  loaded = [sources_lib.load_source(spec.path, on_error=config.on_error)
            for spec in config.sources]
  stats = DataStats([s.name for s in loaded])
  per_source = []
  for i, source in enumerate(loaded):
    ds = grain.MapDataset.source(source)
    if jax.process_count() > 1:
      ds = ds[jax.process_index()::jax.process_count()]
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed * 1000 + i)
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(lambda r, name=source.name: tokenize(r, tokenizer, config.seq_len,
                                                     config.overlength, stats, name))
    per_source.append(ds)
  if len(per_source) == 1:
    mixed = per_source[0]
  else:
    mixed = grain.MapDataset.mix(per_source, [s.weight for s in config.sources])
  # Dropped examples are None; the iterator view skips them.
  # A small read-ahead: tokenising is cheap, and threads would compete with the train step.
  examples = mixed.filter(lambda x: x is not None).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * config.batch_size))
  if config.packing:
    length = {k: config.seq_len for k in FEATURES}
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=length, num_packing_bins=config.batch_size,
        shuffle_bins=False)
    rows = packed.map(_rename_packed)
  else:
    rows = examples.map(lambda x: _pad_example(x, config.seq_len))
  return rows.batch(config.batch_size, drop_remainder=config.num_epochs is None), stats


def build_pipeline(config: PipelineConfig, tokenizer: Tokenizer) -> PipelineIterator:
  dataset, stats = _dataset(config, tokenizer)
  return PipelineIterator(dataset, stats)


def make_eval_batches(config: PipelineConfig, tokenizer: Tokenizer, num_batches: int
                      ) -> list[dict[str, np.ndarray]]:
  """A fixed list of up to `num_batches` batches: one pass, no shuffling, last batch padded
  with empty rows (loss_mask 0) so every batch has the same shape."""
  eval_config = dataclasses.replace(config, num_epochs=1, shuffle=False)
  dataset, _ = _dataset(eval_config, tokenizer)
  batches = []
  for batch in dataset:
    rows = len(batch["input_ids"])
    if rows < config.batch_size:
      batch = {k: np.pad(v, [(0, config.batch_size - rows)] + [(0, 0)] * (v.ndim - 1))
               for k, v in batch.items()}
    batches.append(batch)
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError(f"evaluation sources {[s.path for s in config.sources]} yield no batches")
  return batches
