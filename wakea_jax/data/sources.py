"""Training-data sources: local JSONL / JSON / Parquet files and bundled task generators.

Formats (chosen by the file suffix; files are read locally, never from a hub):
  .jsonl    one record per line; blank lines are ignored
  .json     one JSON list of records
  .parquet  one record per row (read with pyarrow)

Record schemas:
  {"messages": [...], "tools"?: [...]}               chat, tool calls, reasoning (see chat.py);
                                                      optional tool JSON schemas for the prompt
  {"prompt": str, "response": str, "system"?: str}   becomes a [system,] user, assistant chat

Every record is validated when the source is loaded, so an error names the location and the
field: `data/x.jsonl:17: field 'response' must be a string`. The location is `path:LINE`
for JSONL (1-based, as editors count) and `path[INDEX]` for JSON and Parquet (the 0-based
record index, as `records[INDEX]` would find it). A malformed record raises by default; with
`on_error="skip_and_count"` it is logged with its location and counted in `Source.skipped`,
never dropped silently. A file that cannot be read at all (bad suffix, not a JSON list,
unreadable Parquet) always raises.

Malformed means: a JSONL line that Python's json cannot parse (syntax, nesting too deep for
the parser, an integer over Python's int-string limit), a record outside the schemas above,
anything `chat.render` refuses (roles, unknown message keys such as a misspelt `contnet`,
tool calls that are not standard JSON (NaN, Infinity), lone surrogates, turn delimiters in
assistant text), and, since every record is a training target, what
`chat.validate_training_messages` refuses: empty assistant turns, malformed `<tool_call>`
blocks written in assistant content, and `tool` messages that answer no call.

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
import re
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from wakea_jax.data import chat
from wakea_jax.data.config import ON_ERROR
from wakea_jax.data.tasks import TASKS

TASK_PREFIX = "task:"
_DEFAULT_TASK_SIZE = 1000

Record = dict[str, Any]  # {"messages": [...]} plus "tools" when the record has tool schemas


class Source:
  """Validated chat records with their locations; a grain RandomAccessDataSource.

  `source[i]` is `{"messages": [...], "tools": [...] | None, "origin": "path:line"}`.
  `records` are the records in the `{"messages": ..., "tools"?: ...}` schema, so
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
    return {"messages": record["messages"], "tools": record.get("tools"),
            "origin": self.origins[index]}

  def __repr__(self) -> str:
    return f"Source({self.name!r}, {len(self)} records, {len(self.skipped)} skipped)"


# chat.py names the message and field ("message 2: field 'content' ..."); a source names the
# record field instead, so the message is rewritten as a path inside the record.
_CHAT_FIELD_ERROR = re.compile(r"^message (\d+): field '([^']*)'(.*)$", re.DOTALL)
_CHAT_MESSAGE_ERROR = re.compile(r"^message (\d+): (.*)$", re.DOTALL)


def _chat_error(where: str, err: ValueError, fields: Mapping[int, str] | None) -> ValueError:
  """Rewrites a chat.py validation error as `{where}: field 'messages[i].x' ...`.

  `fields` maps message indices back to record fields for prompt/response records
  (message 1's content is the record's 'response', etc.).
  """
  text = str(err)
  if match := _CHAT_FIELD_ERROR.match(text):
    index, field, rest = int(match[1]), match[2], match[3]
    if fields is not None and field == "content" and index in fields:
      return ValueError(f"{where}: field '{fields[index]}'{rest}")
    return ValueError(f"{where}: field 'messages[{index}].{field}'{rest}")
  if match := _CHAT_MESSAGE_ERROR.match(text):
    return ValueError(f"{where}: field 'messages[{match[1]}]': {match[2]}")
  return ValueError(f"{where}: {text}")


def type_name(value: Any) -> str:
  """The JSON-ish name of a value's type for error messages."""
  return "null" if value is None else type(value).__name__


