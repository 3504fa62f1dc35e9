"""grain input pipeline: sources -> shuffle -> chat tokenisation -> mixture -> packing -> batches.

    per source: MapDataset.source -> records shard::shards -> shuffle(seed) -> repeat(epochs)
                -> map(chat.render)
    MapDataset.mix(sources, weights) -> to_iter_dataset (read threads)
    -> next-token inputs + over-length policy (counted)
    -> FirstFitPackIterDataset (packing on) or pad each example (packing off)
    -> batch -> thread prefetch            (one such pipeline per logical shard; see below)

Batches are dicts of numpy arrays [rows, seq_len] (rows: this process's share of the global
`batch_size`) in the next-token convention: for an example with token ids `ids` and
assistant mask `mask` (from `chat.render`; for a prompt/completion record whose prompt has
assistant turns, zero up to the end of the prompt, so only the completion is trained on, see
sources.py)
  input_ids    int32    ids[:-1], the tokens fed to the model
  targets      int32    ids[1:], the tokens to predict
  loss_mask    float32  mask[1:], 1 where the target is assistant output, 0 on padding
  segment_ids  int32    1, 2, ... per example in the row; 0 on padding
  positions    int32    0, 1, ... restarting for every example; 0 on padding
Padding is token id 0 (any id works: it is masked and in its own segment).

Mixture. `MapDataset.mix` interleaves the sources deterministically in proportion to their
weights, so a 3:1 mixture is 75% / 25% to within a few examples at every prefix. Each source
is shuffled on its own (a differently seeded order every epoch) and repeated forever when
`num_epochs` is None. With a finite `num_epochs` the mixture ends when the first source
runs out at its weight (grain's rule), so an epoch count is exact only for that source.

Over-length examples (more than seq_len + 1 tokens, i.e. more than seq_len input tokens)
are truncated to seq_len inputs or dropped, per `overlength`; examples left without any
assistant target (e.g. truncated before the answer) are dropped. All of it is counted per
source in `PipelineIterator.stats` (this process's shards; `global_stats()` sums every
process's) and logged: a warning naming the first such example of each source (file:line),
then a summary each time the total doubles. The counts are part of the iterator state, so
they are exact and resume with it; they cover the examples of all batches returned so far,
up to one packing group (a shard's rows of one batch) behind.

Exact resume. `it.get_state()` is a JSON-serialisable dict (grain's iterator state, which
is a few integers per stage, plus the counters). `set_state(state)` on an iterator built
from the same config and data continues with exactly the batches the original would have
produced. A state from a different config is applied anyway (with a warning), because
changing the mixture mid-run is legitimate; the batches then differ.

Multi-host: logical shards. `batch_size` is the *global* batch. The data are split into
`shards` logical shards (0: one per JAX process): shard s reads records `s::shards` of every
source and is its own pipeline (shuffle, mixture, packing) producing batch_size / shards
rows. Process p of P owns the contiguous shards [p*k, (p+1)*k), k = shards / P, and yields
their rows concatenated in shard order, i.e. exactly its rows of the global batch
(`wakea_jax.parallel.mesh.shard_batch` assembles them, process p's rows being global rows
[p*n, (p+1)*n)). So the global batches depend on `shards`, never on the process count: with
a fixed `shards` (e.g. 4) a 1-process run sees exactly the batches of a 2- or 4-process run,
and a run can resume on a different number of hosts. The iterator state holds every
shard's grain state (`get_state` gathers them from all processes; `set_state` takes the
process's own), so a checkpoint written by process 0 resumes on any process count that
divides `shards`. With one process and `shards` 0 or 1 the batches are those of the
single-host pipeline before logical shards, whose (version-1) states still restore.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from wakea_jax.data import chat
from wakea_jax.data import sources as sources_lib
from wakea_jax.data.config import ON_ERROR, OVERLENGTH, DataConfig
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.parallel import multihost

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
# Per-source counters kept in the iterator state; "examples" counts tokenised examples
# that reached the packer (or the padder), before the over-length policy.
COUNTERS = ("examples", "truncated", "dropped_overlength", "dropped_no_target")
_EXAMPLES, _TRUNCATED, _DROPPED_OVERLENGTH, _DROPPED_NO_TARGET = range(len(COUNTERS))
_COUNTS_KEY = "wakea_counts"
_STATE_VERSION = 2  # 1: one grain state ("grain"); 2: one per logical shard ("shards")
_FEATURES = ("input_ids", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One data source and its mixture weight (relative to the other sources' weights)."""

  path: str  # a .jsonl/.json/.parquet path, a `datasets` directory "DIR?split=..", or a
  # bundled task "task:NAME?n=..&seed=.."
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What to read and how to batch it. See the module docstring for the semantics."""

  sources: tuple[SourceSpec, ...]
  seq_len: int
  batch_size: int  # global: the rows of all shards (all processes) together
  seed: int = 0  # shuffle seed
  shuffle: bool = True
  packing: bool = True
  overlength: str = "truncate"  # or "drop"; counted either way
  num_epochs: int | None = None  # None: repeat forever (training)
  drop_remainder: bool = True  # a final partial batch (finite epochs only)
  # Logical data shards (module docstring); 0: one per JAX process. A fixed value makes the
  # batches independent of the process count (and resumable on another one).
  shards: int = 0
  on_error: str = "raise"  # or "skip_and_count" for malformed records
  # Tokenising threads. 0 (default) tokenises on the batch-prefetch thread, which measured
  # fastest: tokenising holds the GIL, so more threads only contend for it.
  read_threads: int = 0
  prefetch_batches: int = 2  # batches prepared ahead on a background thread; 0: none

  def __post_init__(self) -> None:
    if not self.sources:
      raise ValueError("data sources are empty")
    for spec in self.sources:
      if not isinstance(spec, SourceSpec):
        raise ValueError(f"data sources must be SourceSpec(path, weight), got {spec!r}")
      if not spec.weight > 0:
        raise ValueError(f"data source {spec.path!r} has weight {spec.weight}; must be > 0")
    if self.seq_len < 1 or self.batch_size < 1:
      raise ValueError(f"seq_len ({self.seq_len}) and batch_size ({self.batch_size}) must "
                       "be >= 1")
    if self.overlength not in OVERLENGTH:
      raise ValueError(f"overlength must be one of {OVERLENGTH}, got {self.overlength!r}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
    if self.on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
    if self.read_threads < 0 or self.prefetch_batches < 0:
      raise ValueError("read_threads and prefetch_batches must be >= 0")
    if self.shards < 0:
      raise ValueError(f"data.shards must be >= 0 (0: one per process), got {self.shards}")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """Which logical shards this process reads: process p of P owns [p*k, (p+1)*k)."""

  shards: int
  process_index: int
  process_count: int

  @property
  def per_process(self) -> int:
    """k: the shards each process owns."""
    return self.shards // self.process_count

  @property
  def owned(self) -> range:
    """This process's shards, in the order their rows are concatenated."""
    k = self.per_process
    return range(self.process_index * k, (self.process_index + 1) * k)


