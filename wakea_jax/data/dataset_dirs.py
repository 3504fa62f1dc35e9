"""Rows of a local `datasets` directory, for the record readers of sources.py.

Two kinds of directory, told apart by their files:

  saved      written by `Dataset.save_to_disk` (has `state.json`) or
             `DatasetDict.save_to_disk` (has `dataset_dict.json`); read with
             `datasets.load_from_disk`, memory-mapped, nothing copied
  data folder  anything else: a Hub-style folder of data files (`data/train-00000-of-00001
             .parquet`, `train.jsonl`, `test.json`, ..., optionally a README.md whose YAML
             `configs:` names the files of each split), read with `datasets.load_dataset(DIR,
             streaming=True)`: rows stream from the files, no Arrow cache is written

Both stay local: a directory path never reaches the Hub (`load_dataset` only looks a name up
remotely when no such directory exists, and this module is only called on existing
directories), and `datasets` runs no code from the folder (loading scripts are refused).

A spec may choose the split and, for a data folder, the config: `DIR?split=test`,
`DIR?config=NAME&split=train`. Without `split`, a DatasetDict or a data folder gives its
"train" split, or its only split; with several splits and none named "train" the split must
be named. A single saved Dataset has no splits.

Locations are `DIR[ROW]` for a saved Dataset and `DIR[SPLIT][ROW]` otherwise, ROW being the
0-based row index (`load_from_disk(DIR)[SPLIT][ROW]` or `load_dataset(DIR, split=SPLIT)[ROW]`
finds the record).
"""

from __future__ import annotations

import os
import pathlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

OPTIONS = ("split", "config")
_BATCH_ROWS = 1024


def split_spec(spec: str | os.PathLike[str]) -> tuple[pathlib.Path, dict[str, str]]:
  """`DIR?split=..&config=..` -> (DIR, options); a path without a query -> (path, {}).

  A path that exists as written is never split at "?", so file names with "?" still work.
  """
  text = os.fspath(spec)
  if "?" not in text or os.path.exists(text):
    return pathlib.Path(text), {}
  base, _, query = text.rpartition("?")
  try:
    params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
  except ValueError:
    raise ValueError(f"{text}: malformed options {query!r}; use DIR?split=NAME") from None
  unknown = sorted(set(params) - set(OPTIONS))
  if unknown:
    raise ValueError(f"{text}: unknown option(s) {unknown}; a dataset directory takes "
                     f"{list(OPTIONS)}")
  options = {}
  for key, values in params.items():
    if len(values) != 1 or not values[0]:
      raise ValueError(f"{text}: option {key!r} must be given once, non-empty, got {values}")
    options[key] = values[0]
  return pathlib.Path(base), options


def is_saved(directory: pathlib.Path) -> bool:
  """Whether `directory` was written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
  return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def _choose_split(label: str, available: list[str], requested: str | None) -> str:
  if requested is not None:
    if requested not in available:
      raise ValueError(f"{label}: no split {requested!r}; splits: {available}")
    return requested
  if "train" in available:
    return "train"
  if len(available) == 1:
    return available[0]
  raise ValueError(f"{label}: splits {available} and none is 'train'; choose one with "
                   f"'{label}?split=NAME'")


def rows(directory: pathlib.Path, options: dict[str, str]) -> Iterator[tuple[str, Any]]:
  """(location, row as a dict, nulls kept) for each row of the chosen split.

  Raises ValueError (naming the directory) at once for a directory `datasets` cannot load
  or a split or config that does not exist, and while iterating for rows that cannot be
  read (a malformed data file in a streamed folder).
  """
  import datasets  # noqa: PLC0415  (slow to import; only directories need it)

  label = str(directory)
  split = options.get("split")
  if is_saved(directory):
    if "config" in options:
      raise ValueError(f"{label}: a directory saved with save_to_disk has no configs; drop "
                       "'config='")
    try:
      loaded = datasets.load_from_disk(str(directory))
    except Exception as err:  # datasets raises several types for a damaged directory
      raise ValueError(f"{label}: cannot load the saved dataset ({type(err).__name__}: "
                       f"{err})") from None
    if isinstance(loaded, datasets.DatasetDict):
      split = _choose_split(label, list(loaded), split)
      dataset, prefix = loaded[split], f"{label}[{split}]"
    else:
      if split is not None:
        raise ValueError(f"{label}: a Dataset saved with save_to_disk has no splits; drop "
                         "'split='")
      dataset, prefix = loaded, label
  else:
    try:
      # An absolute path, so that a folder named like a packaged builder ("json") is still
      # read as a folder; streaming, so that nothing is converted or cached.
      loaded = datasets.load_dataset(os.path.abspath(directory), name=options.get("config"),
                                     streaming=True)
    except Exception as err:  # no data files, bad README configs, a loading script, ...
      raise ValueError(f"{label}: cannot load the data folder with datasets.load_dataset "
                       f"({type(err).__name__}: {err})") from None
    split = _choose_split(label, list(loaded), split)
    dataset, prefix = loaded[split], f"{label}[{split}]"
  return _iterate(dataset, prefix)


def _iterate(dataset: Any, prefix: str) -> Iterator[tuple[str, Any]]:
  # Arrow batches -> plain Python rows: lists of message structs come back as lists of
  # dicts, whatever `datasets` feature type (List, Sequence) describes them.
  batches = iter(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS))
  index = 0
  while True:
    try:
      records = next(batches).to_pylist()
    except StopIteration:
      return
    except Exception as err:  # a malformed data file surfaces while streaming
      raise ValueError(f"{prefix}: cannot read rows from row {index} on ({type(err).__name__}: "
                       f"{err})") from None
    for row in records:
      yield f"{prefix}[{index}]", row
      index += 1
