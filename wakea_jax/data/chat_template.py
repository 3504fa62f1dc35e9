"""A model's own jinja chat template, rendered as `transformers` renders it, with the regions
the chat renderer needs for an exact assistant-only loss mask.

`transformers.apply_chat_template` renders `messages` through the template in a sandboxed
jinja2 environment (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a `tojson` filter that
keeps non-ASCII, `raise_exception`, `strftime_now`, the special-token strings as variables)
and tokenises the text as one string. `ChatTemplate.render_text` builds the same
environment and the same variables, so the text is the same; `wakea_jax.data.chat` then
encodes it region by region (see there for why that equals whole-string encoding).

Regions, found without any `{% generation %}` markers in the template:

* The **assistant header** `header` and the **end-of-turn token** `turn_end` are read once
  from probe conversations with a sentinel as the assistant's content: the header is the text
  between the user's turn and the sentinel (the common prefix over a final and a non-final
  assistant turn, so Qwen3's empty `<think>` block on the final turn counts as output, which
  the model does write at inference), and the end-of-turn token is the first control token
  after the sentinel (`<|im_end|>` for Qwen, `<|eot_id|>` for Llama 3).
* Each assistant message's **trained region** runs from the end of its header to the end of
  its end-of-turn token. The headers are found in order; their count must equal the number
  of assistant messages (plus one for the generation prompt), or the conversation is refused
  with an error rather than trained with a wrong mask.
* **Untrusted regions**: a system/user/tool message whose content contains a control-token
  string is rendered a second time with a placeholder instead of that content; the part of
  the text where the two renderings differ is that content as the template wrote it, and is
  encoded so that it can never become a control id. Tool schemas that contain control-token
  strings are refused.

The generation prompt (`add_generation_prompt=True`) is markup. Templates whose generation
prompt is longer than the header (Qwen3 with `enable_thinking=False` appends an empty think
block) still train from the end of the header.

Tool calls. `tool_style` is read from the template source: "tags" when it writes
`<tool_call>` blocks (Qwen), "json" when it writes `{"name": ..., "parameters": ...}` turns
(Llama 3.1+), None when it has no tool-call syntax.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Private-use characters: no tokenizer or template gives them a meaning.
_SENTINEL = "\ue000"
_PLACEHOLDER = "\ue001"

TRAIN = "train"
UNTRUSTED = "untrusted"


class ChatTemplateError(ValueError):
  """A template that fails to render, or whose output cannot be split into turns."""


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body (transformers uses the block to
  track assistant text; the regions here do not need it)."""

  tags = {"generation"}

  def parse(self, parser: Any) -> nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration", ), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


_ENV = _environment()


@dataclasses.dataclass(frozen=True)
class Region:
  """Characters [start, end) of the rendered text: assistant output (TRAIN) or message text
  that must not produce control ids (UNTRUSTED)."""

  start: int
  end: int
  kind: str


def _control_at(text: str, controls: Sequence[str]) -> tuple[int, str] | None:
  """(position, token) of the first control-token string in `text` (longest at a tie)."""
  best = None
  for token in controls:
    pos = text.find(token)
    if pos >= 0 and (best is None or (pos, -len(token)) < (best[0], -len(best[1]))):
      best = (pos, token)
  return best


