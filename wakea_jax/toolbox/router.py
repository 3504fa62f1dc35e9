"""Typed tool registry: validates a parsed tool call and turns every outcome into text.

The tool loop hands `Router.call` whatever the model wrote inside `<tool_call>` (already
JSON-decoded by `chat.parse_tool_calls`). Anything can go wrong there: an unknown name, missing
or mistyped arguments, a tool that raises or hangs. None of it may crash a rollout, so every
failure becomes a `ToolResult` with `ok=False` and text starting with "Error:" that the model
sees in its `<tool_response>` and can learn from.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from wakea_jax.toolbox.isolation import IsolatedPool

# JSON-schema type name -> Python check. bool is a subclass of int, so numbers exclude it.
_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


@dataclasses.dataclass(frozen=True)
class Tool:
  """One callable tool. `parameters` is a JSON schema of type "object"."""

  name: str
  description: str
  parameters: Mapping[str, Any]
  # Returns the text for the model, or a ToolResult when the tool itself knows the call failed
  # (e.g. the sandboxed program crashed). Raise ToolError for an expected failure whose message
  # is shown as-is; any other exception is reported with its type name.
  run: Callable[[dict[str, Any]], str | ToolResult]
  # Seconds before the call is abandoned with an error result; None waits forever.
  timeout_s: float | None = None
  # "module:function" of an isolated twin of `run` (arguments dict -> [ok, text]) that the
  # router runs in a killable worker process (toolbox/isolation.py), so that `timeout_s` is
  # a hard deadline even for a call that holds the GIL. Tools without it run in a thread,
  # which cannot be killed: they must bound themselves (the sandbox and searches do).
  isolated: str | None = None

  def schema(self) -> dict[str, Any]:
    """The OpenAI/Qwen function format that `chat.render(tools=...)` takes."""
    return {"type": "function", "function": {
        "name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """What the model sees for one call: `text`, and on failure `ok=False` with the bare `error`.

  Failed results' `text` is "Error: " + `error`.
  """

  text: str
  ok: bool
  error: str | None = None


class ToolError(Exception):
  """An expected tool failure (bad expression, empty corpus ...): its message is the result."""


class ArgumentError(ValueError):
  """Arguments that do not match a tool's schema."""


def validate_arguments(schema: Mapping[str, Any], arguments: Any, path: str = "arguments") -> None:
  """Checks `arguments` against a JSON schema subset: type, required, properties,
  additionalProperties, items, enum. Raises ArgumentError naming the offending field."""
  expected = schema.get("type")
  if expected is not None:
    types = [expected] if isinstance(expected, str) else list(expected)
    for t in types:
      if t not in _TYPE_CHECKS:
        raise ArgumentError(f"{path}: schema has unsupported type {t!r}")
    if not any(_TYPE_CHECKS[t](arguments) for t in types):
      raise ArgumentError(
          f"{path}: expected {' or '.join(types)}, got {_json_type(arguments)} {_short(arguments)}")
  if "enum" in schema and arguments not in schema["enum"]:
    raise ArgumentError(f"{path}: {_short(arguments)} is not one of {list(schema['enum'])}")
  if isinstance(arguments, dict):
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
      if name not in arguments:
        raise ArgumentError(f"{path}: missing required field {name!r}")
    extra = schema.get("additionalProperties", False)
    for name, value in arguments.items():
      if name in properties:
        validate_arguments(properties[name], value, f"{path}.{name}")
      elif extra is False:
        allowed = ", ".join(sorted(properties)) or "none"
        raise ArgumentError(f"{path}: unknown field {name!r} (allowed: {allowed})")
      elif isinstance(extra, Mapping):
        validate_arguments(extra, value, f"{path}.{name}")
  if isinstance(arguments, list) and "items" in schema:
    for i, item in enumerate(arguments):
      validate_arguments(schema["items"], item, f"{path}[{i}]")


def _json_type(value: Any) -> str:
  for name in ("boolean", "integer", "number", "string", "array", "object", "null"):
    if name != "integer" and _TYPE_CHECKS[name](value):
      return name
    if name == "integer" and isinstance(value, int) and not isinstance(value, bool):
      return name
  return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
  text = json.dumps(value, default=repr)
  return text if len(text) <= limit else text[:limit] + "..."


def _error(message: str) -> ToolResult:
  return ToolResult(text=f"Error: {message}", ok=False, error=message)


