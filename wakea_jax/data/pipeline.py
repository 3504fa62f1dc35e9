"""grain input pipeline: sources -> shuffle -> chat tokenisation -> mixture -> packing -> batches.

    per source: MapDataset.source -> shard by JAX process -> shuffle(seed) -> repeat(epochs)
                -> map(chat.render)
    MapDataset.mix(sources, weights) -> to_iter_dataset (read threads)
    -> next-token inputs + over-length policy (counted)
    -> FirstFitPackIterDataset (packing on) or pad each example (packing off)
    -> batch -> thread prefetch

Batches are dicts of numpy arrays [batch_size, seq_len] in the next-token convention: for
an example with token ids `ids` and assistant mask `mask` (from `chat.render`; for a
prompt/completion record whose prompt has assistant turns, zero up to the end of the prompt,
so only the completion is trained on, see sources.py)
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
source in `PipelineIterator.stats` and logged: a warning naming the first such example of
each source (file:line), then a summary each time the total doubles. The counts are part of
the iterator state, so they are exact and resume with it; they cover the examples of all
batches returned so far, up to one packing group (batch_size rows) behind.

Exact resume. `it.get_state()` is a JSON-serialisable dict (grain's iterator state, which
is a few integers per stage, plus the counters). `set_state(state)` on an iterator built
from the same config and data continues with exactly the batches the original would have
produced. A state from a different config is applied anyway (with a warning), because
changing the mixture mid-run is legitimate; the batches then differ.

Multi-host. With `shard_by_process` each source is sliced by `grain.sharding.
ShardByJaxProcess` (records `process_index::process_count`) before shuffling, and every
process yields its own per-host batch of `batch_size` rows; the global batch is
`batch_size * process_count` (see `wakea_jax.parallel.mesh.shard_batch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from wakea_jax.data import chat
from wakea_jax.data import sources as sources_lib
from wakea_jax.data.config import ON_ERROR, OVERLENGTH, DataConfig
from wakea_jax.data.tokenizer import Tokenizer

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
# Per-source counters kept in the iterator state; "examples" counts tokenised examples
# that reached the packer (or the padder), before the over-length policy.
COUNTERS = ("examples", "truncated", "dropped_overlength", "dropped_no_target")
_EXAMPLES, _TRUNCATED, _DROPPED_OVERLENGTH, _DROPPED_NO_TARGET = range(len(COUNTERS))
_COUNTS_KEY = "wakea_counts"
_STATE_VERSION = 1
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
  batch_size: int  # per host
  seed: int = 0  # shuffle seed
  shuffle: bool = True
  packing: bool = True
  overlength: str = "truncate"  # or "drop"; counted either way
  num_epochs: int | None = None  # None: repeat forever (training)
  drop_remainder: bool = True  # a final partial batch (finite epochs only)
  shard_by_process: bool = True  # each JAX process reads its own slice of every source
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


def _shard_options(config: PipelineConfig) -> grain.sharding.ShardOptions:
  if config.shard_by_process:
    return grain.sharding.ShardByJaxProcess()
  return grain.sharding.NoSharding()


def _stat_names(loaded: Sequence[sources_lib.Source]) -> list[str]:
  """Source names as stats keys; a source listed twice gets its position appended."""
  names = [s.name for s in loaded]
  return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _shuffle_seed(seed: int, source_index: int) -> int:
  # A distinct, well-mixed 32-bit seed per (seed, source): nearby seeds give unrelated orders.
  return int(np.random.SeedSequence([seed, source_index]).generate_state(1)[0])


def _dataset(config: PipelineConfig, loaded: Sequence[sources_lib.Source], tokenizer: Tokenizer,
             shard: grain.sharding.ShardOptions, *, concatenate: bool = False
             ) -> grain.IterDataset:
  per_source = []
  for i, source in enumerate(loaded):
    ds = grain.MapDataset.source(source)
    if shard.shard_count > 1:
      if len(source) < shard.shard_count:
        raise ValueError(f"{source.name}: {len(source)} records cannot be sharded over "
                         f"{shard.shard_count} processes")
      ds = ds[shard.shard_index::shard.shard_count]
    if config.shuffle:
      ds = ds.shuffle(seed=_shuffle_seed(config.seed, i))
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
  if holder:
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


class PipelineIterator:
  """Batches (dicts of numpy arrays), with get_state/set_state and data stats."""

  def __init__(self, dataset: grain.IterDataset, loaded: Sequence[sources_lib.Source],
               fingerprint: str) -> None:
    # The grain iterator lives only in this one-element list, so that closing can also
    # release it. At interpreter exit, `weakref.finalize` stops the prefetch thread and
    # frees the iterators while modules still exist; grain's own __del__ would otherwise
    # run during teardown and print ignored exceptions.
    self._holder = [iter(dataset)]
    self._closer = weakref.finalize(self, _close_and_release, self._holder)
    self._stage = _find_stage(dataset)
    self._exhausted = False
    self._sources = tuple(loaded)
    self._fingerprint = fingerprint

  @property
  def _iterator(self) -> grain.DatasetIterator:
    if not self._holder:
      raise ValueError("the data iterator is closed")
    return self._holder[0]

  def __iter__(self) -> PipelineIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._iterator)
    except StopIteration:
      self._exhausted = True
      if any(self.stats.total(k) for k in COUNTERS[1:]):
        logging.warning("data: end of input; %s", self.stats.summary())
      raise

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state (version, config fingerprint, grain's state) for `set_state`."""
    return {"version": _STATE_VERSION, "fingerprint": self._fingerprint,
            "grain": self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a `get_state()` dict, exactly when the data config and data are unchanged.

    A state saved with a different config or data is applied with a warning; one of another
    version (or not a state at all) raises ValueError.
    """
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
      raise ValueError(f"not a data iterator state of version {_STATE_VERSION}: "
                       f"{str(state)[:200]}")
    if state.get("fingerprint") != self._fingerprint:
      logging.warning("resuming the data iterator from a state saved with a different data "
                   "config or data; batches will differ from the original run's")
    self._iterator.set_state(state["grain"])
    self._exhausted = False

  @property
  def stats(self) -> DataStats:
    """Counters as of the batches returned so far (see the module docstring)."""
    if self._exhausted and self._stage is not None and self._stage.live is not None:
      # At the end the state lags by the examples dropped after the last one packed;
      # the consuming iterator has finished, so its own counts are final and exact.
      counts = self._stage.live.get_state()[_COUNTS_KEY]
    else:
      counts = _find_counts(self._iterator.get_state()) or [[0] * len(COUNTERS)] * len(
          self._sources)
    return DataStats({
        name: {**dict(zip(COUNTERS, map(int, c))), "skipped_malformed": len(s.skipped)}
        for name, s, c in zip(_stat_names(self._sources), self._sources, counts)})

  def close(self) -> None:
    """Stops the prefetch thread and releases the grain iterator; later use raises ValueError."""
    self._closer()


def _load(config: PipelineConfig) -> list[sources_lib.Source]:
  return [sources_lib.load_source(s.path, on_error=config.on_error) for s in config.sources]


def _fingerprint(config: PipelineConfig, loaded: Sequence[sources_lib.Source],
                 shard: grain.sharding.ShardOptions) -> str:
  # Settings that do not change which batches come out are left out.
  fields = dataclasses.asdict(config)
  for key in ("read_threads", "prefetch_batches", "on_error"):
    fields.pop(key)
  fields["lengths"] = [len(s) for s in loaded]
  fields["shard"] = [shard.shard_index, shard.shard_count]
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_pipeline(config: PipelineConfig, tokenizer: Tokenizer) -> PipelineIterator:
  """The training iterator: per-host batches of `config.batch_size` rows of `seq_len`."""
  loaded = _load(config)
  shard = _shard_options(config)
  return PipelineIterator(_dataset(config, loaded, tokenizer, shard), loaded,
                          _fingerprint(config, loaded, shard))


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
                      num_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed, finite list of evaluation batches from `config.sources` (a held-out set).

  One pass over each source in order (concatenated, not mixed; weights are ignored), no
  shuffling, packed or padded as configured; at most `num_batches` batches (None: all).
  The last batch is filled up with empty rows (loss_mask 0), so every batch has the same
  shape. With several processes every process returns the same number of batches (needed
  for the collective eval step): a process whose shard runs out first gets batches of empty
  rows, computed from every shard's size, which each process can work out by itself.
  """
  if num_batches is not None and num_batches < 1:
    raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
  config = dataclasses.replace(config, num_epochs=1, shuffle=False, drop_remainder=False,
                               prefetch_batches=0)
  loaded = _load(config)
  shard = _shard_options(config)
  batches = _eval_batches(config, loaded, tokenizer, shard, num_batches)
  if not batches:
    raise ValueError(f"evaluation sources {[s.path for s in config.sources]} yield no batches")
  target = len(batches)
  if shard.shard_count > 1:
    for index in range(shard.shard_count):
      if index != shard.shard_index:
        other = grain.sharding.ShardOptions(index, shard.shard_count)
        target = max(target, len(_eval_batches(config, loaded, tokenizer, other, num_batches)))
  batches = [_empty_rows(b, config.batch_size - len(b["input_ids"])) for b in batches]
  empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
  return batches + [empty] * (target - len(batches))
