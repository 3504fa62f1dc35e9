"""Batches of multimodal examples for the train step, in the per-row media layout.

One example per row, padded to `seq_len`, or with `packing` several: the token arrays of pipeline.py
(`input_ids`, `targets`, `loss_mask`, `segment_ids`, `positions`) plus the media arrays of
`models/media.py` (`pixel_values` [B, k, 3, H, W] + `image_mask` [B, k] with k =
`max_images`; `input_features` [B, k, mels, F] + `feature_attention_mask` [B, k, F] with k =
`max_audios`). Every shape is fixed, so the step compiles once. Given a split's
`CachedFeatures` (data/feature_cache.py), rows carry the stored tower output instead
(`image_tower_features` + `image_mask`, or `audio_tower_features` + `audio_tower_mask`),
looked up by the record's index, and the media are not decoded at all.

Media are decoded in grain's map (`MediaRows`), so with `worker_count > 0` they decode in
worker processes. The iterator is grain's: `get_state()` / `set_state()` resume exactly (the
position in a seeded shuffle over repeated epochs). Each process reads every
`process_count`-th record from `process_index` on, and its `batch_size` rows are its share of
the global batch.

Packing (`packing=True`, `data.packing`): grain's first-fit packer fills each row with whole
examples while their tokens fit `seq_len` and their media items fit the row's slots
(`max_images` / `max_audios` now cap a row, not an example); every feature is packed along
its first axis, so a row's media items are its examples' items in segment order, which is
the order `scatter_media` fills placeholders in, and `segment_ids` keep the examples'
attention apart. Every packed row is checked with `check_media_placement(segment_ids=)`: an
item whose placeholders would fall in another example's segment is an error, never a silent
leak. Off by default: the tasks here are short and padding costs little next to the
encoder; it pays when examples are much shorter than `seq_len`. An example longer than
`seq_len` is an error naming its record (cutting it could cut a placeholder run), or dropped
and counted with `overlength="drop"`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from wakea_jax.data.feature_cache import CachedFeatures
from wakea_jax.data.multimodal import (
    MediaConfig,
    MultimodalSource,
    audio_token_counts,
    to_model_inputs,
    tokenize_item,
)
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.models.multimodal import check_media_placement

TOKEN_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class MediaBatchConfig:
  """How examples become rows and batches (see the module docstring)."""

  seq_len: int
  batch_size: int                    # rows per batch on this process
  max_images: int = 0                # image slots per row (0: the run has no images)
  max_audios: int = 0                # clip slots per row
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None      # None: repeat forever (training)
  overlength: str = "error"          # or "drop"
  packing: bool = False              # several examples per row (module docstring)
  worker_count: int = 0              # grain worker processes decoding media
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self) -> None:
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"MediaBatchConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_images < 0 or self.max_audios < 0:
      raise ValueError("MediaBatchConfig.max_images / max_audios must be >= 0")
    if self.overlength not in ("error", "drop"):
      raise ValueError(f"overlength must be 'error' or 'drop', got {self.overlength!r}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")


def example_row(inputs: Mapping[str, Any], config: MediaBatchConfig, media: MediaConfig,
                cached: Mapping[str, np.ndarray] | None = None
                ) -> dict[str, np.ndarray] | None:
  """`to_model_inputs`' output -> one fixed-shape row; None when it is over-length and
  `overlength="drop"`. With `cached` (the record's `CachedFeatures.row`), `inputs` need only
  the tokens and the row carries the cached features instead of the media. Raises ValueError
  naming the record for too many media items, an over-length example, or placeholders that
  do not match the media."""
  where = inputs.get("origin", "<record>")
  ids = np.asarray(inputs["input_ids"], np.int32)
  mask = np.asarray(inputs["loss_mask"], np.float32)
  n = len(ids) - 1
  if n > config.seq_len:
    if config.overlength == "drop":
      return None
    raise ValueError(f"{where}: the example has {n + 1} tokens (media placeholders included), "
                     f"more than data.seq_len + 1 = {config.seq_len + 1}; raise seq_len or "
                     "set overlength='drop'")
  pad = config.seq_len - n
  row = {"input_ids": np.pad(ids[:-1], (0, pad)), "targets": np.pad(ids[1:], (0, pad)),
         "loss_mask": np.pad(mask[1:], (0, pad)),
         "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
         "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad))}
  if cached is None:
    row.update(media_slots(inputs, media, where, images=config.max_images,
                           audios=config.max_audios))
  else:
    row.update(cached)
  check_row(row, media)
  return row


def check_row(row: Mapping[str, np.ndarray], media: MediaConfig) -> None:
  """`check_media_placement` of one row (padded or packed): every image / clip fills exactly
  its own placeholders, inside one segment (ValueError otherwise)."""
  ids, segments = row["input_ids"][None], row["segment_ids"][None]
  if media.image is not None:
    check_media_placement(ids, media.image_token_id,
                          [media.image_tokens] * int(np.asarray(row["image_mask"]).sum()),
                          segment_ids=segments, what="image")
  if media.audio is not None:
    if "audio_tower_mask" in row:
      counts = np.asarray(row["audio_tower_mask"], np.int64).sum(-1)
    else:   # the clips of the slots that hold one
      frames = np.asarray(row["feature_attention_mask"], np.int32)
      counts = audio_token_counts(frames[frames.any(-1)], media)
    check_media_placement(ids, media.audio_token_id, counts[counts > 0], segment_ids=segments,
                          what="audio")


def _real_items(row: Mapping[str, np.ndarray]) -> int:
  """How many of a padded row's media slots hold an item (they come first)."""
  for key in ("image_mask", "audio_tower_mask", "feature_attention_mask"):
    if key in row:
      mask = np.asarray(row[key])
      return int((mask.reshape(len(mask), -1).sum(-1) > 0).sum())
  return 0


def example_item(inputs: Mapping[str, Any], config: MediaBatchConfig, media: MediaConfig,
                 cached: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray] | None:
  """One example as the packer takes it: `example_row`'s arrays (checked the same way)
  without the padding: tokens [n], media items [k, ...] for its k real items only."""
  row = example_row(inputs, config, media, cached)
  if row is None:
    return None
  n = int(row["segment_ids"].sum())
  out = {key: row[key][:n] for key in ("input_ids", "targets", "loss_mask")}
  k = _real_items(row)
  out.update({key: value[:k] for key, value in row.items() if key not in TOKEN_KEYS})
  return out


def _packed_row(row: dict[str, np.ndarray], media: MediaConfig) -> dict[str, np.ndarray]:
  """The packer's output -> a row: the tokens' own segment ids and positions (the media
  features' are dropped), checked."""
  out = {key: value for key, value in row.items()
         if not key.endswith(("_segment_ids", "_positions"))}
  out["segment_ids"] = row["input_ids_segment_ids"].astype(np.int32)
  out["positions"] = row["input_ids_positions"].astype(np.int32)
  out["loss_mask"] = out["loss_mask"].astype(np.float32)
  check_row(out, media)
  return out


def media_slots(inputs: Mapping[str, Any], media: MediaConfig, where: str, *, images: int,
                audios: int, setting: str = "data.max_{field}") -> dict[str, np.ndarray]:
  """One example's decoded media (`to_model_inputs`' arrays) laid out in fixed slots, as
  every objective's rows carry them: `pixel_values` [images, 3, H, W] + `image_mask`
  [images], `input_features` [audios, mels, F] + `feature_attention_mask` [audios, F],
  zero-padded (only the fields of the modalities `media` enables). Raises ValueError naming
  the record, the field and the `setting` that caps it when there are more items than slots."""
  out: dict[str, np.ndarray] = {}
  if media.image is not None:
    out["pixel_values"], out["image_mask"] = _slots(
        np.asarray(inputs["pixel_values"], np.float32), images, "images", where, setting)
  if media.audio is not None:
    out["input_features"], _ = _slots(np.asarray(inputs["input_features"], np.float32),
                                      audios, "audios", where, setting)
    out["feature_attention_mask"], _ = _slots(
        np.asarray(inputs["feature_attention_mask"], np.int32), audios, "audios", where,
        setting)
  return out


def _slots(items: np.ndarray, slots: int, field: str, where: str, setting: str
           ) -> tuple[np.ndarray, np.ndarray]:
  """items [n, ...] -> ([slots, ...] zero-padded, mask [slots] int32)."""
  if len(items) > slots:
    raise ValueError(f"{where}: field '{field}' has {len(items)} item(s), more than the "
                     f"{slots} slot(s) per row ({setting.format(field=field)})")
  out = np.zeros((slots,) + items.shape[1:], items.dtype)
  out[:len(items)] = items
  mask = np.zeros((slots,), np.int32)
  mask[:len(items)] = 1
  return out, mask


class MediaRows(grain.transforms.Map):
  """A `MultimodalSource` item -> a fixed-shape row (decoding its media, or with `cached`
  taking its record's stored features by `record_index`), or None."""

  def __init__(self, tokenizer: Tokenizer, media: MediaConfig, config: MediaBatchConfig,
               cached: CachedFeatures | None = None):
    self.tokenizer, self.media, self.config, self.cached = tokenizer, media, config, cached
    # Packing takes unpadded examples; the packer pads its rows.
    self.make = example_item if config.packing else example_row

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """One source item -> one row (or, packing, one unpadded example)."""
    if self.cached is None:
      return self.make(to_model_inputs(element, self.tokenizer, self.media), self.config,
                       self.media)
    index = element["record_index"]
    counts = (self.cached.token_counts(index)[:len(element.get("audios") or [])]
              if self.media.audio is not None else ())
    inputs = tokenize_item(element, self.tokenizer, self.media, audio_token_counts=counts)
    inputs["origin"] = element.get("origin", "<record>")
    return self.make(inputs, self.config, self.media, self.cached.row(index))


class _WithIndex(grain.transforms.MapWithIndex):
  """Adds the item's record index. Grain hands a source the index of the repeated, shuffled
  sequence (the source wraps it), so it is taken modulo the record count here."""

  def __init__(self, records: int) -> None:
    self.records = records

  def map_with_index(self, index: int, element: Mapping[str, Any]) -> dict[str, Any]:
    """`element` with "record_index"."""
    return {**element, "record_index": index % self.records}


def _dataset(source: MultimodalSource, tokenizer: Tokenizer, media: MediaConfig,
             config: MediaBatchConfig, *, drop_remainder: bool,
             cached: CachedFeatures | None = None) -> grain.IterDataset:
  if media.image is not None and config.max_images < 1:
    raise ValueError("the run reads images: set data.max_images (image slots per row) >= 1")
  if media.audio is not None and config.max_audios < 1:
    raise ValueError("the run reads audio: set data.max_audios (clip slots per row) >= 1")
  ds = grain.MapDataset.source(source)
  if cached is not None:
    # Before any slicing or shuffle, so the index is the record's: its row in the cache.
    ds = ds.map_with_index(_WithIndex(len(source)))
  if config.process_count > 1:
    ds = ds[config.process_index::config.process_count]
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(config.num_epochs)
  out = ds.map(MediaRows(tokenizer, media, config, cached)).to_iter_dataset()
  out = out.filter(lambda row: row is not None)
  if config.packing:
    # One packing group = one batch of rows, as in the text pipeline (pipeline.py).
    lengths = {key: config.seq_len for key in ("input_ids", "targets", "loss_mask")}
    if media.image is not None:
      lengths.update(dict.fromkeys(("image_tower_features" if cached is not None
                                    else "pixel_values", "image_mask"), config.max_images))
    if media.audio is not None:
      lengths.update(dict.fromkeys(
          ("audio_tower_features", "audio_tower_mask") if cached is not None
          else ("input_features", "feature_attention_mask"), config.max_audios))
    out = grain.experimental.FirstFitPackIterDataset(
        out, length_struct=lengths, num_packing_bins=config.batch_size,
        shuffle_bins=False).map(functools.partial(_packed_row, media=media))
  out = out.batch(config.batch_size, drop_remainder=drop_remainder)
  if config.worker_count:
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
  return out


class MediaBatchIterator:
  """Resumable iterator of host batches (train/supervised.BatchIterator)."""

  def __init__(self, source: MultimodalSource, tokenizer: Tokenizer, media: MediaConfig,
               config: MediaBatchConfig, cached: CachedFeatures | None = None) -> None:
    self.config = config
    self._iter = iter(_dataset(source, tokenizer, media, config, drop_remainder=True,
                               cached=cached))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> Any:
    """The grain iterator's position."""
    return self._iter.get_state()

  def set_state(self, state: Any) -> None:
    """Continues from a `get_state` position."""
    self._iter.set_state(state)


def eval_batches(source: MultimodalSource, tokenizer: Tokenizer, media: MediaConfig,
                 config: MediaBatchConfig, *, num_batches: int | None = None,
                 cached: CachedFeatures | None = None) -> list[dict[str, np.ndarray]]:
  """Every example once, in order, as batches; the last one filled with empty rows (loss
  mask 0, no media) so every batch has `batch_size` rows. `cached`: as MediaBatchIterator."""
  config = dataclasses.replace(config, shuffle=False, num_epochs=1)
  out: list[dict[str, np.ndarray]] = []
  for batch in _dataset(source, tokenizer, media, config, drop_remainder=False,
                        cached=cached):
    rows = len(batch["input_ids"])
    if rows < config.batch_size:
      batch = {k: np.concatenate([v, np.zeros((config.batch_size - rows,) + v.shape[1:],
                                              v.dtype)]) for k, v in batch.items()}
    out.append(batch)
    if num_batches is not None and len(out) >= num_batches:
      break
  return out


__all__ = ["MediaBatchConfig", "MediaBatchIterator", "MediaRows", "TOKEN_KEYS", "check_row",
           "eval_batches", "example_item", "example_row", "media_slots"]
