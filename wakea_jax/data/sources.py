"""Training-data sources: local files, `datasets` directories and bundled task generators.

A source spec is one of (read locally, never from the Hub):
  FILE.jsonl   one record per line; blank lines are ignored
  FILE.json    one JSON list of records
  FILE.parquet one record per row (read with pyarrow)
  DIR          a `datasets` directory: saved with `save_to_disk` (a Dataset or a DatasetDict),
               or a Hub-style folder of data files (`data/train-00000-of-00001.parquet`,
               `train.jsonl`, ..., read with `datasets.load_dataset`, streaming, offline);
               `DIR?split=test` chooses the split, default "train" (see dataset_dirs.py)
  task:NAME?n=1000&seed=0   a bundled generator (below)

Record schemas (records.py has the rules; one example each):
  {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
  {"prompt": "2+2?", "completion": "4"}                             TRL standard
  {"prompt": [{"role": "user", "content": "2+2?"}],                 TRL conversational;
   "completion": [{"role": "assistant", "content": "4"}]}           completion-only loss
  {"prompt": "2+2?", "response": "4", "system": "Be brief."}
with optional "tools" (tool JSON schemas) and "system" (beside a string prompt). A string
prompt becomes a user turn and a string completion the assistant's reply: this stack trains
chat models. Only the completion is trained on, as in TRL; with "messages", every assistant
turn is.

Every record is validated when the source is loaded, so an error names the location and the
field: `data/x.jsonl:17: field 'completion[0].content' must be a string`. The location is
`path:LINE` for JSONL (1-based, as editors count), `path[INDEX]` for JSON and Parquet (the
0-based record index, as `records[INDEX]` would find it), and `DIR[SPLIT][ROW]` (`DIR[ROW]` for
a saved single Dataset) for a `datasets` directory. A malformed record raises by default; with
`on_error="skip_and_count"` it is logged with its location and counted in `Source.skipped`,
never dropped silently. A source that cannot be read at all (bad suffix, not a JSON list,
unreadable Parquet, a directory `datasets` cannot load, a split that does not exist) always
raises.

Malformed means: a JSONL line that Python's json cannot parse (syntax, nesting too deep for
the parser, an integer over Python's int-string limit), or a record that records.py refuses: a
record outside the schemas (the error lists them), anything `chat.render` refuses, and what
`chat.validate_training_messages` refuses of a training target.

Bundled generators (`wakea_jax.data.tasks.TASKS`) are named by a task spec
`task:NAME?n=1000&seed=0` (`n` examples, default 1000; `seed`, default 0).

Memory: a `Source` holds all its validated records in memory (a Python list). The sources
here are fine-tuning sets of thousands to a few hundred thousand short conversations;
larger corpora would need an offset index instead. `Source` is a grain random-access data
source (`__len__`, `__getitem__`).
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from absl import logging

from wakea_jax.data import dataset_dirs
from wakea_jax.data.config import ON_ERROR
from wakea_jax.data.records import Record, to_record, type_name
from wakea_jax.data.tasks import TASKS

TASK_PREFIX = "task:"
_DEFAULT_TASK_SIZE = 1000
T = TypeVar("T")


class Source:
  """Validated chat records with their locations; a grain RandomAccessDataSource.

  `source[i]` is `{"messages": [...], "tools": [...] | None, "num_prompt_messages": int,
  "origin": "path:line"}`: the first `num_prompt_messages` messages are context only (their
  assistant turns are not trained on; 0 when every assistant turn is a target).
  `records` are in the `{"messages": ..., "tools"?: ...}` schema, or, for a conversational
  prompt with assistant turns, `{"prompt": [...], "completion": [...], "tools"?: ...}`, so
  `write_jsonl(source.records, path)` writes a file that loads back to the same source.
  `skipped` holds one message (with its location) per malformed record that was skipped.
  """

  def __init__(self, name: str, records: list[Record], origins: list[str],
               skipped: Sequence[str] = ()) -> None:
    if len(records) != len(origins):
      raise ValueError(f"{name}: {len(records)} records but {len(origins)} origins")
    self.name = name
    self.records = records
    self.origins = origins
    self.skipped = list(skipped)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.records[index]
    if "completion" in record:
      messages, num_prompt = record["prompt"] + record["completion"], len(record["prompt"])
    else:
      messages, num_prompt = record["messages"], 0
    return {"messages": messages, "tools": record.get("tools"),
            "num_prompt_messages": num_prompt, "origin": self.origins[index]}

  def __repr__(self) -> str:
    return f"Source({self.name!r}, {len(self)} records, {len(self.skipped)} skipped)"


def validate_all(located: Iterable[tuple[str, Any]], convert: Callable[[Any, str], T], *,
                 name: str, on_error: str = "raise", kind: str = "record",
                 empty: str = "no valid records") -> tuple[list[T], list[str], list[str]]:
  """(converted values, their locations, skip messages) of (location, raw record) pairs.

  `convert(raw, where)` validates one record; a raw value that is an exception (a JSONL line
  that did not parse) is raised. A ValueError raises with `on_error="raise"`; with
  "skip_and_count" it is logged and its message kept in the third list, and the source `name`
  logs how many `kind`s it skipped. No value at all is a ValueError "`name`: `empty`".
  Shared by every record reader (SFT sources, preference pairs, RL prompts).
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  values: list[T] = []
  origins: list[str] = []
  skipped: list[str] = []
  for where, raw in located:
    try:
      if isinstance(raw, Exception):
        raise raw
      values.append(convert(raw, where))
      origins.append(where)
    except ValueError as err:
      if on_error == "raise":
        raise
      logging.warning("skipping malformed record: %s", err)
      skipped.append(str(err))
  if skipped:
    logging.warning("%s: skipped %d malformed %s(s), kept %d", name, len(skipped), kind,
                    len(values))
  if not values:
    raise ValueError(f"{name}: {empty}" +
                     (f" ({len(skipped)} malformed, skipped)" if skipped else ""))
  return values, origins, skipped


