"""Interaction protocols: when a generating row pauses, what the host runs, and what goes back
into the row's context before it resumes.

`ContinuousBatcher.run_protocol` drives any of them. A row pauses when it ends its turn (a
stop id) or writes one of the protocol's `pause_strings` (it is cut right after the string,
as a stop string cuts); the protocol's `on_stop` looks at the text the model wrote since the
last injection and returns a payload for `respond` (which runs in a worker thread while the
other rows decode) or None, with the stop reason, to end the request. `respond` returns the
token ids to append; they are marked in `tool_mask`, so every loss leaves them out, and the
row resumes.

  ChatToolCalls  the chat format's tool calls (`<tool_call>` blocks, Llama 3.1 JSON turns):
                 pause at the end of turn, run the calls through the Router, append the
                 tool turn and the next generation prompt (what `run_tool_loop` does).
  SearchR1       Search-R1 (arXiv 2503.09516): the model writes `<search>query</search>`;
                 the top-k passages come back as `<information>...</information>` in the
                 same assistant turn; at most `max_searches`, then it must `<answer>`.
  RSearch        R-Search query DAGs: a `<search>` block of `Nodes:`/`Edges:` over named
                 sources, executed in topological order (`toolbox.search_dag`), the results
                 appended as `<r>...</r>` blocks (`toolbox.search_render`).

Retrieved text is untrusted: chat control tokens in it (`<|...|>`) are removed before it is
tokenised, so a document cannot end the assistant's turn or open a new one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol

from wakea_jax.data import chat
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.sampling.sampler import STOP_ID
from wakea_jax.sampling.tool_loop import check_tool_budget, tool_turn
from wakea_jax.toolbox.router import Router
from wakea_jax.toolbox.search_dag import DAGCaps, DAGError
from wakea_jax.toolbox.search_render import RenderCaps, search_response
from wakea_jax.toolbox.search_sources import SearchSource, SourceRegistry

_CONTROL = re.compile(r"<\|[^|<>]{0,40}\|>")


class InteractionProtocol(Protocol):
  """What `ContinuousBatcher.run_protocol` needs of a protocol (see the module docstring)."""

  pause_strings: tuple[str, ...]
  tokenizer: Tokenizer

  @property
  def reserve(self) -> int:
    """KV cache slots kept for responses: the most tokens a request's responses can add."""
    ...

  def on_stop(self, turn: list[int], *, code: int, paused: bool, calls: int,
              budget_left: int) -> tuple[Any | None, str]:
    """(payload for `respond`, or None to end the request; the stop reason when it ends).
    `turn` is the model's tokens since the last injection, `code` the row's stop code,
    `paused` whether a pause string cut it, `calls` the responses it already had, and
    `budget_left` the model tokens it may still generate."""
    ...

  def respond(self, payload: Any) -> tuple[list[int], int]:
    """(token ids to append, how many of the results were errors); runs in a worker."""
    ...


def _default_reason(code: int, paused: bool) -> str:
  return "stop_string" if paused else "stop_id" if code == STOP_ID else "length"


def _encode_untrusted(tokenizer: Tokenizer, text: str, limit: int, closing: str) -> list[int]:
  """`text` without chat control tokens, tokenised and cut to `limit` ids; a cut block keeps
  its `closing` markup whole, so the model always sees the block end."""
  ids = tokenizer.encode(_CONTROL.sub("", text))
  if len(ids) <= limit:
    return ids
  tail = tokenizer.encode(closing)
  return ids[:max(limit - len(tail), 0)] + tail


@dataclasses.dataclass(frozen=True)
class ChatToolCalls:
  """Tool calls in the chat format, answered by a Router (as `run_tool_loop`)."""

  tokenizer: Tokenizer
  router: Router
  max_calls: int = 4
  max_tool_tokens: int = 128
  pause_strings: tuple[str, ...] = ()

  def __post_init__(self) -> None:
    if self.max_calls > 0:
      check_tool_budget(self.tokenizer, self.max_tool_tokens)

  @property
  def reserve(self) -> int:
    """Cache slots for the tool turns."""
    return self.max_calls * self.max_tool_tokens

  @property
  def turn_end(self) -> int:
    """The chat format's end-of-turn id (the sampler must stop on it)."""
    return chat.end_of_turn_id(self.tokenizer)

  def on_stop(self, turn: list[int], *, code: int, paused: bool, calls: int,
              budget_left: int) -> tuple[Any | None, str]:
    """The turn's calls when it ended its turn with some and calls and tokens are left."""
    on_turn_end = code == STOP_ID and turn and turn[-1] == self.turn_end
    found = chat.parse_turn_tool_calls(self.tokenizer.decode(turn), self.tokenizer) if (
        on_turn_end) else []
    if not found:
      return None, _default_reason(code, paused)
    if calls >= self.max_calls or budget_left <= 0:
      return None, "length" if budget_left <= 0 else "stop_id"
    return found, ""

  def respond(self, payload: Any) -> tuple[list[int], int]:
    """Runs the calls -> the tool turn's ids (cut to max_tool_tokens) and the error count."""
    return tool_turn(payload, self.router, self.tokenizer, self.max_tool_tokens)


