"""Record schemas of chat training data: validation, normalisation, errors naming the field.

SFT records, told apart by their fields ([...] is a list of chat messages, see chat.py;
"tools" are tool JSON schemas shown in the prompt):
  {"messages": [...], "tools"?: [...]}
      a chat with tool calls, reasoning, ...; every assistant turn is trained on
  {"prompt": str | [...], "completion": str | [...], "system"?: str, "tools"?: [...]}
      TRL's prompt-completion, standard (strings) or conversational (message lists); only
      the completion is trained on (TRL's default, completion-only loss)
  {"prompt": str, "response": str, "system"?: str}
      the same as a string prompt and completion
This stack trains chat models, so a string prompt becomes a user message (after a system
message when "system" is given; a prompt list holds its own) and a string completion the
assistant's reply. A prompt list must end before the assistant's answer; assistant turns in it
(earlier turns, few-shot examples) are context, never trained on. A completion list starts and
ends with an assistant message, with only assistant and tool messages between. Other fields
are ignored (Hub datasets carry ids, scores, ...); when "messages" is present, it is the record.
TRL's standard language-modeling form `{"text": ...}` has no chat in it and is refused, like
any record that matches no schema (the error lists the schemas).

Examples:
  {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
  {"prompt": "2+2?", "completion": "4"}
  {"prompt": [{"role": "user", "content": "2+2?"}],
   "completion": [{"role": "assistant", "content": "4"}]}

`to_record` returns `{"messages": [...], "tools"?: [...]}`, or `{"prompt": [...],
"completion": [...], "tools"?: [...]}` when the prompt has assistant turns (so the pipeline
knows where training starts); both are input schemas, so normalised records load back as they
are.

Prompts that await an answer (RL prompt sets, preference pairs) share `prompt_messages`:
`{"prompt": str, "system"?: str}`, `{"prompt": [...]}` (TRL's prompt-only, conversational) or
`{"messages": [...]}`, ending before the assistant's turn; answers (completions, chosen and
rejected responses) share `response_messages`.

Malformed means: a record outside the schemas above, anything `chat.render` refuses (roles,
unknown message keys such as a misspelt `contnet`, tool calls that are not standard JSON (NaN,
Infinity), lone surrogates, turn delimiters in assistant text), and, since every record is a
training target, what `chat.validate_training_messages` refuses: empty assistant turns,
malformed `<tool_call>` blocks written in assistant content, and `tool` messages that answer no
call. Every error starts with the record's location (`where`) and names the field as a path in
the record: `data/x.jsonl:17: field 'completion[0].content' must be a string`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from wakea_jax.data import chat

SCHEMAS = ("'messages' (+ 'tools')", "'prompt' + 'completion' (+ 'system', 'tools')",
           "'prompt' + 'response' (+ 'system')")

# {"messages": [...], "tools"?: [...]}, or {"prompt": [...], "completion": [...], "tools"?}
# when the prompt has assistant turns that must not be trained on.
Record = dict[str, Any]

# chat.py names the message and field ("message 2: field 'content' ..."); a source names the
# record field instead, so the message is rewritten as a path inside the record.
_CHAT_FIELD_ERROR = re.compile(r"^message (\d+): field '([^']*)'(.*)$", re.DOTALL)
_CHAT_MESSAGE_ERROR = re.compile(r"^message (\d+): (.*)$", re.DOTALL)

# Where each message of a record came from: (record field, whole). `whole` means the field is
# a string that became the message's content (a string prompt, completion, system, ...), so
# "message 1: field 'content' ..." is reported as "field 'completion' ...".
Paths = list[tuple[str, bool]]


def _chat_error(where: str, err: ValueError, paths: Paths) -> ValueError:
  """Rewrites a chat.py validation error as `{where}: field 'messages[i].x' ...`."""
  text = str(err)
  if match := _CHAT_FIELD_ERROR.match(text):
    index, field, rest = int(match[1]), match[2], match[3]
    base, whole = paths[index] if index < len(paths) else (f"messages[{index}]", False)
    if whole:
      return ValueError(f"{where}: field '{base}'" + (rest if field == "content"
                                                     else f" ({field}){rest}"))
    return ValueError(f"{where}: field '{base}.{field}'{rest}")
  if match := _CHAT_MESSAGE_ERROR.match(text):
    index = int(match[1])
    base = paths[index][0] if index < len(paths) else f"messages[{index}]"
    return ValueError(f"{where}: field '{base}': {match[2]}")
  return ValueError(f"{where}: {text}")


def type_name(value: Any) -> str:
  """The JSON-ish name of a value's type for error messages."""
  return "null" if value is None else type(value).__name__