class Router:
  """Dispatches parsed tool calls to a registry of `Tool`s; never raises on model input."""

  def __init__(self, tools: Mapping[str, Tool] | list[Tool] | tuple[Tool, ...]):
    self._pool: IsolatedPool | None = None
    self._pool_lock = threading.Lock()
    if isinstance(tools, Mapping):
      for key, tool in tools.items():
        if key != tool.name:
          raise ValueError(f"registry key {key!r} differs from tool name {tool.name!r}")
      self.tools: dict[str, Tool] = dict(tools)
    else:
      self.tools = {}
      for tool in tools:
        if tool.name in self.tools:
          raise ValueError(f"duplicate tool name {tool.name!r}")
        self.tools[tool.name] = tool

  def call(self, name: Any, arguments: Any = None) -> ToolResult:
    """Runs tool `name` on `arguments` (a dict, a JSON string or None) and returns its result.

    Unknown tools, invalid JSON or arguments, timeouts and exceptions raised by the tool all
    become error results, so model output can never make this raise.
    """
    if not isinstance(name, str) or name not in self.tools:
      known = ", ".join(sorted(self.tools)) or "none"
      return _error(f"unknown tool {name!r} (available: {known})")
    tool = self.tools[name]
    if arguments is None:
      arguments = {}
    if isinstance(arguments, str):
      # Some models emit the arguments object as a JSON string (OpenAI style); accept it.
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError as e:
        return _error(f"{name}: arguments are not valid JSON ({e.msg})")
    try:
      validate_arguments(tool.parameters, arguments)
    except ArgumentError as e:
      return _error(f"{name}: {e}")
    try:
      text = self._run(tool, arguments)
    except concurrent.futures.TimeoutError:
      return _error(f"{name}: timed out after {tool.timeout_s} s")
    except ToolError as e:
      return _error(f"{name}: {e}")
    except Exception as e:  # A tool bug must reach the model as text, not kill the rollout.
      return _error(f"{name}: {type(e).__name__}: {e}")
    if isinstance(text, ToolResult):
      return text
    if not isinstance(text, str):
      return _error(f"{name}: tool returned {type(text).__name__}, expected str")
    return ToolResult(text=text, ok=True)

  def call_parsed(self, call: Mapping[str, Any]) -> ToolResult:
    """`call` on one dict as produced by `chat.parse_tool_calls`."""
    if not isinstance(call, Mapping):
      return _error(f"malformed tool call {_short(call)}: expected an object")
    return self.call(call.get("name"), call.get("arguments", {}))

  def _run(self, tool: Tool, arguments: dict[str, Any]) -> str | ToolResult:
    if tool.isolated is not None:
      return self._run_isolated(tool, arguments)
    if tool.timeout_s is None:
      return tool.run(arguments)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
      return pool.submit(tool.run, arguments).result(timeout=tool.timeout_s)
    finally:
      pool.shutdown(wait=False, cancel_futures=True)

  def _run_isolated(self, tool: Tool, arguments: dict[str, Any]) -> ToolResult:
    with self._pool_lock:
      if self._pool is None:
        self._pool = IsolatedPool([t.isolated for t in self.tools.values() if t.isolated])
    try:
      ok, text = self._pool.call(tool.isolated, arguments, timeout_s=tool.timeout_s)
    except TimeoutError:
      raise concurrent.futures.TimeoutError from None
    return ToolResult(text=text, ok=True) if ok else _error(f"{tool.name}: {text}")

  def close(self) -> None:
    """Stops the worker processes of isolated tools (they also end with the process)."""
    if self._pool is not None:
      self._pool.close()

  def tool_schemas(self) -> list[dict[str, Any]]:
    """The schema of every registered tool, for `chat.render(tools=...)`."""
    return [tool.schema() for tool in self.tools.values()]

  def system_prompt_block(self) -> str:
    """Plain-text tool list for prompts that do not use chat.render's <tools> block."""
    lines = ["Available tools:"]
    for tool in self.tools.values():
      props = tool.parameters.get("properties", {})
      required = set(tool.parameters.get("required", ()))
      args = ", ".join(f"{k}: {v.get('type', 'any')}{'' if k in required else '?'}"
                       for k, v in props.items())
      lines.append(f"- {tool.name}({args}): {tool.description}")
    return "\n".join(lines)