def _closed_search(tokenizer: Tokenizer, turn: list[int], tag: str, *, code: int, paused: bool,
                   calls: int, budget_left: int, max_searches: int) -> tuple[str | None, str]:
  """(the contents of the `<tag>` block a paused turn just closed, "" when it has none; or
  None with the stop reason when the row ends: not paused, out of searches or tokens)."""
  if not paused:
    return None, _default_reason(code, paused)
  if calls >= max_searches or budget_left <= 0:
    return None, "length" if budget_left <= 0 else "stop_string"
  return last_block(tokenizer.decode(turn), f"<{tag}>", f"</{tag}>") or "", ""


def last_block(text: str, open_tag: str, close_tag: str) -> str | None:
  """The contents of the last `open_tag ... close_tag` block of `text`, or None."""
  end = text.rfind(close_tag)
  if end < 0:
    return None
  start = text.rfind(open_tag, 0, end)
  return None if start < 0 else text[start + len(open_tag):end]


@dataclasses.dataclass(frozen=True)
class SearchR1:
  """Search-R1's protocol (arXiv 2503.09516): `<search>q</search>` -> `<information>` with
  the top-k passages of `source`. Tags are configurable (the Technical Features seed uses
  `context` for the information block)."""

  tokenizer: Tokenizer
  source: SearchSource
  k: int = 3
  max_searches: int = 4
  max_tokens: int = 256            # ids per information block
  passage_chars: int = 400
  search_tag: str = "search"
  information_tag: str = "information"

  @property
  def pause_strings(self) -> tuple[str, ...]:
    """The closing search tag: the row pauses as soon as it has written it."""
    return (f"</{self.search_tag}>",)

  @property
  def reserve(self) -> int:
    """Cache slots for the information blocks."""
    return self.max_searches * self.max_tokens

  def on_stop(self, turn: list[int], *, code: int, paused: bool, calls: int,
              budget_left: int) -> tuple[Any | None, str]:
    """The query of the search the turn just closed, while searches and tokens are left."""
    query, reason = _closed_search(self.tokenizer, turn, self.search_tag, code=code,
                                   paused=paused, calls=calls, budget_left=budget_left,
                                   max_searches=self.max_searches)
    return (None if query is None else query.strip()), reason

  def render(self, query: str) -> tuple[str, int]:
    """(the information block's text, 1 if the search failed or found nothing, else 0)."""
    tag = self.information_tag
    if not query:
      return f"\n\n<{tag}>Error: empty search query.</{tag}>\n\n", 1
    try:
      passages = self.source.search(query, self.k)
    except Exception as e:   # a failing backend is the model's information, not a crash
      return f"\n\n<{tag}>Error: search failed ({type(e).__name__}).</{tag}>\n\n", 1
    if not passages:
      return f"\n\n<{tag}>No results.</{tag}>\n\n", 1
    lines = [f"Doc {i} (Title: {p.title}) {' '.join(p.text.split())[:self.passage_chars]}"
             for i, p in enumerate(passages, 1)]
    return f"\n\n<{tag}>" + "\n".join(lines) + f"</{tag}>\n\n", 0

  def respond(self, payload: Any) -> tuple[list[int], int]:
    """Searches -> the information block's ids (cut to max_tokens) and 1 on an error."""
    text, errors = self.render(payload)
    return _encode_untrusted(self.tokenizer, text, self.max_tokens,
                             f"</{self.information_tag}>\n\n"), errors


@dataclasses.dataclass(frozen=True)
class RSearch:
  """R-Search query DAGs: the `<search>` block is parsed, validated and executed over
  `sources`; the `<r>` blocks (or an error block saying why the DAG is invalid) go back."""

  tokenizer: Tokenizer
  sources: SourceRegistry
  k: int = 3
  max_searches: int = 2
  max_tokens: int = 512
  caps: DAGCaps = DAGCaps()
  render_caps: RenderCaps = RenderCaps()
  pause_strings: tuple[str, ...] = ("</search>",)

  @property
  def reserve(self) -> int:
    """Cache slots for the result blocks."""
    return self.max_searches * self.max_tokens

  def on_stop(self, turn: list[int], *, code: int, paused: bool, calls: int,
              budget_left: int) -> tuple[Any | None, str]:
    """The search block the turn just closed, while searches and tokens are left."""
    block, reason = _closed_search(self.tokenizer, turn, "search", code=code, paused=paused,
                                   calls=calls, budget_left=budget_left,
                                   max_searches=self.max_searches)
    return (None if block is None else f"<search>{block}</search>"), reason

  def respond(self, payload: Any) -> tuple[list[int], int]:
    """Executes the DAG -> the `<r>` blocks' ids and 1 when the DAG was invalid."""
    text, result = search_response(payload, self.sources, k=self.k, caps=self.caps,
                                   render_caps=self.render_caps)
    errors = int(isinstance(result, DAGError))
    return _encode_untrusted(self.tokenizer, f"\n{text}\n", self.max_tokens, "</r>\n"), errors