def to_record(raw: Any, where: str) -> Record:
  """Validates one raw record and returns it as `{"messages": [...], "tools"?: [...]}`.

  Raises ValueError starting with `where` and naming the field.
  """
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a record must be a JSON object, got {type_name(raw)}")
  fields: dict[int, str] | None = None
  if "messages" in raw:
    messages = raw["messages"]
    if not isinstance(messages, list):
      raise ValueError(f"{where}: field 'messages' must be a list, got {type_name(messages)}")
    if not messages:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list")
  elif "prompt" in raw or "response" in raw:
    for field in ("prompt", "response"):
      if field not in raw:
        raise ValueError(f"{where}: field '{field}' is missing")
      if not isinstance(raw[field], str):
        raise ValueError(
            f"{where}: field '{field}' must be a string, got {type_name(raw[field])}")
    messages = [{"role": "user", "content": raw["prompt"]},
                {"role": "assistant", "content": raw["response"]}]
    fields = {0: "prompt", 1: "response"}
    if raw.get("system") is not None:
      if not isinstance(raw["system"], str):
        raise ValueError(
            f"{where}: field 'system' must be a string, got {type_name(raw['system'])}")
      messages.insert(0, {"role": "system", "content": raw["system"]})
      fields = {0: "system", 1: "prompt", 2: "response"}
  else:
    raise ValueError(f"{where}: needs field 'messages' or fields 'prompt' and 'response'")

  tools = raw.get("tools")
  if tools is not None:
    if not isinstance(tools, list):
      raise ValueError(f"{where}: field 'tools' must be a list, got {type_name(tools)}")
    for k, tool in enumerate(tools):
      if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: field 'tools[{k}]' must be a JSON object, got "
                         f"{type_name(tool)}")
  try:
    # Full structural validation of every message (roles, tool calls, reasoning, delimiters),
    # then the checks of a training target (empty turns, inline tool calls, orphan results).
    chat.render_text(messages, tools=tools)
    chat.validate_training_messages(messages)
  except ValueError as err:
    raise _chat_error(where, err, fields) from None
  if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
    raise ValueError(f"{where}: field 'messages' has no assistant message to train on")
  record: Record = {"messages": [dict(m) for m in messages]}
  if tools:
    record["tools"] = [dict(t) for t in tools]
  return record


def prompt_messages(raw: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
  """The prompt of a record that awaits an answer (RL prompts, preference pairs):
  `"messages"` (ending before the assistant's turn) or `"prompt"` with an optional
  `"system"`. Raises ValueError starting with `where` and naming the field."""
  if "messages" in raw and "prompt" in raw:
    raise ValueError(f"{where}: give either field 'messages' or field 'prompt', not both")
  if "messages" in raw:
    prompt = raw["messages"]
    if not isinstance(prompt, list) or not prompt:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list, got "
                       f"{type_name(prompt)}")
    for k, message in enumerate(prompt):
      if not isinstance(message, Mapping):
        raise ValueError(f"{where}: field 'messages[{k}]' must be a message object, got "
                         f"{type_name(message)}")
    if prompt[-1].get("role") == "assistant":
      raise ValueError(f"{where}: field 'messages' must end before the assistant's answer "
                       "(the last message is an assistant turn)")
    prompt = [dict(m) for m in prompt]
  elif "prompt" in raw:
    if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
      raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got "
                       f"{type_name(raw['prompt'])}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
      raise ValueError(f"{where}: field 'system' must be a string, got {type_name(system)}")
    prompt = ([{"role": "system", "content": system}] if system else [])
    prompt.append({"role": "user", "content": raw["prompt"]})
  else:
    raise ValueError(f"{where}: field 'prompt' (or 'messages') is missing")
  return prompt


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
  """Parquet structs have one schema per column, so a key absent from one record comes back
  as null; dropping nulls restores the JSON record (a genuine null is lost, which the chat
  schema treats the same as absent)."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}


def raw_records(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
  """(location, parsed JSON value or the ValueError it raised) for each record of a
  .jsonl/.json/.parquet file, unvalidated; for readers of other record schemas (RL prompts,
  preference pairs) that validate their own fields but share the formats and locations."""
  path = pathlib.Path(path)
  reader = _READERS.get(path.suffix.lower())
  if reader is None:
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or "
                     ".parquet")
  if not path.exists():
    raise FileNotFoundError(f"{path}: data source does not exist")
  if path.is_dir():
    raise IsADirectoryError(f"{path}: expected a data file, found a directory")
  return reader(path)


def read_file(path: str | os.PathLike[str], *, on_error: str = "raise") -> Source:
  """Loads and validates a .jsonl/.json/.parquet file (see the module docstring)."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  path = pathlib.Path(path)
  records: list[Record] = []
  origins: list[str] = []
  skipped: list[str] = []
  for where, raw in raw_records(path):
    try:
      if isinstance(raw, Exception):
        raise raw
      records.append(to_record(raw, where))
      origins.append(where)
    except ValueError as err:
      if on_error == "raise":
        raise
      logging.warning("skipping malformed record: %s", err)
      skipped.append(str(err))
  if skipped:
    logging.warning("%s: skipped %d malformed record(s), kept %d", path, len(skipped),
                 len(records))
  if not records:
    raise ValueError(f"{path}: no valid records" +
                     (f" ({len(skipped)} malformed, skipped)" if skipped else ""))
  return Source(str(path), records, origins, skipped)


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
  """A .jsonl/.json/.parquet path, or a bundled task `task:NAME?n=..&seed=..`."""
  if isinstance(spec, str) and spec.startswith(TASK_PREFIX):
    return load_task(spec)
  return read_file(spec, on_error=on_error)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Writes records (e.g. a task's output or `Source.records`) one JSON object per line."""
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