class ChatTemplate:
  """One compiled chat template bound to a tokenizer's special-token strings.

  `controls` are the texts of the tokenizer's control tokens (its `special_ids`); they find
  the end-of-turn token and the content that must be encoded as untrusted.
  """

  def __init__(self, source: str, *, controls: Iterable[str],
               token_strings: Mapping[str, str] | None = None, origin: str = "chat template"):
    self.source = source
    self.origin = origin
    self.controls = tuple(sorted({c for c in controls if len(c) > 1}, key=len, reverse=True))
    self._variables = dict(token_strings or {})
    try:
      self._template = _ENV.from_string(source)
    except jinja2.TemplateError as err:
      raise ChatTemplateError(f"{origin}: the chat template does not compile: {err}") from err
    if "<tool_call>" in source:
      self.tool_style: str | None = "tags"
    elif "parameters" in source and "tool_call" in source:
      self.tool_style = "json"
    else:
      self.tool_style = None
    self.header, self.turn_end, self.generation_prompt = self._probe()
    # Control tokens of the turn markup: assistant text containing one is corrupt data.
    self.delimiters = tuple(c for c in self.controls if c in self.header + self.turn_end)

  def render_text(self, messages: Sequence[Mapping[str, Any]], *,
                  tools: Sequence[Mapping[str, Any]] | None = None,
                  add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The template's text for `messages` (plain dicts, as given to transformers)."""
    try:
      return self._template.render(messages=list(messages), tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **self._variables, **kwargs)
    except jinja2.TemplateError as err:
      raise ChatTemplateError(f"{self.origin}: the chat template failed on this conversation: "
                              f"{err}") from err
    except (TypeError, ValueError, KeyError, AttributeError) as err:
      raise ChatTemplateError(f"{self.origin}: the chat template failed on this conversation: "
                              f"{type(err).__name__}: {err}") from err

  def _probe(self) -> tuple[str, str, str]:
    user = {"role": "user", "content": "Hi"}
    later = {"role": "user", "content": "Thanks"}
    probe = {"role": "assistant", "content": _SENTINEL}
    before = self.render_text([user])

    def turn(messages: list[dict[str, str]]) -> str:
      text = self.render_text(messages)
      if not text.startswith(before) or _SENTINEL not in text[len(before):]:
        raise ChatTemplateError(
            f"{self.origin}: cannot find the assistant turn: rendering [user, assistant, ...] "
            "does not extend the rendering of [user] with the assistant's content")
      return text[len(before):]

    final, middle = turn([user, probe]), turn([user, probe, later])
    head_final, head_middle = final.split(_SENTINEL)[0], middle.split(_SENTINEL)[0]
    header = head_final[:next((k for k, (a, b) in enumerate(zip(head_final, head_middle))
                               if a != b), min(len(head_final), len(head_middle)))]
    if not header:
      raise ChatTemplateError(f"{self.origin}: the assistant turn has no header text")
    after = middle.split(_SENTINEL, 1)[1]
    found = _control_at(after, self.controls)
    if found is None:
      raise ChatTemplateError(f"{self.origin}: no control token ends the assistant turn (text "
                              f"after it: {after[:80]!r}); a chat template needs an "
                              "end-of-turn token to stop generation")
    prompt = self.render_text([user], add_generation_prompt=True)
    if not prompt.startswith(before):
      raise ChatTemplateError(f"{self.origin}: add_generation_prompt changes the earlier text")
    return header, found[1], prompt[len(before):]

  def regions(self, messages: Sequence[Mapping[str, Any]], *,
              tools: Sequence[Mapping[str, Any]] | None = None,
              add_generation_prompt: bool = False, **kwargs: Any) -> tuple[str, list[Region]]:
    """(text, regions sorted by start) for `messages` (see the module docstring)."""
    text = self.render_text(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                            **kwargs)
    for k, tool in enumerate(tools or ()):
      if _control_at(json.dumps(tool, ensure_ascii=False), self.controls):
        raise ValueError(f"tools[{k}] contains a control-token string of the tokenizer")
    untrusted = []
    for i, message in enumerate(messages):
      content = message.get("content")
      if (message.get("role") == "assistant" or not isinstance(content, str)
          or _control_at(content, self.controls) is None):
        continue
      swapped = [dict(m) for m in messages]
      swapped[i]["content"] = _PLACEHOLDER
      other = self.render_text(swapped, tools=tools, add_generation_prompt=add_generation_prompt,
                               **kwargs)
      start = next((k for k, (a, b) in enumerate(zip(text, other)) if a != b),
                   min(len(text), len(other)))
      tail = 0
      while (tail < min(len(text), len(other)) - start
             and text[len(text) - 1 - tail] == other[len(other) - 1 - tail]):
        tail += 1
      if _PLACEHOLDER not in other[start:len(other) - tail]:
        raise ChatTemplateError(f"{self.origin}: cannot locate the text of message {i}")
      untrusted.append(Region(start, len(text) - tail, UNTRUSTED))

    def skip_untrusted(pos: int) -> int:
      for region in untrusted:
        if region.start <= pos < region.end:
          return region.end
      return -1

    trained, cursor = [], 0
    expected = sum(m.get("role") == "assistant" for m in messages)
    for index, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      pos = text.find(self.header, cursor)
      while pos >= 0 and (resume := skip_untrusted(pos)) >= 0:
        pos = text.find(self.header, resume)
      if pos < 0:
        raise ChatTemplateError(f"{self.origin}: message {index}: the assistant header "
                                f"{self.header!r} is not in the rendered text where expected; "
                                f"the template rendered {expected} assistant message(s) "
                                "differently from its probe")
      start = pos + len(self.header)
      end = text.find(self.turn_end, start)
      if end < 0:
        raise ChatTemplateError(f"{self.origin}: message {index}: the assistant turn is not "
                                f"closed by {self.turn_end!r}")
      cursor = end + len(self.turn_end)
      trained.append(Region(start, cursor, TRAIN))
    rest = text.count(self.header, cursor) - sum(
        text.count(self.header, r.start, r.end) for r in untrusted if r.start >= cursor)
    if rest != int(add_generation_prompt and self.generation_prompt.startswith(self.header)):
      raise ChatTemplateError(f"{self.origin}: found {rest} assistant header(s) after the "
                              "last assistant message; the template's turns do not match the "
                              "messages")
    return text, sorted(untrusted + trained, key=lambda r: r.start)
