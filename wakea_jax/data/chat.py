"""Qwen-style ChatML rendering with tool calls, reasoning blocks and an assistant-only loss mask.

Layout (identical to the Qwen2.5/Qwen3 chat templates for the same messages; "\\n" shown as
line breaks, tools block abridged):

    <|im_start|>system
    {system content}

    # Tools ... <tools>
    {tool schema JSON, one per line}
    </tools> ...<|im_end|>
    <|im_start|>user
    {content}<|im_end|>
    <|im_start|>assistant
    <think>
    {reasoning}
    </think>

    {content}
    <tool_call>
    {"name": ..., "arguments": {...}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    {tool result}
    </tool_response>
    <tool_response>
    {next tool result}
    </tool_response><|im_end|>
    <|im_start|>assistant                  <- add_generation_prompt=True ends here, after "\\n"

Choices, and why:

* Tool results go, Qwen-style, inside a *user* turn: consecutive `tool` messages share one
  `<|im_start|>user` turn, each wrapped in `<tool_response>` tags. Models imported from Qwen
  checkpoints already know this layout. A `tool` message's `name`/`tool_call_id` are not
  rendered (Qwen does not either); results are matched to calls by order.
* Tool calls are `json.dumps({"name": ..., "arguments": {...}}, ensure_ascii=False)` between
  `<tool_call>\\n` and `\\n</tool_call>` (Qwen puts the JSON on its own line), one block per
  call, separated from the content and from each other by "\\n".
* Reasoning (`reasoning`, `think` or `reasoning_content`) is rendered as a `<think>` block
  before the content of every assistant message that has it, past turns included; an empty
  string renders an empty block (Qwen3's "thinking off" form). Text is rendered verbatim:
  nothing is stripped.
* `loss_mask` is 1 exactly on what the assistant generates: its body (think block, content,
  tool calls) and the closing `<|im_end|>`. The role header, the "\\n" after `<|im_end|>`, and
  all system, user, tool and tools-schema text are 0.

Tokenisation. The rendering is a list of spans, each encoded on its own, so mask boundaries
are exact by construction rather than recovered from offsets. Adjacent spans of the same
kind are merged first, so every encode boundary falls next to a control token or right after
a role header's "\\n". The ids are defined as the concatenation of the span encodings; the
sampler builds prompts with `render`, so training and inference see identical ids. With the
bundled SentencePiece model (control tokens and "\\n" atomic) this also equals
`tokenizer.encode(render_text(...))` whenever no system/user/tool text spells a control token;
with ByteLevel BPE (GPT-2/Qwen style) likewise, unless message text starts or ends with a
newline, which whole-string encoding would merge with the markup's "\\n". A tokenizer that
prefixes every `encode` call with a space (SentencePiece `add_dummy_prefix`, HF Metaspace)
would corrupt span boundaries, so `render` checks for that once per tokenizer and refuses it
with a ValueError.

Control tokens in message text. Markup written by the renderer and assistant output (content,
reasoning, tool-call JSON) are encoded as they are, so `<think>` or `<tool_call>` written in an
assistant message become the same single ids the model emits at inference; `<|im_start|>` and
`<|im_end|>` there are rejected, because a turn delimiter inside a training target is corrupt
data. System, user and tool text (and tool schemas) are untrusted: any substring equal to a
control token of the tokenizer is encoded one character at a time, so it decodes to the same
text but can never become a control id (no injected turn ends, no fake tool responses).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wakea_jax.data.tokenizer import (
    IM_END,
    IM_START,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    Tokenizer,
)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
# Accepted spellings of an assistant message's reasoning (ours, the issue's, HF/Qwen3's).
REASONING_KEYS: tuple[str, ...] = ("reasoning", "think", "reasoning_content")

# Qwen2.5/Qwen3 tool instructions, verbatim, so imported Qwen models see familiar text.
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

Message = Mapping[str, Any]


@dataclass(frozen=True)
class RenderedChat:
  """A rendered conversation.

    input_ids: int32 [seq] token ids.
    loss_mask: int32 [seq], 1 where the token is assistant output (see module docstring).
    text: the rendered string; `tokenizer.decode(input_ids) == text`.
    """

  input_ids: np.ndarray
  loss_mask: np.ndarray
  text: str

  def __post_init__(self) -> None:
    if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
      raise ValueError(f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} "
                       "must be 1-D and the same length")


class ToolCallParseError(ValueError):
  """A `<tool_call>` block in generated text that is not a valid call."""

  def __init__(self, index: int, reason: str, raw: str) -> None:
    super().__init__(f"tool call {index}: {reason}; text: {raw[:200]!r}")
    self.index = index
    self.reason = reason
    self.raw = raw


@dataclass(frozen=True)
class _Message:
  role: str
  content: str
  reasoning: str | None
  tool_calls: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class _Span:
  text: str
  trusted: bool  # renderer markup or assistant output: control-token text -> control ids
  train: bool  # assistant output: loss_mask = 1


def _is_list(value: Any) -> bool:
  return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))


def _json(value: Any, where: str) -> str:
  try:
    return json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{where} is not JSON-serialisable: {err}") from err


def _normalize_tool_call(call: Any, where: str, path: str) -> dict[str, Any]:
  """`where` names the message ("message 3"), `path` the field ("tool_calls[0]")."""

  def error(field: str, problem: str) -> ValueError:
    return ValueError(f"{where}: field '{field}' {problem}")

  if not isinstance(call, Mapping):
    raise error(path, f"must be a dict, got {type(call).__name__}")
  if "function" in call:  # OpenAI form: {"type": "function", "function": {...}}
    call, path = call["function"], f"{path}.function"
    if not isinstance(call, Mapping):
      raise error(path, f"must be a dict, got {type(call).__name__}")
  name = call.get("name")
  if not isinstance(name, str) or not name.strip():
    raise error(f"{path}.name", f"must be a non-empty string, got {name!r}")
  if "arguments" not in call:
    raise error(f"{path}.arguments", "is missing")
  arguments = call["arguments"]
  if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
    try:
      arguments = json.loads(arguments)
    except json.JSONDecodeError as err:
      raise error(f"{path}.arguments", f"is a string but not valid JSON: {err}") from err
  if not isinstance(arguments, Mapping):
    raise error(f"{path}.arguments",
                f"must be a JSON object (dict), got {type(arguments).__name__}")
  normalized = {"name": name, "arguments": dict(arguments)}
  _json(normalized, f"{where}: field '{path}.arguments'")
  return normalized


def _validate_message(index: int, message: Any) -> _Message:
  where = f"message {index}"
  if not isinstance(message, Mapping):
    raise ValueError(f"{where}: expected a dict, got {type(message).__name__}")
  if "role" not in message:
    raise ValueError(f"{where}: field 'role' is missing")
  role = message["role"]
  if role not in ROLES:
    raise ValueError(f"{where}: field 'role' must be one of {ROLES}, got {role!r}")

  raw_calls = message.get("tool_calls")
  if raw_calls is not None and role != "assistant":
    raise ValueError(f"{where}: field 'tool_calls' is only allowed on assistant messages")
  if raw_calls is not None and not _is_list(raw_calls):
    raise ValueError(f"{where}: field 'tool_calls' must be a list, got {type(raw_calls).__name__}")
  tool_calls = tuple(
      _normalize_tool_call(call, where, f"tool_calls[{j}]")
      for j, call in enumerate(raw_calls or ()))

  given = [key for key in REASONING_KEYS if message.get(key) is not None]
  if given and role != "assistant":
    raise ValueError(f"{where}: field '{given[0]}' is only allowed on assistant messages")
  if len(given) > 1:
    raise ValueError(f"{where}: fields {given} all give the reasoning; use only one")
  reasoning = message[given[0]] if given else None
  if reasoning is not None and not isinstance(reasoning, str):
    raise ValueError(
        f"{where}: field '{given[0]}' must be a string, got {type(reasoning).__name__}")

  content = message.get("content")
  if content is None:
    # An assistant turn that only calls tools (or only thinks) may omit its content.
    if role == "assistant" and (tool_calls or reasoning is not None):
      content = ""
    elif "content" in message:
      raise ValueError(f"{where}: field 'content' is None")
    else:
      raise ValueError(f"{where}: field 'content' is missing")
  if not isinstance(content, str):
    raise ValueError(f"{where}: field 'content' must be a string, got {type(content).__name__}")

  if role == "assistant":
    fields = {"content": content, (given[0] if given else "reasoning"): reasoning or ""}
    fields.update({f"tool_calls[{j}]": _json(c, "") for j, c in enumerate(tool_calls)})
    for field, text in fields.items():
      for delimiter in (IM_START, IM_END):
        if delimiter in text:
          raise ValueError(f"{where}: field '{field}' contains the turn delimiter {delimiter!r}")
  return _Message(role, content, reasoning, tool_calls)


def _validate_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
  if tools is None:
    return []
  if not _is_list(tools):
    raise ValueError(f"tools must be a list of dicts (JSON schemas), got {type(tools).__name__}")
  rendered = []
  for k, tool in enumerate(tools):
    if not isinstance(tool, Mapping):
      raise ValueError(f"tools[{k}]: expected a dict (JSON schema), got {type(tool).__name__}")
    rendered.append(_json(tool, f"tools[{k}]"))
  return rendered


def _assistant_body(message: _Message) -> str:
  parts = []
  if message.reasoning is not None:
    parts.append(f"{THINK_START}\n{message.reasoning}\n{THINK_END}\n\n")
  parts.append(message.content)
  for j, call in enumerate(message.tool_calls):
    if j > 0 or message.content:
      parts.append("\n")
    parts.append(f"{TOOL_CALL_START}\n{json.dumps(call, ensure_ascii=False)}\n{TOOL_CALL_END}")
  return "".join(parts)


def _spans(
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
) -> list[_Span]:
  if not _is_list(messages):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty")
  msgs = [_validate_message(i, m) for i, m in enumerate(messages)]
  tool_jsons = _validate_tools(tools)

  spans: list[_Span] = []

  def markup(text: str, train: bool = False) -> None:
    spans.append(_Span(text, trusted=True, train=train))

  def untrusted(text: str) -> None:
    spans.append(_Span(text, trusted=False, train=False))

  first = 0
  if tool_jsons:
    markup(f"{IM_START}system\n")
    if msgs[0].role == "system":
      untrusted(msgs[0].content)
      markup("\n\n")
      first = 1
    markup(TOOLS_HEADER)
    for tool_json in tool_jsons:
      markup("\n")
      untrusted(tool_json)
    markup(f"{TOOLS_FOOTER}{IM_END}\n")

  for i in range(first, len(msgs)):
    message = msgs[i]
    if message.role == "assistant":
      markup(f"{IM_START}assistant\n")
      spans.append(_Span(_assistant_body(message), trusted=True, train=True))
      markup(IM_END, train=True)
      markup("\n")
    elif message.role == "tool":
      if i == 0 or msgs[i - 1].role != "tool":
        markup(f"{IM_START}user")
      markup(f"\n{TOOL_RESPONSE_START}\n")
      untrusted(message.content)
      markup(f"\n{TOOL_RESPONSE_END}")
      if i + 1 == len(msgs) or msgs[i + 1].role != "tool":
        markup(f"{IM_END}\n")
    else:
      markup(f"{IM_START}{message.role}\n")
      untrusted(message.content)
      markup(f"{IM_END}\n")
  if add_generation_prompt:
    markup(f"{IM_START}assistant\n")

  merged: list[_Span] = []
  for span in spans:
    if not span.text:
      continue
    if merged and (merged[-1].trusted, merged[-1].train) == (span.trusted, span.train):
      merged[-1] = _Span(merged[-1].text + span.text, span.trusted, span.train)
    else:
      merged.append(span)
  return merged


@dataclass(frozen=True)
class _TokenizerPlan:
  control_pattern: re.Pattern[str] | None


_PLANS: weakref.WeakKeyDictionary[Any, _TokenizerPlan] = weakref.WeakKeyDictionary()


def _make_plan(tokenizer: Tokenizer) -> _TokenizerPlan:
  for token in (IM_START, IM_END):
    token_id = tokenizer.token_to_id(token)
    if token_id is None or tokenizer.encode(token) != [token_id]:
      raise ValueError(f"{tokenizer!r} has no single id for the chat token {token!r}")
  for a, b in (("x", "y"), ("user", "\n"), ("\n", "Hi"), (" a", " b")):
    got = tokenizer.decode(tokenizer.encode(a) + tokenizer.encode(b))
    if got != a + b:
      raise ValueError(f"{tokenizer!r} does not encode text segments independently: "
                       f"decode(encode({a!r}) + encode({b!r})) is {got!r}, not {a + b!r}. The chat "
                       "renderer encodes each span separately; use a tokenizer without a per-call "
                       "prefix space (no SentencePiece add_dummy_prefix, no HF Metaspace prepend)")
  # Longest first, so that a control token containing another one is matched whole.
  controls = sorted((t for t in tokenizer.special_ids if len(t) > 1), key=len, reverse=True)
  pattern = re.compile("|".join(map(re.escape, controls))) if controls else None
  return _TokenizerPlan(control_pattern=pattern)


def _plan(tokenizer: Tokenizer) -> _TokenizerPlan:
  try:
    plan = _PLANS.get(tokenizer)
  except TypeError:  # not weak-referenceable: no caching
    return _make_plan(tokenizer)
  if plan is None:
    plan = _make_plan(tokenizer)
    _PLANS[tokenizer] = plan
  return plan


def _encode_untrusted(tokenizer: Tokenizer, text: str,
                      pattern: re.Pattern[str] | None) -> list[int]:
  if pattern is None:
    return tokenizer.encode(text)
  ids: list[int] = []
  pos = 0
  for match in pattern.finditer(text):
    if match.start() > pos:
      ids.extend(tokenizer.encode(text[pos:match.start()]))
    # One character at a time: no single character can match a multi-character control
    # token, so this decodes to the same text without producing its id.
    for char in match.group():
      ids.extend(tokenizer.encode(char))
    pos = match.end()
  if pos < len(text):
    ids.extend(tokenizer.encode(text[pos:]))
  return ids


def render_text(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
  """The rendered conversation as a string (see the module docstring for the layout)."""
  return "".join(span.text for span in _spans(messages, tools, add_generation_prompt))


def render(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> RenderedChat:
  """Renders and tokenises `messages`, with a loss mask over the assistant's output.

    Raises ValueError naming the message index and field for malformed messages, and for a
    tokenizer that lacks single ids for `<|im_start|>`/`<|im_end|>` or cannot be encoded span
    by span.
    """
  spans = _spans(messages, tools, add_generation_prompt)
  plan = _plan(tokenizer)
  ids: list[int] = []
  mask: list[int] = []
  for span in spans:
    if span.trusted:
      span_ids = tokenizer.encode(span.text)
    else:
      span_ids = _encode_untrusted(tokenizer, span.text, plan.control_pattern)
    ids.extend(span_ids)
    mask.extend([int(span.train)] * len(span_ids))
  input_ids = np.asarray(ids, dtype=np.int32)
  loss_mask = np.asarray(mask, dtype=np.int32)
  # Read-only: a RenderedChat may be shared (e.g. cached prompts); copy before editing.
  input_ids.flags.writeable = False
  loss_mask.flags.writeable = False
  return RenderedChat(input_ids=input_ids, loss_mask=loss_mask, text="".join(s.text for s in spans))


def parse_tool_calls(text: str, *, strict: bool = True) -> list[dict[str, Any]]:
  """Extracts `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks from `text`.

    Returns `[{"name": str, "arguments": dict}, ...]` in order of appearance. Whitespace
    around the JSON is ignored, and `arguments` given as a JSON string is decoded. A block
    that is unterminated, not valid JSON, or not `{"name": str, "arguments": object}` raises
    `ToolCallParseError` (a ValueError naming the call index) when `strict`; otherwise it
    appears in the list as `{"error": reason, "raw": block text}` so that a tool loop can
    report it back to the model. Blocks inside `<think>` are not treated specially: pass the
    assistant content, not the reasoning, if that matters.
    """
  calls: list[dict[str, Any]] = []

  def bad(reason: str, raw: str) -> None:
    if strict:
      raise ToolCallParseError(len(calls), reason, raw)
    calls.append({"error": reason, "raw": raw})

  pos = 0
  while (start := text.find(TOOL_CALL_START, pos)) >= 0:
    body_start = start + len(TOOL_CALL_START)
    end = text.find(TOOL_CALL_END, body_start)
    if end < 0:
      bad(f"missing {TOOL_CALL_END}", text[body_start:])
      break
    raw = text[body_start:end]
    pos = end + len(TOOL_CALL_END)
    try:
      call = json.loads(raw)
    except json.JSONDecodeError as err:
      bad(f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})", raw)
      continue
    if not isinstance(call, dict):
      bad(f"expected a JSON object, got {type(call).__name__}", raw)
      continue
    name, arguments = call.get("name"), call.get("arguments")
    if not isinstance(name, str) or not name:
      bad("'name' must be a non-empty string", raw)
      continue
    if isinstance(arguments, str):
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        pass  # reported just below as a non-object
    if not isinstance(arguments, dict):
      bad("'arguments' must be a JSON object", raw)
      continue
    calls.append({"name": name, "arguments": arguments})
  return calls
