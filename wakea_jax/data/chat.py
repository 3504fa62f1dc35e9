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
* A prompt may end inside a partial assistant turn that the model continues: a final
  assistant message with `"continue": true` is rendered without its end-of-turn token (and
  without the "\\n" after it), so the text stops right after its content, where generation
  picks up (SRL's step-wise prompts, rl/srl.py, put the expert's earlier steps there). It
  replaces the generation prompt, so `add_generation_prompt=True` with it is an error, and
  so is `continue` on any message but the last (HF's `continue_final_message`, as a field of
  the message so that prompt files can carry it). With a tokenizer's own chat template the
  prompt is cut where `transformers`' `continue_final_message` cuts it (a template that
  trims message text trims the partial turn's trailing whitespace too). A partial turn is a
  prompt, never a training target (`validate_training_messages` refuses it).
* Text the stack injected into an assistant turn while it was generated (search results that a
  Search-R1 / R-Search rollout appends inside the turn, after `</search>`) is named by the
  assistant message's `injected` field: sorted, non-overlapping `[start, end)` character
  ranges of its `content`. Those ranges are rendered in place but are untrusted text with
  `loss_mask` 0, so an SFT trajectory tokenises as the rollout did (model text, injected ids,
  model text in one turn) and no retrieved token is trained on. ChatML layout only (a
  tokenizer's own chat template cannot place the ranges; that is an error).

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

Validation (every `render`/`render_text`). A message may only have the keys in
`MESSAGE_KEYS`; any other key with a non-null value (a misspelt `contnet`, `tool_call`) is an
error naming it, since its data would be dropped silently (a null value carries nothing, as
with Parquet's absent keys). Rendered text must be valid Unicode: a lone surrogate such as
"\\ud800" (which `json.loads` accepts) is an error naming the field, not a tokenizer crash
later. Tool-call arguments and tool schemas must be standard JSON: NaN and Infinity are
errors, and so is nesting deeper than `MAX_JSON_DEPTH` levels.

Training targets get stricter checks (`validate_training_messages`, run by
`wakea_jax.data.sources` on every record): no empty assistant turns, no malformed
`<tool_call>` block written in assistant content, and no `tool` message that answers no call.

Parsing generated text (`parse_tool_calls`) reads model output, which is untrusted: standard
JSON only (no NaN/Infinity, no out-of-range floats), at most `MAX_JSON_DEPTH` levels deep,
integers within Python's int-string limit, and the raw text it keeps of a bad block is cut
to `MAX_RAW_CHARS` characters. With `strict=False` it never raises on any text.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wakea_jax.data.chat_template import TRAIN, UNTRUSTED, ChatTemplate
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
# Every key a message may have. `name` and `tool_call_id` (OpenAI) are accepted but not
# rendered; any other key with a non-null value is an error naming it.
MESSAGE_KEYS: tuple[str, ...] = ("role", "content", "tool_calls", "name", "tool_call_id",
                                 "injected", "continue", *REASONING_KEYS)
# Deepest JSON nesting accepted in tool calls (the call object itself is level 1) and tool
# schemas; deeper values are errors rather than recursion limits hit later.
MAX_JSON_DEPTH = 100
# At most this many characters of a malformed tool-call block are kept in `raw`.
MAX_RAW_CHARS = 2000

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
  """A `<tool_call>` block in generated text that is not a valid call.

  `raw` is the block's text, cut to `MAX_RAW_CHARS` characters (see `parse_tool_calls`).
  """

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
  injected: tuple[tuple[int, int], ...] = ()
  continues: bool = False  # a final, partial assistant turn the model continues


@dataclass(frozen=True)
class _Span:
  text: str
  trusted: bool  # renderer markup or assistant output: control-token text -> control ids
  train: bool  # assistant output: loss_mask = 1


def _is_list(value: Any) -> bool:
  return isinstance(value, Sequence) and not isinstance(value, (str, bytes, Mapping))


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(text: str, where: str) -> None:
  """Raises ValueError if `text` has a lone surrogate (not encodable, so not tokenizable)."""
  if match := _SURROGATE.search(text):
    raise ValueError(f"{where} contains a lone surrogate (U+{ord(match.group()):04X} at "
                     f"character {match.start()}), which is not valid Unicode text")


def _json_depth(value: Any, limit: int) -> int:
  """Nesting depth of dicts/lists in `value` (a scalar is 0), counted up to `limit + 1`."""
  depth, stack = 0, [(value, 1)]
  while stack:
    item, level = stack.pop()
    if isinstance(item, Mapping):
      children = item.values()
    elif isinstance(item, (list, tuple)):
      children = item
    else:
      continue
    depth = max(depth, level)
    if depth > limit:
      break
    stack.extend((child, level + 1) for child in children)
  return depth


def _json(value: Any, where: str) -> str:
  """`value` as standard JSON text, or a ValueError starting with `where`."""
  if _json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
    raise ValueError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
  try:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
  except ValueError as err:
    if "Out of range float" in str(err):
      raise ValueError(f"{where} contains NaN or Infinity, which is not valid JSON") from None
    raise ValueError(f"{where} is not JSON-serialisable: {err}") from err
  except (TypeError, RecursionError) as err:
    raise ValueError(f"{where} is not JSON-serialisable: {err}") from err
  _check_unicode(text, where)
  return text


class _JSONRejected(ValueError):
  """Raised by the `json.loads` hooks of `_loads` for a value it refuses."""


def _reject_constant(name: str) -> Any:
  raise _JSONRejected(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise _JSONRejected(f"number {text[:40]} is out of range")
  return value


def _bounded_int(text: str) -> int:
  try:
    return int(text)
  except ValueError:  # Python's int-string conversion limit (sys.get_int_max_str_digits)
    raise _JSONRejected(f"integer of {len(text.lstrip('-'))} digits is too long") from None


def _loads(text: str) -> Any:
  """`json.loads` for untrusted text: standard JSON only (no NaN/Infinity, finite floats,
  integers within Python's limit), at most `MAX_JSON_DEPTH` levels deep. Every failure is a
  ValueError whose message is a short reason starting with "invalid JSON"."""
  too_deep = f"invalid JSON (nested more than {MAX_JSON_DEPTH} levels deep)"
  try:
    value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                       parse_int=_bounded_int)
  except json.JSONDecodeError as err:
    raise ValueError(f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                     ) from None
  except _JSONRejected as err:
    raise ValueError(f"invalid JSON ({err})") from None
  except RecursionError:
    raise ValueError(too_deep) from None
  if _json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
    raise ValueError(too_deep)
  # A lone surrogate, literal or escaped ("\\ud800"), is not text a tool or tokenizer takes.
  if _SURROGATE.search(text) or _SURROGATE_ESCAPE.search(text):
    if match := _SURROGATE.search(json.dumps(value, ensure_ascii=False)):
      raise ValueError(f"invalid JSON (lone surrogate U+{ord(match.group()):04X})")
  return value


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
  _check_unicode(name, f"{where}: field '{path}.name'")
  if "arguments" not in call:
    raise error(f"{path}.arguments", "is missing")
  arguments = call["arguments"]
  if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
    try:
      arguments = _loads(arguments)
    except ValueError as err:
      reason = str(err).removeprefix("invalid JSON ")
      raise error(f"{path}.arguments", f"is a string but not valid JSON {reason}") from None
  if not isinstance(arguments, Mapping):
    raise error(f"{path}.arguments",
                f"must be a JSON object (dict), got {type(arguments).__name__}")
  normalized = {"name": name, "arguments": dict(arguments)}
  _json(normalized, f"{where}: field '{path}.arguments'")
  return normalized


def _shown(key: Any) -> str:
  """A message key as it can be printed in an error (escaped if not plain text)."""
  text = str(key)
  return text if text.isprintable() and not _SURROGATE.search(text) else ascii(text)[1:-1]


def _validate_message(index: int, message: Any,
                      delimiters: Sequence[str] = (IM_START, IM_END)) -> _Message:
  """The checked message; assistant text holding one of `delimiters` (turn markup) is refused."""
  where = f"message {index}"
  if not isinstance(message, Mapping):
    raise ValueError(f"{where}: expected a dict, got {type(message).__name__}")
  if "role" not in message:
    raise ValueError(f"{where}: field 'role' is missing")
  role = message["role"]
  if role not in ROLES:
    raise ValueError(f"{where}: field 'role' must be one of {ROLES}, got {role!r}")
  for key, value in message.items():
    if key not in MESSAGE_KEYS and value is not None:
      close = difflib.get_close_matches(str(key), MESSAGE_KEYS, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ValueError(f"{where}: field '{_shown(key)}' is not a message field{hint}; "
                       f"message fields are {list(MESSAGE_KEYS)}")

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
  _check_unicode(content, f"{where}: field 'content'")
  if reasoning is not None:
    _check_unicode(reasoning, f"{where}: field '{given[0]}'")

  continues = message.get("continue")
  if continues is not None:
    if not isinstance(continues, bool):
      raise ValueError(f"{where}: field 'continue' must be true or false, got "
                       f"{type(continues).__name__}")
    if role != "assistant":
      raise ValueError(f"{where}: field 'continue' is only allowed on assistant messages")

  if role == "assistant":
    fields = {"content": content, (given[0] if given else "reasoning"): reasoning or ""}
    fields.update({f"tool_calls[{j}]": _json(c, "") for j, c in enumerate(tool_calls)})
    for field, text in fields.items():
      for delimiter in delimiters:
        if delimiter in text:
          raise ValueError(f"{where}: field '{field}' contains the turn delimiter {delimiter!r}")
  return _Message(role, content, reasoning, tool_calls,
                  _injected_ranges(message.get("injected"), role, content, where),
                  bool(continues))


def _check_continue(msgs: Sequence[_Message], add_generation_prompt: bool) -> bool:
  """Whether the conversation ends inside a partial assistant turn (see the module
  docstring); `continue` anywhere else, or with a generation prompt, is an error."""
  for i, message in enumerate(msgs[:-1]):
    if message.continues:
      raise ValueError(f"message {i}: field 'continue' is only allowed on the last message "
                       "(the partial assistant turn the model continues)")
  if not msgs[-1].continues:
    return False
  if add_generation_prompt:
    raise ValueError(f"message {len(msgs) - 1}: field 'continue' ends the prompt inside this "
                     "assistant turn; it cannot be combined with add_generation_prompt=True")
  return True


def _injected_ranges(raw: Any, role: str, content: str, where: str
                     ) -> tuple[tuple[int, int], ...]:
  """The checked `injected` field: sorted, disjoint, non-empty [start, end) ranges of the
  assistant's `content` (see the module docstring)."""
  if raw is None:
    return ()
  if role != "assistant":
    raise ValueError(f"{where}: field 'injected' is only allowed on assistant messages")
  if not _is_list(raw):
    raise ValueError(f"{where}: field 'injected' must be a list of [start, end] character "
                     f"ranges, got {type(raw).__name__}")
  ranges, end = [], 0
  for j, item in enumerate(raw):
    if (not _is_list(item) or len(item) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
      raise ValueError(f"{where}: field 'injected[{j}]' must be [start, end] (two integers), "
                       f"got {item!r}")
    start, stop = item
    if not end <= start < stop <= len(content):
      raise ValueError(f"{where}: field 'injected[{j}]' = [{start}, {stop}] must be non-empty, "
                       f"after the previous range and within the content ({len(content)} "
                       "characters)")
    ranges.append((start, stop))
    end = stop
  return tuple(ranges)


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
  continues = _check_continue(msgs, add_generation_prompt)
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
      body, pos = _assistant_body(message), 0
      # The content follows the think block (if any); tool calls follow the content.
      offset = 0 if message.reasoning is None else len(
          f"{THINK_START}\n{message.reasoning}\n{THINK_END}\n\n")
      for start, end in message.injected:
        spans.append(_Span(body[pos:offset + start], trusted=True, train=True))
        untrusted(body[offset + start:offset + end])
        pos = offset + end
      spans.append(_Span(body[pos:], trusted=True, train=True))
      if continues and i + 1 == len(msgs):
        break  # the prompt ends inside this turn: no end-of-turn token
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
  templates: Mapping[str, ChatTemplate]  # the tokenizer's own; empty: ChatML


_PLANS: weakref.WeakKeyDictionary[Any, _TokenizerPlan] = weakref.WeakKeyDictionary()


def _make_plan(tokenizer: Tokenizer) -> _TokenizerPlan:
  sources = dict(getattr(tokenizer, "chat_templates", None) or {})
  if not sources:
    for token in (IM_START, IM_END):
      token_id = tokenizer.token_to_id(token)
      if token_id is None or tokenizer.encode(token) != [token_id]:
        raise ValueError(f"{tokenizer!r} has no chat template and no single id for the ChatML "
                         f"token {token!r}")
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
  strings = dict(getattr(tokenizer, "token_strings", None) or {})
  templates = {
      name: ChatTemplate(source, controls=controls, token_strings=strings,
                         origin=f"{tokenizer!r} chat template {name!r}")
      for name, source in sources.items()
  }
  return _TokenizerPlan(control_pattern=pattern, templates=templates)


def _plan(tokenizer: Tokenizer) -> _TokenizerPlan:
  try:
    plan = _PLANS.get(tokenizer)
  except TypeError:  # not weak-referenceable: no caching
    return _make_plan(tokenizer)
  if plan is None:
    plan = _make_plan(tokenizer)
    _PLANS[tokenizer] = plan
  return plan


def chat_template(tokenizer: Tokenizer, *, tools: bool = False) -> ChatTemplate | None:
  """The tokenizer's own chat template ("tool_use" when `tools` and it has one), or None when
  chats are rendered as ChatML."""
  templates = _plan(tokenizer).templates
  if tools and "tool_use" in templates:
    return templates["tool_use"]
  return templates.get("default") or next(iter(templates.values()), None)


def end_of_turn_id(tokenizer: Tokenizer) -> int:
  """The id that ends an assistant turn: `<|im_end|>` for ChatML, else the template's."""
  template = chat_template(tokenizer)
  token = IM_END if template is None else template.turn_end
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{tokenizer!r}: the end-of-turn token {token!r} has no id")
  return token_id


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """The ids that end an assistant turn when sampling chats: end of turn and EOS."""
  ids = (end_of_turn_id(tokenizer), tokenizer.eos_id)
  return tuple(dict.fromkeys(i for i in ids if i is not None and i >= 0))


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


def _template_message(message: Message, parsed: _Message) -> dict[str, Any]:
  """A validated message as chat templates read it (the OpenAI/transformers shape)."""
  out: dict[str, Any] = {"role": parsed.role, "content": parsed.content}
  if parsed.reasoning is not None:  # transformers passes reasoning under these names
    out["reasoning_content"] = out["thinking"] = parsed.reasoning
  if parsed.tool_calls:  # only when there are calls: Llama's template tests the key's presence
    out["tool_calls"] = [{"type": "function", "function": dict(call)}
                         for call in parsed.tool_calls]
  for key in ("name", "tool_call_id"):
    if message.get(key) is not None:
      out[key] = message[key]
  return out


def _template_spans(template: ChatTemplate, messages: Sequence[Message],
                    tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool,
                    template_kwargs: Mapping[str, Any]) -> list[_Span]:
  if not _is_list(messages):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty")
  delimiters = (IM_START, IM_END, *template.delimiters)
  parsed = [_validate_message(i, m, delimiters) for i, m in enumerate(messages)]
  continues = _check_continue(parsed, add_generation_prompt)
  for i, message in enumerate(parsed):
    if message.injected:
      raise ValueError(f"message {i}: field 'injected' needs the ChatML layout; this "
                       "tokenizer renders with its own chat template")
  _validate_tools(tools)
  template_messages = [_template_message(m, p) for m, p in zip(messages, parsed)]
  text, regions = template.regions(template_messages, tools=list(tools) if tools else None,
                                   add_generation_prompt=add_generation_prompt,
                                   **template_kwargs)
  spans, pos = [], 0
  for region in regions:
    if region.start > pos:
      spans.append(_Span(text[pos:region.start], trusted=True, train=False))
    spans.append(_Span(text[region.start:region.end], trusted=region.kind != UNTRUSTED,
                       train=region.kind == TRAIN))
    pos = region.end
  if pos < len(text):
    spans.append(_Span(text[pos:], trusted=True, train=False))
  spans = [span for span in spans if span.text]
  if continues:
    spans = _cut_spans(spans, _continued_length(template, template_messages, text, tools,
                                                template_kwargs))
  return spans


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _continued_length(template: ChatTemplate, messages: list[dict[str, Any]], text: str,
                      tools: Sequence[Mapping[str, Any]] | None,
                      template_kwargs: Mapping[str, Any]) -> int:
  """Where a prompt that continues the final message ends in `text` (that conversation
  rendered whole), found as transformers' `continue_final_message` finds it: render with a
  tag after the final content and cut at the tag; when the template trimmed the space after
  the tag, it trims the content too, and the cut text is right-stripped as well."""
  tagged = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_TAG}]
  rendered = template.render_text(tagged, tools=list(tools) if tools else None,
                                  add_generation_prompt=False, **template_kwargs)
  at = rendered.rfind(_CONTINUE_TAG.strip())
  if at < 0:
    raise ValueError(f"message {len(messages) - 1}: the chat template does not render the "
                     "content of the continued assistant turn; cannot continue it")
  cut = rendered[:at]
  if rendered[at:at + len(_CONTINUE_TAG)] != _CONTINUE_TAG:
    cut = cut.rstrip()
  if not text.startswith(cut):
    raise ValueError(f"message {len(messages) - 1}: the chat template renders the continued "
                     "assistant turn differently with and without its end; cannot continue it")
  return len(cut)


def _cut_spans(spans: Sequence[_Span], length: int) -> list[_Span]:
  """The spans of the first `length` characters of their text."""
  out, pos = [], 0
  for span in spans:
    if pos >= length:
      break
    out.append(_Span(span.text[:length - pos], span.trusted, span.train))
    pos += len(span.text)
  return [span for span in out if span.text]


def _chat_spans(messages: Sequence[Message], tokenizer: Tokenizer | None,
                tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool,
                template_kwargs: Mapping[str, Any] | None) -> list[_Span]:
  template = None if tokenizer is None else chat_template(tokenizer, tools=bool(tools))
  if template is None:
    if template_kwargs:
      raise ValueError(f"template_kwargs {sorted(template_kwargs)} need a tokenizer with a chat "
                       "template; ChatML takes none")
    return _spans(messages, tools, add_generation_prompt)
  return _template_spans(template, messages, tools, add_generation_prompt, template_kwargs or {})


def render_text(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    tokenizer: Tokenizer | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
  """The rendered conversation as a string: ChatML (see the module docstring), or the
  tokenizer's own chat template when `tokenizer` has one."""
  spans = _chat_spans(messages, tokenizer, tools, add_generation_prompt, template_kwargs)
  return "".join(span.text for span in spans)


def render(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedChat:
  """Renders and tokenises `messages`, with a loss mask over the assistant's output.

    The tokenizer's own chat template renders the text when it has one (`template_kwargs`,
    e.g. `{"enable_thinking": False}`, go to it, as in `apply_chat_template`); otherwise the
    layout is ChatML. Raises ValueError naming the message index and field for malformed
    messages, and for a tokenizer that cannot be encoded span by span or (ChatML) lacks single
    ids for `<|im_start|>`/`<|im_end|>`.
    """
  spans = _chat_spans(messages, tokenizer, tools, add_generation_prompt, template_kwargs)
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


def parse_turn_tool_calls(text: str, tokenizer: Tokenizer) -> list[dict[str, Any]]:
  """The tool calls of one generated assistant turn, in the chat format's own syntax.

    ChatML and templates with `<tool_call>` blocks: `parse_tool_calls(text, strict=False)`.
    Templates whose calls are a JSON turn (Llama 3.1+: `{"name": ..., "parameters": {...}}`,
    optionally after `<|python_tag|>`): the whole turn, without its end-of-turn token, is one
    call when it is a JSON object with a "name"; a turn that starts with "{" and mentions
    "name" but does not parse is a malformed call; anything else is an answer (no calls).
    Never raises; malformed calls are `{"error", "raw"}` as in `parse_tool_calls`.
    """
  template = chat_template(tokenizer, tools=True)
  if template is None or template.tool_style != "json":
    return parse_tool_calls(text, strict=False)
  body = text
  for token in (template.turn_end, *template.delimiters, "<|python_tag|>", "<|eom_id|>"):
    body = body.replace(token, "")
  body = body.strip()
  if not body.startswith("{"):
    return []
  try:
    call = _loads(body)
  except ValueError as err:
    return [{"error": str(err), "raw": _cut(body)}] if '"name"' in body else []
  if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
    return [{"error": "'name' must be a non-empty string", "raw": _cut(body)}]
  arguments = call.get("parameters", call.get("arguments", {}))
  if isinstance(arguments, str):
    try:
      arguments = _loads(arguments)
    except ValueError as err:
      return [{"error": f"'parameters' is a string with {err}", "raw": _cut(body)}]
  if not isinstance(arguments, dict):
    return [{"error": "'parameters' must be a JSON object", "raw": _cut(body)}]
  return [{"name": call["name"], "arguments": arguments}]


def tool_turn_ids(results: Sequence[str], tokenizer: Tokenizer) -> list[int]:
  """The ids that follow a generated assistant turn (its end-of-turn token included) when
  tools answered its calls with `results`: the tool turn(s) and the next generation prompt,
  exactly as `render` writes them inside a whole conversation (results are untrusted)."""
  template = chat_template(tokenizer, tools=True)
  calls = len(results) if template is None or template.tool_style != "json" else 1
  messages: list[dict[str, Any]] = [{"role": "user", "content": "?"}, {
      "role": "assistant", "content": "",
      "tool_calls": [{"name": "t", "arguments": {}}] * calls}]
  messages += [{"role": "tool", "content": r} for r in results]
  rendered = render(messages, tokenizer, add_generation_prompt=True)
  last = int(np.nonzero(rendered.loss_mask)[0][-1])
  return rendered.input_ids[last + 1:].tolist()


def validate_training_messages(messages: Sequence[Message]) -> None:
  """Checks a conversation that is a training target, beyond what `render` needs.

    Every assistant turn is trained on, so each must be something the model should learn to
    write. Raises ValueError naming the message index (and field) for:

    * an empty assistant turn: blank content (empty or whitespace), no tool calls and no
      reasoning text (it would teach the model to end its turn at once);
    * a `<tool_call>` block written in an assistant message's content that
      `parse_tool_calls(strict=True)` rejects (broken JSON, NaN, unterminated, ...);
    * a `tool` message that answers no call: each run of consecutive `tool` messages must
      directly follow an assistant message that made at least as many calls (`tool_calls`
      plus `<tool_call>` blocks in its content);
    * a partial assistant turn (`"continue": true`): it is a prompt, not a target.

    Also runs the structural validation of `render` (roles, fields, tool calls, Unicode).
    """
  if not _is_list(messages):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  msgs = [_validate_message(i, m) for i, m in enumerate(messages)]
  calls_made, results = 0, 0  # of the assistant message the current tool run answers
  for i, message in enumerate(msgs):
    where = f"message {i}"
    if message.continues:
      raise ValueError(f"{where}: field 'continue' marks a partial assistant turn, which is a "
                       "prompt to continue, not a training target")
    if message.role == "assistant":
      try:
        inline = parse_tool_calls(message.content, strict=True)
      except ToolCallParseError as err:
        raise ValueError(f"{where}: field 'content' has a malformed {TOOL_CALL_START} block "
                         f"(tool call {err.index}: {err.reason})") from None
      if (not message.content.strip() and not message.tool_calls and not inline
          and not (message.reasoning or "").strip()):
        raise ValueError(f"{where}: field 'content' is empty in an assistant turn without tool "
                         "calls or reasoning (it would teach the model to end its turn at once)")
      calls_made, results = len(message.tool_calls) + len(inline), 0
    elif message.role == "tool":
      results += 1
      if i == 0 or (msgs[i - 1].role not in ("assistant", "tool")):
        previous = (f"the message before it is a '{msgs[i - 1].role}' message" if i
                    else "it is the first message")
        raise ValueError(f"{where}: a 'tool' message must follow an assistant message's tool "
                         f"call, but {previous}")
      if results > calls_made:
        raise ValueError(f"{where}: tool result {results} answers no call: the assistant "
                         f"message before it made {calls_made} tool call(s)")
    else:
      calls_made, results = 0, 0


def _cut(raw: str) -> str:
  """`raw` cut to `MAX_RAW_CHARS` characters, saying how many were dropped."""
  if len(raw) <= MAX_RAW_CHARS:
    return raw
  return f"{raw[:MAX_RAW_CHARS]}...[{len(raw) - MAX_RAW_CHARS} more characters]"


def parse_tool_calls(text: str, *, strict: bool = True) -> list[dict[str, Any]]:
  """Extracts `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks from `text`.

    Returns `[{"name": str, "arguments": dict}, ...]` in order of appearance. Whitespace
    around the JSON is ignored, and `arguments` given as a JSON string is decoded. A block
    that is unterminated, not valid JSON, or not `{"name": str, "arguments": object}` raises
    `ToolCallParseError` (a ValueError naming the call index) when `strict`; otherwise it
    appears in the list as `{"error": reason, "raw": block text}` so that a tool loop can
    report it back to the model. Blocks inside `<think>` are not treated specially: pass the
    assistant content, not the reasoning, if that matters.

    `text` is untrusted model output. Only standard JSON is accepted: NaN, Infinity and
    out-of-range floats (1e999), integers longer than Python's int-string limit, and nesting
    deeper than `MAX_JSON_DEPTH` levels are invalid JSON. `raw` (in the dict and in
    `ToolCallParseError.raw`) is cut to `MAX_RAW_CHARS` characters. With `strict=False` this
    never raises for any `text` (a str).
    """
  calls: list[dict[str, Any]] = []

  def bad(reason: str, raw: str) -> None:
    if strict:
      raise ToolCallParseError(len(calls), reason, _cut(raw))
    calls.append({"error": reason, "raw": _cut(raw)})

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
      call = _loads(raw)
    except ValueError as err:
      bad(str(err), raw)
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
        arguments = _loads(arguments)
      except ValueError as err:
        bad(f"'arguments' must be a JSON object (it is a string with {err})", raw)
        continue
    if not isinstance(arguments, dict):
      bad("'arguments' must be a JSON object", raw)
      continue
    calls.append({"name": name, "arguments": arguments})
  return calls
