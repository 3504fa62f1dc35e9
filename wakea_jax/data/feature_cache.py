"""Stored encoder features of a media source: one memmapped row per record, looked up by index.

With a frozen tower (`config.media.cache_features`, train/cached_features.py) the tower's
output for a record never changes, so it is computed once and the batches carry it instead of
the pixels / log-mels. This module is the host side: the files, what identifies them, and
reading a record's row.

A split (`train`, `eval`) in a cache directory is three files:

  {split}.features.npy   float32 [records, k, T, D]  the tower's output per media slot
  {split}.mask.npy       int32   [records, k]        image_mask (vision), or
                                 [records, k, T]     audio_tower_mask: real tokens (audio)
  {split}.json           {"records", "kind", ...}    written last: its presence marks the
                                                     split complete

Row i belongs to the source's record i (the pipeline visits records by index, so a grain
resume maps to the same rows). Each file is written under a temporary name and renamed into
place, so a crash never leaves a half-written split that looks complete. The directory's name
is a fingerprint of everything the features depend on (the caller hashes the encoder's
parameters and the preprocessing; `source_fingerprint` covers the records file(s) and every
media file they name), so a changed encoder or dataset gets a fresh directory.

Features are stored as float32: a bfloat16 tower output converts exactly, and the projector
casts its input to its own dtype as it does the tower's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from wakea_jax.data import dataset_dirs
from wakea_jax.data.multimodal import MultimodalSource

FEATURE_KEYS = {"vision": ("image_tower_features", "image_mask"),
                "audio": ("audio_tower_features", "audio_tower_mask")}
FORMAT_VERSION = 1


def _stat(path: pathlib.Path) -> list[Any]:
  info = path.stat()
  return [os.fspath(path.resolve()), info.st_size, info.st_mtime_ns]


def source_fingerprint(source: MultimodalSource) -> dict[str, Any]:
  """What a source's features depend on, as JSON: the records file(s) (path, size, mtime;
  every file under a `datasets` directory), the record count and each media item (a file's
  path, size and mtime, or the sha256 of stored bytes)."""
  path, _ = dataset_dirs.split_spec(source.name)
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  media = hashlib.sha256()
  for record in source.records:
    for field in ("images", "audios"):
      for ref in record.get(field) or []:
        if isinstance(ref, str):
          media.update(json.dumps(_stat(pathlib.Path(ref))).encode())
        else:
          media.update(hashlib.sha256(ref["bytes"]).digest())
      media.update(b"|")
  return {"spec": source.name, "files": [_stat(p) for p in files],
          "records": len(source.records), "media": media.hexdigest()}


def fingerprint(parts: Mapping[str, Any]) -> str:
  """A short hex digest of JSON-able `parts` (the cache directory's name)."""
  text = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class CachedFeatures:
  """One split's stored features; `row(i)` is record i's arrays (the batch keys of
  `FEATURE_KEYS[kind]`). Opens the files memory-mapped on first use, so it pickles small
  (grain workers open their own maps)."""

  directory: str
  split: str
  kind: str
  records: int

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    opened = self.__dict__.get("_opened")
    if opened is None:
      base = pathlib.Path(self.directory)
      opened = (np.load(base / f"{self.split}.features.npy", mmap_mode="r"),
                np.load(base / f"{self.split}.mask.npy", mmap_mode="r"))
      object.__setattr__(self, "_opened", opened)
    return opened

  def __getstate__(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    for name, value in state.items():
      object.__setattr__(self, name, value)

  def row(self, index: int) -> dict[str, np.ndarray]:
    """Record `index`'s features [k, T, D] (float32) and mask (int32)."""
    if not 0 <= index < self.records:
      raise IndexError(f"record {index} is not in the cached {self.split} split "
                       f"({self.records} records) in {self.directory}")
    features, mask = self._arrays()
    keys = FEATURE_KEYS[self.kind]
    return {keys[0]: np.array(features[index]), keys[1]: np.array(mask[index])}

  def token_counts(self, index: int) -> np.ndarray:
    """Placeholder tokens of record `index`'s clips [k] (audio: real tokens per slot)."""
    return np.asarray(self._arrays()[1][index], np.int64).sum(-1)


def open_split(directory: str | os.PathLike[str], split: str, records: int
               ) -> CachedFeatures | None:
  """The complete split `split` in `directory` (None when absent or unfinished). Raises
  ValueError naming the file when it holds another number of records than the source."""
  base = pathlib.Path(directory)
  meta_path = base / f"{split}.json"
  if not meta_path.is_file():
    return None
  meta = json.loads(meta_path.read_text())
  if meta["records"] != records:
    raise ValueError(f"{meta_path}: the cached split has {meta['records']} records, the source "
                     f"{records}; delete {base} to rebuild it")
  return CachedFeatures(os.fspath(base), split, meta["kind"], records)


class SplitWriter:
  """Writes one split, chunk by chunk, into temporary memmaps; `finish` renames them into
  place and writes the `.json` marker last."""

  def __init__(self, directory: str | os.PathLike[str], split: str, kind: str, records: int,
               feature_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> None:
    self.base = pathlib.Path(directory)
    self.base.mkdir(parents=True, exist_ok=True)
    self.split, self.kind, self.records = split, kind, records
    tag = f".tmp{os.getpid()}"
    self._paths = {name: (self.base / f"{split}.{name}.npy{tag}", self.base / f"{split}.{name}.npy")
                   for name in ("features", "mask")}
    self._features = np.lib.format.open_memmap(self._paths["features"][0], mode="w+",
                                               dtype=np.float32,
                                               shape=(records,) + tuple(feature_shape))
    self._mask = np.lib.format.open_memmap(self._paths["mask"][0], mode="w+", dtype=np.int32,
                                           shape=(records,) + tuple(mask_shape))

  def write(self, start: int, features: np.ndarray, mask: np.ndarray) -> None:
    """Rows [start, start + len) (rows past the split's end are dropped: batch padding)."""
    n = max(0, min(len(features), self.records - start))
    self._features[start:start + n] = features[:n]
    self._mask[start:start + n] = mask[:n]

  def finish(self, meta: Mapping[str, Any]) -> CachedFeatures:
    """Flushes, renames the files into place, writes `{split}.json`; the opened split."""
    self._features.flush()
    self._mask.flush()
    del self._features, self._mask
    for temporary, final in self._paths.values():
      os.replace(temporary, final)
    marker = self.base / f"{self.split}.json"
    temporary = marker.with_name(marker.name + f".tmp{os.getpid()}")
    temporary.write_text(json.dumps({"records": self.records, "kind": self.kind, **meta},
                                    indent=2, default=str) + "\n")
    os.replace(temporary, marker)
    return CachedFeatures(os.fspath(self.base), self.split, self.kind, self.records)

  def abort(self) -> None:
    """Removes the temporary files (after a failure)."""
    for temporary, _ in self._paths.values():
      temporary.unlink(missing_ok=True)


__all__ = ["CachedFeatures", "FEATURE_KEYS", "FORMAT_VERSION", "SplitWriter", "fingerprint",
           "open_split", "source_fingerprint"]