def shard_layout(config: PipelineConfig, *, process_index: int | None = None,
                 process_count: int | None = None, batch_field: str = "data.batch_size"
                 ) -> ShardLayout:
  """The logical shards of `config` for this process (default: the JAX process), validated.

  Raises ValueError naming the config fields when `shards` is not a multiple of the process
  count or `batch_size` (`batch_field`) does not split evenly over the shards.
  """
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if not 0 <= index < count:
    raise ValueError(f"process index {index} is outside [0, {count})")
  shards = config.shards or count
  if shards % count:
    raise ValueError(f"data.shards={config.shards} logical data shards cannot be split evenly "
                     f"over {count} processes: use a multiple of the process count (or 0, one "
                     "shard per process)")
  if config.batch_size % shards:
    raise ValueError(f"{batch_field}={config.batch_size} (the global batch) must be divisible "
                     f"by the {shards} logical data shards (data.shards={config.shards}"
                     f"{', i.e. the process count' if not config.shards else ''})")
  return ShardLayout(shards=shards, process_index=index, process_count=count)


def pipeline_config(data: DataConfig, *, eval_split: bool = False) -> PipelineConfig:
  """The pipeline for `config.data`'s training sources (or, with `eval_split`, its held-out
  ones: their own batch size and a seed one higher)."""
  sources = data.eval_sources if eval_split else data.sources
  return PipelineConfig(
      sources=tuple(SourceSpec(spec, weight) for spec, weight in sources),
      seq_len=data.seq_len,
      batch_size=data.eval_batch_size if eval_split else data.batch_size,
      seed=data.seed + (1 if eval_split else 0),
      packing=data.packing,
      overlength=data.overlength,
      on_error=data.on_error,
      shards=data.shards,
  )