def jsonl_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
  """(1-based line number, parsed JSON value or the ValueError naming `path:line`) for each
  non-blank line of a JSONL file: the one JSONL reader that other record readers share."""
  with open(path, "rb") as f:
    for line_no, raw_line in enumerate(f, 1):
      where = f"{path}:{line_no}"
      try:
        # utf-8-sig: a byte-order mark on the first line is not part of the JSON.
        line = raw_line.decode("utf-8-sig" if line_no == 1 else "utf-8")
      except UnicodeDecodeError as err:
        yield line_no, ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})")
        continue
      if not line.strip():
        continue
      yield line_no, _parse_json(line, where)


def _parse_json(text: str, where: str) -> Any:
  """`json.loads(text)`, or the ValueError (starting with `where`) saying why not; the
  parser's RecursionError (deep nesting) and int-limit ValueError included."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    return ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
  except RecursionError:
    return ValueError(f"{where}: invalid JSON (nested too deeply for the JSON parser)")
  except ValueError as err:  # an integer longer than Python's int-string conversion limit
    return ValueError(f"{where}: invalid JSON ({str(err).split(';')[0]})")


def _jsonl_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  for line_no, value in jsonl_lines(path):
    yield f"{path}:{line_no}", value


def _json_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  try:
    data = json.loads(path.read_bytes().decode("utf-8-sig"))
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})"
                     ) from None
  except RecursionError:
    raise ValueError(f"{path}: invalid JSON (nested too deeply for the JSON parser)") from None
  except ValueError as err:  # an integer longer than Python's int-string conversion limit
    raise ValueError(f"{path}: invalid JSON ({str(err).split(';')[0]})") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: a .json source must hold a list of records, got "
                     f"{type_name(data)}")
  for index, record in enumerate(data):
    yield f"{path}[{index}]", record


def _parquet_records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (parquet only)
  try:
    parquet = pq.ParquetFile(path)
    batches = parquet.iter_batches(batch_size=1024)
  except Exception as err:  # pyarrow raises several unrelated types for unreadable files
    raise ValueError(f"{path}: cannot read Parquet file ({err})") from None
  index = 0
  for batch in batches:
    for row in batch.to_pylist():
      yield f"{path}[{index}]", _drop_nulls(row)
      index += 1


def _drop_nulls(value: Any) -> Any:
  """Parquet and Arrow (`datasets`) structs have one schema per column, so a key absent from
  one record comes back as null; dropping nulls restores the JSON record (a genuine null is
  lost, which the chat schema treats the same as absent)."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}


