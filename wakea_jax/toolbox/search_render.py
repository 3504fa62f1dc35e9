"""Query DAG results as the model reads them: one `<r>...</r>` block per node, size-capped.

The format (`render`), per node in execution order:

  <r>
  B (Web, offline snapshot, not the live web): where was Jane Roe born
  [1] Jane Roe: Jane Roe was born in Lisbon ...
  </r>

The header names the node, its source as the model wrote it (with the source's note, if any)
and the query as sent, after substitution; then "[i] title: text" per passage, or the node's
error ("skipped: ..." / "search failed: ..."), or "No results.". An invalid DAG renders as one
block "Error (reason): message", so the model sees why nothing was searched.

Sizes are characters, not tokens, so that the caps do not depend on a tokenizer: every line is
cut to `passage_chars`, every block (tags included) to `node_chars`, everything (blocks joined
by newlines) to `total_chars`; a later node gets what room is left, and nothing once less than
a minimal block remains. Protocol tags inside passages are escaped (`&lt;r&gt;`), so a passage
can neither close its block early nor pass for text the model wrote.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from wakea_jax.toolbox.retrieval import snippet
from wakea_jax.toolbox.search_dag import (
  DAGCaps,
  DAGError,
  DAGResult,
  execute,
  parse_dag,
)
from wakea_jax.toolbox.search_sources import SourceRegistry

# Tags of the search protocols; escaped inside rendered results so that a passage can neither
# close the block early nor pass for something the model wrote.
_PROTOCOL_TAG = re.compile(
    r"<(/?)(r|search|answer|information|think|tool_call|tool_response)>", re.IGNORECASE)

_MIN_BLOCK = 40   # a block needs room for its tags and a few words of header


@dataclasses.dataclass(frozen=True)
class RenderCaps:
  """Character limits on rendered results: a passage line, a node's whole `<r>` block (tags
  included) and all blocks together (joined by newlines)."""

  passage_chars: int = 300
  node_chars: int = 1000
  total_chars: int = 4000

  def __post_init__(self) -> None:
    if not (self.passage_chars >= 20 and _MIN_BLOCK <= self.node_chars <= self.total_chars):
      raise ValueError(f"RenderCaps: need passage_chars >= 20 and {_MIN_BLOCK} <= node_chars "
                       f"<= total_chars; got {self}")


def _escape(text: str) -> str:
  return _PROTOCOL_TAG.sub(r"&lt;\1\2&gt;", text)


def _fit(text: str, limit: int) -> str:
  """Whitespace collapsed and at most `limit` characters (cut at a word, then " ...")."""
  text = " ".join(text.split())
  if len(text) <= limit:
    return text
  return snippet(text, limit - 4) if limit > 4 else text[:limit]


def _block(lines: Sequence[str], limit: int) -> str:
  """`<r>` + as many whole lines as fit in `limit` characters (the first line cut if it
  alone does not fit; the first line that does not fit is cut to the room left) + `</r>`."""
  room = limit - len("<r>\n\n</r>")
  kept: list[str] = []
  for line in lines:
    left = room - sum(len(x) + 1 for x in kept)
    if len(line) <= left:
      kept.append(line)
      continue
    if left >= 12:
      kept.append(_fit(line, left))
    break
  return "<r>\n" + "\n".join(kept) + "\n</r>"


def _node_lines(result: DAGResult, name: str, caps: RenderCaps) -> list[str]:
  node = result.dag.node(name)
  source = f"{node.source}, {result.notes[name]}" if result.notes.get(name) else node.source
  lines = [_fit(_escape(f"{name} ({source}): {result.queries[name]}"), caps.passage_chars)]
  if name in result.errors:
    lines.append(_fit(_escape(result.errors[name]), caps.passage_chars))
  elif not result.passages[name]:
    lines.append("No results.")
  for i, passage in enumerate(result.passages[name], 1):
    lines.append(_fit(_escape(f"[{i}] {passage.title}: {passage.text}"), caps.passage_chars))
  return lines


def render(result: DAGResult | DAGError, caps: RenderCaps = RenderCaps()) -> str:
  """The `<r>` blocks for `result` (the format and caps are in the module docstring)."""
  if isinstance(result, DAGError):
    return _block([_fit(_escape(f"Error ({result.reason}): {result.message}"),
                        caps.passage_chars)], min(caps.node_chars, caps.total_chars))
  blocks: list[str] = []
  used = 0
  for name in result.order:
    room = caps.total_chars - used - (1 if blocks else 0)
    if room < _MIN_BLOCK:
      break
    block = _block(_node_lines(result, name, caps), min(caps.node_chars, room))
    used += len(block) + (1 if blocks else 0)
    blocks.append(block)
  return "\n".join(blocks)


def search_response(text: str, sources: SourceRegistry, *, k: int = 3,
                    caps: DAGCaps = DAGCaps(), render_caps: RenderCaps = RenderCaps()
                    ) -> tuple[str, DAGResult | DAGError]:
  """What a rollout injects after the model's `<search>` block: parse, validate, execute and
  render (an invalid DAG renders as an error block, so the model sees why)."""
  dag = parse_dag(text)
  result = dag if isinstance(dag, DAGError) else execute(dag, sources, k, caps)
  return render(result, render_caps), result