@dataclasses.dataclass(frozen=True)
class DataStats:
  """Per-source counters: COUNTERS plus `skipped_malformed` (records skipped at load)."""

  counts: dict[str, dict[str, int]]  # source name -> counter -> value

  def total(self, counter: str) -> int:
    """The sum of `counter` over all sources."""
    return sum(c[counter] for c in self.counts.values())

  def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
    """Totals as flat scalars for a metrics writer."""
    keys = (*COUNTERS, "skipped_malformed")
    return {f"{prefix}{key}": self.total(key) for key in keys}

  def summary(self) -> str:
    """One log line: per source, the example count and any non-zero other counters."""
    parts = []
    for name, c in self.counts.items():
      lost = ", ".join(f"{k} {v}" for k, v in c.items() if k != "examples" and v)
      parts.append(f"{name}: {c['examples']} examples" + (f" ({lost})" if lost else ""))
    return "; ".join(parts)

  def __str__(self) -> str:
    return self.summary()


def _tokenize(element: dict[str, Any], tokenizer: Tokenizer, source_index: int
              ) -> dict[str, Any]:
  messages, tools = element["messages"], element["tools"]
  rendered = chat.render(messages, tokenizer, tools=tools)
  mask = rendered.loss_mask
  num_prompt = element.get("num_prompt_messages", 0)
  if num_prompt:
    # Completion-only loss: the prompt's own assistant turns are context. The prompt rendered
    # with its generation prompt is exactly the tokens before the completion's first body
    # token, as for preference pairs (preferences.py).
    prompt_ids = chat.render(messages[:num_prompt], tokenizer, tools=tools,
                             add_generation_prompt=True).input_ids
    if not np.array_equal(rendered.input_ids[:len(prompt_ids)], prompt_ids):
      raise ValueError(f"{element['origin']}: the rendered prompt is not a prefix of the "
                       "rendered conversation; cannot mask the prompt")
    mask = mask.copy()
    mask[:len(prompt_ids)] = 0
  return {"ids": rendered.input_ids, "mask": mask, "source": source_index,
          "origin": element["origin"]}