def raw_records(spec: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
  """(location, parsed JSON value or the ValueError it raised) for each record of a
  .jsonl/.json/.parquet file or a `datasets` directory (`DIR?split=..`), unvalidated; for
  readers of other record schemas (RL prompts, preference pairs) that validate their own
  fields but share the formats and locations. Raises (FileNotFoundError, ValueError) at once
  for a source that cannot be read."""
  path, options = dataset_dirs.split_spec(spec)
  if not path.exists():
    raise FileNotFoundError(f"{path}: data source does not exist")
  if path.is_dir():
    return ((where, _drop_nulls(row)) for where, row in dataset_dirs.rows(path, options))
  if options:
    raise ValueError(f"{os.fspath(spec)}: options such as '?split=' are for dataset "
                     "directories; this is not a directory")
  reader = _READERS.get(path.suffix.lower())
  if reader is None:
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, "
                     ".parquet or a `datasets` directory")
  return reader(path)


def read_file(spec: str | os.PathLike[str], *, on_error: str = "raise") -> Source:
  """Loads and validates a .jsonl/.json/.parquet file or a `datasets` directory (see the
  module docstring)."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  name = os.fspath(spec)
  records, origins, skipped = validate_all(raw_records(spec), to_record, name=name,
                                           on_error=on_error)
  return Source(name, records, origins, skipped)


def _task_options(generator: Any) -> dict[str, int]:
  """A generator's integer keyword-only parameters (task options such as `max_operand`)."""
  return {p.name: p.default for p in inspect.signature(generator).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, int)}


def parse_task_spec(spec: str, tasks: Mapping[str, Any] = TASKS
                    ) -> tuple[str, int, int, dict[str, int]]:
  """`task:NAME?n=1000&seed=0&OPTION=..` -> (NAME, n, seed, options).

  NAME must be a key of `tasks`; options are the generator's integer keyword-only
  parameters (e.g. `task:arithmetic?n=500&max_operand=99`).
  """
  if not spec.startswith(TASK_PREFIX):
    raise ValueError(f"{spec!r} is not a task spec; expected 'task:NAME?n=..&seed=..'")
  name, _, query = spec[len(TASK_PREFIX):].partition("?")
  if name not in tasks:
    raise ValueError(f"{spec}: unknown task {name!r}; tasks: {sorted(tasks)}")
  try:
    params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
  except ValueError:
    raise ValueError(f"{spec}: malformed parameters {query!r}; use n=..&seed=..") from None
  defaults = {"n": _DEFAULT_TASK_SIZE, "seed": 0, **_task_options(tasks[name])}
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ValueError(f"{spec}: unknown parameter(s) {unknown}; use {list(defaults)}")
  values = {}
  for key, default in defaults.items():
    given = params.get(key, [str(default)])
    try:
      if len(given) != 1:
        raise ValueError
      values[key] = int(given[0])
    except ValueError:
      raise ValueError(f"{spec}: parameter {key!r} must be one integer, got {given}") from None
  if values["n"] < 1:
    raise ValueError(f"{spec}: parameter 'n' must be >= 1, got {values['n']}")
  n, seed = values.pop("n"), values.pop("seed")
  return name, n, seed, values


def load_task(spec: str) -> Source:
  """A `Source` of the records a task spec `task:NAME?n=..&seed=..` generates, validated."""
  name, n, seed, options = parse_task_spec(spec)
  raw = TASKS[name](n, seed, **options)
  # Generated records are validated like files: a generator bug fails here, not mid-training.
  records = [to_record(r, f"{spec}[{i}]") for i, r in enumerate(raw)]
  return Source(spec, records, [f"{spec}[{i}]" for i in range(len(records))])


def load_source(spec: str | os.PathLike[str], *, on_error: str = "raise") -> Source:
  """A .jsonl/.json/.parquet path, a `datasets` directory (`DIR?split=..`), or a bundled task
  `task:NAME?n=..&seed=..`."""
  if isinstance(spec, str) and spec.startswith(TASK_PREFIX):
    return load_task(spec)
  return read_file(spec, on_error=on_error)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Writes records (e.g. a task's output or `Source.records`) one JSON object per line.

  Atomically (a temporary file beside `path`, then os.replace): callers that skip work when
  the file exists (the demonstrations' data files) never reuse a half-written one."""
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