def _message_list(value: Any, field: str, where: str) -> list[dict[str, Any]]:
  for k, message in enumerate(value):
    if not isinstance(message, Mapping):
      raise ValueError(f"{where}: field '{field}[{k}]' must be a message object, got "
                       f"{type_name(message)}")
  return [dict(m) for m in value]


def prompt_messages(raw: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
  """The prompt of a record that awaits an answer (RL prompts, preference pairs, SFT
  completions): `"messages"` or a `"prompt"` list, ending before the assistant's turn, or a
  `"prompt"` string with an optional `"system"`. Raises ValueError starting with `where` and
  naming the field."""
  if "messages" in raw and "prompt" in raw:
    raise ValueError(f"{where}: give either field 'messages' or field 'prompt', not both")
  if "messages" not in raw and "prompt" not in raw:
    raise ValueError(f"{where}: field 'prompt' (or 'messages') is missing")
  field = "messages" if "messages" in raw else "prompt"
  value = raw[field]
  if isinstance(value, str) and field == "prompt":
    if not value.strip():
      raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
      raise ValueError(f"{where}: field 'system' must be a string, got {type_name(system)}")
    prompt = ([{"role": "system", "content": system}] if system else [])
    prompt.append({"role": "user", "content": value})
    return prompt
  if not isinstance(value, list):
    kinds = "a non-empty list" if field == "messages" else "a string or a list of messages"
    raise ValueError(f"{where}: field '{field}' must be {kinds}, got {type_name(value)}")
  if not value:
    raise ValueError(f"{where}: field '{field}' must be a non-empty list")
  if field == "prompt" and raw.get("system") is not None:
    raise ValueError(f"{where}: field 'system' goes with a string 'prompt'; a 'prompt' list "
                     "holds its own system message")
  prompt = _message_list(value, field, where)
  if prompt[-1].get("role") == "assistant":
    raise ValueError(f"{where}: field '{field}' must end before the assistant's answer "
                     "(the last message is an assistant turn)")
  return prompt


def response_messages(value: Any, field: str, where: str, *, start: int = 0
                      ) -> list[dict[str, Any]]:
  """An answer as messages: a non-empty string (the assistant's reply), one assistant message,
  or a list that starts and ends with an assistant message, with only assistant and tool
  messages between. `start` is the list's offset inside the record's field (for error
  messages, when the answer is the tail of a whole conversation)."""
  if isinstance(value, str):
    if not value.strip():
      raise ValueError(f"{where}: field '{field}' must be a non-empty string")
    return [{"role": "assistant", "content": value}]
  if isinstance(value, Mapping):
    value = [value]
  if not isinstance(value, list) or not value:
    raise ValueError(f"{where}: field '{field}' must be a non-empty string, an assistant message "
                     f"or a list of messages, got {type_name(value)}")
  for k, message in enumerate(value):
    if not isinstance(message, Mapping):
      raise ValueError(f"{where}: field '{field}[{start + k}]' must be a message object, got "
                       f"{type_name(message)}")
    role = message.get("role")
    if k in (0, len(value) - 1) and role != "assistant":
      raise ValueError(f"{where}: field '{field}[{start + k}].role' must be 'assistant' (a "
                       f"response starts and ends with an assistant message), got {role!r}")
    if role not in ("assistant", "tool"):
      raise ValueError(f"{where}: field '{field}[{start + k}].role' must be 'assistant' or "
                       f"'tool' inside a response, got {role!r}")
  return [dict(m) for m in value]


def _no_schema(raw: Mapping[str, Any], where: str) -> ValueError:
  if "text" in raw:
    return ValueError(f"{where}: field 'text' (TRL's standard language-modeling form) is not "
                      "supported: this stack trains chat models; give 'messages', or 'prompt' "
                      "and 'completion'")
  if "chosen" in raw or "rejected" in raw:
    return ValueError(f"{where}: a preference pair ('chosen', 'rejected') is not an SFT record; "
                      "load it as preference data, or give 'messages' or 'completion'")
  fields = sorted(str(k) for k in raw)
  shown = fields[:8] + (["..."] if len(fields) > 8 else [])
  return ValueError(f"{where}: matches no record schema (fields {shown}); accepted: "
                    + "; ".join(SCHEMAS))


def _prompt_and_answer(raw: Mapping[str, Any], where: str) -> tuple[list[dict[str, Any]], Paths,
                                                                    int]:
  """(messages, their paths, number of prompt messages that are context only) of a
  prompt/completion or prompt/response record."""
  if "completion" in raw and "response" in raw:
    raise ValueError(f"{where}: give field 'completion' or field 'response', not both")
  if "prompt" not in raw:
    raise ValueError(f"{where}: field 'prompt' is missing")
  if "response" in raw:  # the original schema: strings only
    for field in ("prompt", "response"):
      if not isinstance(raw[field], str):
        raise ValueError(
            f"{where}: field '{field}' must be a string, got {type_name(raw[field])}")
    messages = [{"role": "user", "content": raw["prompt"]},
                {"role": "assistant", "content": raw["response"]}]
    paths: Paths = [("prompt", True), ("response", True)]
    if raw.get("system") is not None:
      if not isinstance(raw["system"], str):
        raise ValueError(
            f"{where}: field 'system' must be a string, got {type_name(raw['system'])}")
      messages.insert(0, {"role": "system", "content": raw["system"]})
      paths.insert(0, ("system", True))
    return messages, paths, 0
  prompt = prompt_messages(raw, where)
  if "completion" not in raw:
    raise ValueError(f"{where}: field 'completion' (or 'response') is missing: an SFT record "
                     "needs the answer to train on (prompt-only records are RL prompts)")
  if isinstance(raw["prompt"], str):
    paths = [("system", True)] * (len(prompt) - 1) + [("prompt", True)]
    context = 0
  else:
    paths = [(f"prompt[{k}]", False) for k in range(len(prompt))]
    context = len(prompt) if any(m.get("role") == "assistant" for m in prompt) else 0
  value = raw["completion"]
  completion = response_messages(value, "completion", where)
  if isinstance(value, str):
    paths.append(("completion", True))
  elif isinstance(value, Mapping):
    paths.append(("completion", False))
  else:
    paths += [(f"completion[{k}]", False) for k in range(len(completion))]
  return prompt + completion, paths, context


def to_record(raw: Any, where: str) -> Record:
  """Validates one raw record and returns it in `Source.records`' schema.

  Raises ValueError starting with `where` and naming the field.
  """
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a record must be a JSON object, got {type_name(raw)}")
  context = 0
  if "messages" in raw:
    messages = raw["messages"]
    if not isinstance(messages, list):
      raise ValueError(f"{where}: field 'messages' must be a list, got {type_name(messages)}")
    if not messages:
      raise ValueError(f"{where}: field 'messages' must be a non-empty list")
    paths = [(f"messages[{k}]", False) for k in range(len(messages))]
  elif ("completion" in raw or "response" in raw
        or ("prompt" in raw and "chosen" not in raw and "rejected" not in raw)):
    messages, paths, context = _prompt_and_answer(raw, where)
  else:
    raise _no_schema(raw, where)

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
    raise _chat_error(where, err, paths) from None
  if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
    raise ValueError(f"{where}: field 'messages' has no assistant message to train on")
  messages = [dict(m) for m in messages]
  record: Record = ({"prompt": messages[:context], "completion": messages[context:]} if context
                    else {"messages": messages})
  if tools:
    record["tools"] = [dict(t) for t in tools]
  return record