class _NextTokenIterator(grain.DatasetIterator):
  """Tokenised chats -> next-token model inputs, applying and counting the over-length
  policy. Runs on the consuming thread, so the counts are exact and part of the state."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, overlength: str,
               names: Sequence[str], sizes: Sequence[int]) -> None:
    super().__init__(parent)
    self._seq_len = seq_len
    self._overlength = overlength
    self._names = tuple(names)
    self._sizes = tuple(sizes)
    self._counts = [[0] * len(COUNTERS) for _ in names]
    self._reported: set[tuple[int, int]] = set()
    # Examples dropped in a row, per source. A source that drops two full passes in a row
    # (epochs are reshuffled, so one usable example can sit at the start of one pass and the
    # end of the next) has nothing usable at this seq_len: training would drop and log
    # forever, or its mixture weight would silently go to the others.
    self._dropped_in_a_row = [0] * len(names)

  def _dropped(self, source: int, counter: int, origin: str, length: int) -> None:
    self._count(source, counter, origin, length)
    self._dropped_in_a_row[source] += 1
    if self._dropped_in_a_row[source] >= 2 * max(self._sizes[source], 1):
      counts = dict(zip(COUNTERS, self._counts[source]))
      raise ValueError(
          f"data source {self._names[source]}: no usable example at seq_len={self._seq_len} "
          f"(overlength={self._overlength!r}): {counts} after {self._dropped_in_a_row[source]} "
          "examples in a row; raise data.seq_len, use overlength='truncate', or drop the source")

  def _count(self, source: int, counter: int, origin: str, length: int) -> None:
    self._counts[source][counter] += 1
    if counter == _EXAMPLES:
      return
    if (source, counter) not in self._reported:
      self._reported.add((source, counter))
      limit = self._seq_len + 1
      what = {"truncated": f"longer than seq_len + 1 = {limit}, truncated",
              "dropped_overlength": f"longer than seq_len + 1 = {limit}, dropped",
              "dropped_no_target": f"no assistant target in the first {limit}, dropped"}
      logging.warning("%s: %d tokens, %s (further cases are only counted)", origin, length,
                   what[COUNTERS[counter]])
    lost = sum(sum(c[1:]) for c in self._counts)
    if lost & (lost - 1) == 0:  # 1, 2, 4, 8, ...: a summary without flooding the log
      stats = DataStats({n: dict(zip(COUNTERS, c)) for n, c in zip(self._names, self._counts)})
      logging.warning("data: %d over-length example(s) so far: %s", lost, stats.summary())

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      element = next(self._parent)
      source, origin = element["source"], element["origin"]
      ids, mask = element["ids"], element["mask"]
      length = len(ids)
      self._count(source, _EXAMPLES, origin, length)
      truncated = length - 1 > self._seq_len
      if truncated:
        if self._overlength == "drop":
          self._dropped(source, _DROPPED_OVERLENGTH, origin, length)
          continue
        ids, mask = ids[:self._seq_len + 1], mask[:self._seq_len + 1]
      loss_mask = np.asarray(mask[1:], np.float32)
      if not loss_mask.any():  # e.g. a long prompt: the answer was cut off entirely
        self._dropped(source, _DROPPED_NO_TARGET, origin, length)
        continue
      self._dropped_in_a_row[source] = 0
      if truncated:
        self._count(source, _TRUNCATED, origin, length)
      return {"input_ids": np.asarray(ids[:-1], np.int32),
              "targets": np.asarray(ids[1:], np.int32), "loss_mask": loss_mask}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), _COUNTS_KEY: [list(c) for c in self._counts]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    counts = state[_COUNTS_KEY]
    if len(counts) != len(self._names):
      raise ValueError(f"iterator state has counters for {len(counts)} sources, the pipeline "
                       f"has {len(self._names)}")
    self._counts = [[int(v) for v in c] for c in counts]


class _NextTokenDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, seq_len: int, overlength: str,
               names: Sequence[str], sizes: Sequence[int]) -> None:
    super().__init__(parent)
    self._args = (seq_len, overlength, tuple(names), tuple(sizes))
    self.live: _NextTokenIterator | None = None  # the latest iterator, for its final counts

  def __iter__(self) -> _NextTokenIterator:
    self.live = _NextTokenIterator(self._parent.__iter__(), *self._args)
    return self.live

  def __str__(self) -> str:
    return "NextTokenDataset"


def _pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  n = len(example["input_ids"])
  out = {k: np.pad(example[k], (0, seq_len - n)) for k in _FEATURES}
  inside = np.arange(seq_len) < n
  out["segment_ids"] = inside.astype(np.int32)
  out["positions"] = np.where(inside, np.arange(seq_len), 0).astype(np.int32)
  return out


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # The packer gives each feature its own segment ids/positions; they are identical for
  # the three features, which are packed together.
  return {"input_ids": row["input_ids"], "targets": row["targets"],
          "loss_mask": row["loss_mask"].astype(np.float32),
          "segment_ids": row["input_ids_segment_ids"].astype(np.int32),
          "positions": row["input_ids_positions"].astype(np.int32)}


def _stat_names(loaded: Sequence[sources_lib.Source]) -> list[str]:
  """Source names as stats keys; a source listed twice gets its position appended."""
  names = [s.name for s in loaded]
  return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _shuffle_seed(seed: int, source_index: int, shard: grain.sharding.ShardOptions) -> int:
  # A distinct, well-mixed 32-bit seed per (seed, source[, shard]): nearby seeds give
  # unrelated orders, and equally long shards are not shuffled in lockstep. One shard keeps
  # the seed of the single-shard pipeline.
  key = [seed, source_index] + ([shard.shard_index] if shard.shard_count > 1 else [])
  return int(np.random.SeedSequence(key).generate_state(1)[0])


def _dataset(config: PipelineConfig, loaded: Sequence[sources_lib.Source], tokenizer: Tokenizer,
             shard: grain.sharding.ShardOptions, *, concatenate: bool = False
             ) -> grain.IterDataset:
  """One logical shard's pipeline; `config.batch_size` is the shard's rows per batch."""
  per_source = []
  for i, source in enumerate(loaded):
    ds = grain.MapDataset.source(source)
    if shard.shard_count > 1:
      if len(source) < shard.shard_count:
        raise ValueError(f"{source.name}: {len(source)} records cannot be split into "
                         f"{shard.shard_count} logical data shards (data.shards)")
      ds = ds[shard.shard_index::shard.shard_count]
    if config.shuffle:
      ds = ds.shuffle(seed=_shuffle_seed(config.seed, i, shard))
    ds = ds.repeat(config.num_epochs)  # reseeds the shuffle every epoch
    per_source.append(ds.map(lambda x, i=i: _tokenize(x, tokenizer, i)))
  if len(per_source) == 1:
    mixed = per_source[0]
  elif concatenate:
    mixed = grain.MapDataset.concatenate(per_source)
  else:
    mixed = grain.MapDataset.mix(per_source, [s.weight for s in config.sources])
  examples = _NextTokenDataset(
      mixed.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=4 * config.batch_size)),
      config.seq_len, config.overlength, _stat_names(loaded),
      [-(-len(s) // shard.shard_count) for s in loaded])
  if config.packing:
    # One packing group = batch_size rows, so a group is one batch and leakage across
    # groups (hence across checkpoints) is bounded. Bins are not shuffled: the examples
    # already are, and unshuffled rows keep the per-source interleaving visible.
    rows = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={k: config.seq_len for k in _FEATURES},
        num_packing_bins=config.batch_size, shuffle_bins=False).map(_packed_row)
  else:
    rows = examples.map(lambda x: _pad_example(x, config.seq_len))
  batches = rows.batch(config.batch_size, drop_remainder=config.drop_remainder)
  if config.prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=config.prefetch_batches)
  return batches


def _close_and_release(holder: list[Any]) -> None:
  while holder:
    holder.pop().close()


def _find_stage(dataset: grain.IterDataset | grain.MapDataset) -> _NextTokenDataset | None:
  if isinstance(dataset, _NextTokenDataset):
    return dataset
  for parent in dataset.parents:
    if (found := _find_stage(parent)) is not None:
      return found
  return None


def _find_counts(state: Any) -> list[list[int]] | None:
  if isinstance(state, dict):
    if _COUNTS_KEY in state:
      return state[_COUNTS_KEY]
    children = state.values()
  elif isinstance(state, (list, tuple)):
    children = state
  else:
    return None
  for child in children:
    if (found := _find_counts(child)) is not None:
      return found
  return None


def _concat_rows(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  if len(parts) == 1:
    return parts[0]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class PipelineIterator:
  """This process's rows of every global batch (dicts of numpy arrays), with
  get_state/set_state over all logical shards and data stats."""

  def __init__(self, datasets: Sequence[grain.IterDataset], loaded: Sequence[sources_lib.Source],
               fingerprint: str, layout: ShardLayout) -> None:
    # The grain iterators (one per owned shard) live only in this list, so that closing can
    # also release them. At interpreter exit, `weakref.finalize` stops the prefetch threads
    # and frees the iterators while modules still exist; grain's own __del__ would otherwise
    # run during teardown and print ignored exceptions.
    self._holder = [iter(d) for d in datasets]
    self._closer = weakref.finalize(self, _close_and_release, self._holder)
    self._stages = [_find_stage(d) for d in datasets]
    self._exhausted = False
    self._sources = tuple(loaded)
    self._fingerprint = fingerprint
    self.layout = layout

  @property
  def _iterators(self) -> list[grain.DatasetIterator]:
    if not self._holder:
      raise ValueError("the data iterator is closed")
    return self._holder

  def __iter__(self) -> PipelineIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      # Finite epochs: the batch ends with the first shard that runs out.
      return _concat_rows([next(it) for it in self._iterators])
    except StopIteration:
      self._exhausted = True
      if any(self.stats.total(k) for k in COUNTERS[1:]):
        logging.warning("data: end of input; %s", self.stats.summary())
      raise

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state (version, config fingerprint, every shard's grain state)
    for `set_state`. With several processes this gathers every process's shards, so every
    process must call it at the same point (the train loop does, at each checkpoint)."""
    local = {str(shard): it.get_state()
             for shard, it in zip(self.layout.owned, self._iterators)}
    shards: dict[str, Any] = {}
    for part in multihost.gather_objects([local]):
      shards.update(part)
    return {"version": _STATE_VERSION, "fingerprint": self._fingerprint,
            "num_shards": self.layout.shards, "shards": shards}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` dict, exactly when the data config and data are unchanged.

    Each process takes its own shards' states, so the saving run may have had another
    process count. A state saved with a different config or data is applied with a warning;
    one with another number of logical shards, of another version, or not a state at all
    raises ValueError.
    """
    if isinstance(state, dict) and state.get("version") == 1 and "grain" in state:
      # The single-host pipeline before logical shards: its one state is shard 0 of 1.
      state = {**state, "version": _STATE_VERSION, "num_shards": 1,
               "shards": {"0": state["grain"]}}
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
      raise ValueError(f"not a data iterator state of version {_STATE_VERSION}: "
                       f"{str(state)[:200]}")
    shards = state.get("shards") or {}
    if state.get("num_shards") != self.layout.shards or len(shards) != self.layout.shards:
      raise ValueError(
          f"the data iterator state was saved with {state.get('num_shards')} logical data "
          f"shards, this run has {self.layout.shards} (data.shards="
          f"{self.layout.shards if self.layout.shards != self.layout.process_count else 0} "
          f"over {self.layout.process_count} process(es)); resume with "
          f"--config.data.shards={state.get('num_shards')} on a process count that divides it")
    if state.get("fingerprint") != self._fingerprint:
      logging.warning("resuming the data iterator from a state saved with a different data "
                      "config or data; batches will differ from the original run's")
    for shard, it in zip(self.layout.owned, self._iterators):
      it.set_state(shards[str(shard)])
    self._exhausted = False

  def _counts(self) -> np.ndarray:
    """Counters [source, counter] of this process's shards, summed."""
    total = np.zeros((len(self._sources), len(COUNTERS)), np.int64)
    for stage, it in zip(self._stages, self._iterators):
      if self._exhausted and stage is not None and stage.live is not None:
        # At the end the state lags by the examples dropped after the last one packed;
        # the consuming iterator has finished, so its own counts are final and exact.
        counts = stage.live.get_state()[_COUNTS_KEY]
      else:
        counts = _find_counts(it.get_state())
      if counts is not None:
        total += np.asarray(counts, np.int64)
    return total

  def _stats(self, counts: np.ndarray) -> DataStats:
    return DataStats({
        name: {**dict(zip(COUNTERS, map(int, c))), "skipped_malformed": len(s.skipped)}
        for name, s, c in zip(_stat_names(self._sources), self._sources, counts)})

  @property
  def stats(self) -> DataStats:
    """Counters of this process's shards as of the batches returned so far (see the module
    docstring); `skipped_malformed` counts the whole source (every process loads it)."""
    return self._stats(self._counts())

  def global_stats(self) -> DataStats:
    """`stats` summed over all processes (a collective: every process must call it)."""
    return self._stats(np.asarray(multihost.global_sum(self._counts())))

  def close(self) -> None:
    """Stops the prefetch threads and releases the grain iterators; later use raises
    ValueError."""
    self._closer()


def _load(config: PipelineConfig) -> list[sources_lib.Source]:
  return [sources_lib.load_source(s.path, on_error=config.on_error) for s in config.sources]


def _fingerprint(config: PipelineConfig, loaded: Sequence[sources_lib.Source],
                 layout: ShardLayout) -> str:
  # Settings that do not change which global batches come out are left out (the process
  # count among them: the logical shards fix the batches).
  fields = dataclasses.asdict(config)
  for key in ("read_threads", "prefetch_batches", "on_error"):
    fields.pop(key)
  fields["lengths"] = [len(s) for s in loaded]
  fields["shards"] = layout.shards
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _shard_config(config: PipelineConfig, layout: ShardLayout) -> PipelineConfig:
  return dataclasses.replace(config, batch_size=config.batch_size // layout.shards)


def build_pipeline(config: PipelineConfig, tokenizer: Tokenizer, *,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> PipelineIterator:
  """The training iterator: this process's rows of every global batch of
  `config.batch_size` rows of `seq_len` (all of them on one process).

  `process_index` / `process_count` default to the JAX process's; tests pass them to build
  one process's view.
  """
  layout = shard_layout(config, process_index=process_index, process_count=process_count)
  loaded = _load(config)
  shard_config = _shard_config(config, layout)
  datasets = [_dataset(shard_config, loaded, tokenizer,
                       grain.sharding.ShardOptions(shard, layout.shards))
              for shard in layout.owned]
  return PipelineIterator(datasets, loaded, _fingerprint(config, loaded, layout), layout)


def _eval_batches(config: PipelineConfig, loaded: Sequence[sources_lib.Source],
                  tokenizer: Tokenizer, shard: grain.sharding.ShardOptions,
                  limit: int | None) -> list[dict[str, np.ndarray]]:
  batches = []
  for batch in _dataset(config, loaded, tokenizer, shard, concatenate=True):
    if limit is not None and len(batches) == limit:
      break
    batches.append(batch)
  return batches


def _empty_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  return {k: np.pad(v, [(0, rows)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def make_eval_batches(config: PipelineConfig, tokenizer: Tokenizer,
                      num_batches: int | None = None, *, process_index: int | None = None,
                      process_count: int | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed, finite list of evaluation batches from `config.sources` (a held-out set):
  this process's rows of each global batch of `config.batch_size` rows.

  Per logical shard: one pass over each source in order (concatenated, not mixed; weights
  are ignored), no shuffling, packed or padded as configured; at most `num_batches` batches
  per shard (None: all). Short batches are filled up with empty rows (loss_mask 0), so every
  batch has the same shape, and every process returns the same number of batches (needed
  for the collective eval step): the count of the longest shard, which each process works
  out by itself; a shard that runs out first contributes empty rows.
  """
  if num_batches is not None and num_batches < 1:
    raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
  layout = shard_layout(config, process_index=process_index, process_count=process_count,
                        batch_field="data.eval_batch_size")
  config = dataclasses.replace(_shard_config(config, layout), num_epochs=1, shuffle=False,
                               drop_remainder=False, prefetch_batches=0)
  loaded = _load(config)
  per_shard = [_eval_batches(config, loaded, tokenizer,
                             grain.sharding.ShardOptions(shard, layout.shards), num_batches)
               for shard in range(layout.shards)]
  target = max(len(b) for b in per_shard)
  if not target:
    raise ValueError(f"evaluation sources {[s.path for s in config.sources]} yield no batches")
  template = next(b[0] for b in per_shard if b)
  empty = {k: np.zeros((config.batch_size,) + v.shape[1:], v.dtype) for k, v in template.items()}
  out = []
  for i in range(target):
    parts = [_empty_rows(per_shard[s][i], config.batch_size - len(per_shard[s][i]["input_ids"]))
             if i < len(per_shard[s]) else empty for s in layout.owned]
    out.append(_concat_rows(parts))
  return out
