"""R-Search query DAGs: a `<search>` block that plans several queries over several sources.

The model writes one block (the format of the multi-source search seed):

  <search>
  Nodes:
  A: who founded Acme Corp (Local)
  B: where was {A} born (Web)
  Edges:
  A -> B
  </search>

Grammar, line by line (blank lines and surrounding spaces ignored; nothing else is allowed):
  - "Nodes:" (any case) opens the node section; it must come first and is required.
  - A node line is `NAME: query text (Source)`: NAME is an identifier ([A-Za-z][A-Za-z0-9_]*,
    case-sensitive), the source is the text inside the LAST parentheses at the end of the line
    (so a query may itself contain parentheses), looked up case-insensitively in a
    `SourceRegistry` (search_sources.py).
  - "Edges:" (optional) opens the edge section; an edge line is `A -> B` (B runs after A);
    repeated edges count once.
  - A query may use `{A}`, where A is one of its parents (an edge A -> it): before the query
    is sent, `{A}` is replaced by A's result, defined as the title of A's top passage
    (whitespace collapsed, at most SUBSTITUTION_CHARS characters; see search_sources.py for
    how each source titles a passage). If A has no passage, the child is skipped. Only a
    brace pair around an identifier is a reference; other braces are query text.

A model writes arbitrary text, so nothing here raises on it: `parse_dag` and `validate` return
a `DAGError` whose `reason` is one of `REASONS` (the RL validity reward counts them), and
`execute` turns a failing source into a per-node error. Results go back to the model as one
`<r>...</r>` block per node (toolbox/search_render.py), capped in characters per node and in
total.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from wakea_jax.toolbox.search_sources import Passage, SourceRegistry

# reason code -> what it means: trajectory, then parse_dag, then validate reasons, in about the
# order they are checked (a DAG with several problems reports the first one found).
REASONS: dict[str, str] = {
    "no_search_block": "the text has no <search>...</search> block",
    "unclosed_search": "a <search> block is not closed by </search>",
    "missing_nodes_section": "no 'Nodes:' line",
    "unexpected_text": "a line outside the Nodes/Edges sections, or sections out of order",
    "bad_node_line": "a node line is not 'NAME: query (Source)'",
    "bad_edge_line": "an edge line is not 'A -> B'",
    "duplicate_node": "two nodes share a name",
    "empty_nodes": "the Nodes section lists no node",
    "too_many_nodes": "more nodes than caps.max_nodes",
    "too_many_edges": "more edges than caps.max_edges",
    "empty_query": "a node's query is empty",
    "query_too_long": "a node's query is longer than caps.max_query_chars",
    "unknown_source": "a node names a source that is not registered",
    "undefined_node": "an edge or a {reference} names a node that is not defined",
    "self_loop": "an edge from a node to itself",
    "reference_not_parent": "a query uses {X} but X -> node is not an edge",
    "cycle": "the edges contain a cycle",
}

SUBSTITUTION_CHARS = 100
# Longer lines are refused before any regular expression sees them (a node line's pattern is
# quadratic in runs of spaces; no real query comes near this).
MAX_LINE_CHARS = 2000
_NAME = r"[A-Za-z][A-Za-z0-9_]*"
_HEADER = re.compile(r"(nodes|edges)\s*:", re.IGNORECASE)
_NODE_LINE = re.compile(rf"({_NAME})\s*:\s*(.*?)\s*\(\s*([^()]*?)\s*\)")
_EDGE_LINE = re.compile(rf"({_NAME})\s*->\s*({_NAME})")
_REFERENCE = re.compile(rf"\{{({_NAME})\}}")
_OPEN, _CLOSE = "<search>", "</search>"
_RESULT_BLOCK = re.compile(r"<r>.*?</r>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class DAGError:
  """Why a DAG (or a trajectory's search blocks) is invalid: `reason` is a key of REASONS."""

  reason: str
  message: str

  def __post_init__(self) -> None:
    if self.reason not in REASONS:
      raise ValueError(f"DAGError: unknown reason {self.reason!r}; known: {', '.join(REASONS)}")


@dataclasses.dataclass(frozen=True)
class QueryNode:
  """One planned query: `source` as the model wrote it (matched case-insensitively)."""

  name: str
  query: str
  source: str


@dataclasses.dataclass(frozen=True)
class QueryDAG:
  """Nodes in the order written, edges (parent, child) in the order written, deduplicated."""

  nodes: tuple[QueryNode, ...]
  edges: tuple[tuple[str, str], ...] = ()

  def node(self, name: str) -> QueryNode:
    """The node called `name` (KeyError when absent)."""
    for node in self.nodes:
      if node.name == name:
        return node
    raise KeyError(name)

  def parents(self, name: str) -> tuple[str, ...]:
    """The parents of `name`, sorted."""
    return tuple(sorted({a for a, b in self.edges if b == name}))


@dataclasses.dataclass(frozen=True)
class DAGCaps:
  """Size limits on a DAG (beyond them the DAG is invalid, not truncated)."""

  max_nodes: int = 8
  max_edges: int = 16
  max_query_chars: int = 200

  def __post_init__(self) -> None:
    if min(self.max_nodes, self.max_query_chars) < 1 or self.max_edges < 0:
      raise ValueError(f"DAGCaps: need max_nodes >= 1, max_edges >= 0, max_query_chars >= 1; "
                       f"got {self}")


# ------------------------------------------------------------------------------------------
# Parsing and validation
# ------------------------------------------------------------------------------------------

def _block_body(text: str) -> str | DAGError:
  """The inside of the first <search> block, or all of `text` when it has no <search> tag."""
  start = text.find(_OPEN)
  if start < 0:
    return text
  end = text.find(_CLOSE, start + len(_OPEN))
  if end < 0:
    return DAGError("unclosed_search", "<search> is not closed by </search>")
  return text[start + len(_OPEN):end]


def parse_dag(text: str) -> QueryDAG | DAGError:
  """The DAG in `text`: the first `<search>` block in it, or, without a `<search>` tag, all of
  it. Checks syntax only; sources, references, cycles and sizes are `validate`'s."""
  body = _block_body(text)
  if isinstance(body, DAGError):
    return body
  lines = [(n, line.strip()) for n, line in enumerate(body.splitlines(), 1) if line.strip()]
  if not any((h := _HEADER.fullmatch(line)) and h.group(1).lower() == "nodes"
             for _, line in lines):
    return DAGError("missing_nodes_section", "no 'Nodes:' line")
  section: str | None = None
  nodes: dict[str, QueryNode] = {}
  edges: dict[tuple[str, str], None] = {}   # ordered set
  for n, line in lines:
    header = _HEADER.fullmatch(line)
    if header:
      name = header.group(1).lower()
      if (section, name) in ((None, "nodes"), ("nodes", "edges")):
        section = name
        continue
      return DAGError("unexpected_text", f"line {n}: {line[:80]!r} out of order (Nodes: "
                                         "first, then Edges:, each once)")
    if section is None:
      return DAGError("unexpected_text", f"line {n}: {line[:80]!r} before 'Nodes:'")
    if len(line) > MAX_LINE_CHARS:
      return DAGError("query_too_long" if section == "nodes" else "bad_edge_line",
                      f"line {n} has {len(line)} characters, at most {MAX_LINE_CHARS}")
    if section == "nodes":
      match = _NODE_LINE.fullmatch(line)
      if match is None:
        return DAGError("bad_node_line", f"line {n}: {line[:80]!r} is not 'NAME: query "
                                         "(Source)'")
      name, query, source = match.groups()
      if name in nodes:
        return DAGError("duplicate_node", f"line {n}: node {name!r} is defined twice")
      nodes[name] = QueryNode(name, query, source)
    else:
      match = _EDGE_LINE.fullmatch(line)
      if match is None:
        return DAGError("bad_edge_line", f"line {n}: {line[:80]!r} is not 'A -> B'")
      edges[(match.group(1), match.group(2))] = None
  if not nodes:
    return DAGError("empty_nodes", "the Nodes section lists no node")
  return QueryDAG(tuple(nodes.values()), tuple(edges))


def _kahn(names: Iterable[str], edges: Iterable[tuple[str, str]]) -> tuple[list[str], set[str]]:
  """(topological order with ties broken by name, the nodes left over by a cycle)."""
  names = set(names)
  children: dict[str, list[str]] = {n: [] for n in names}
  indegree = dict.fromkeys(names, 0)
  for a, b in edges:
    children[a].append(b)
    indegree[b] += 1
  ready = [n for n in names if indegree[n] == 0]
  heapq.heapify(ready)
  order = []
  while ready:
    name = heapq.heappop(ready)
    order.append(name)
    for child in children[name]:
      indegree[child] -= 1
      if indegree[child] == 0:
        heapq.heappush(ready, child)
  return order, names - set(order)


def validate(dag: QueryDAG, sources: SourceRegistry | Iterable[str],
             caps: DAGCaps = DAGCaps()) -> DAGError | None:
  """None when `dag` can be executed over `sources` (a registry, or source names, either
  matched case-insensitively); else the first problem, checked in the order of REASONS."""
  if isinstance(sources, SourceRegistry):
    sources = sources.names
  elif isinstance(sources, str):
    sources = [sources]
  known = {s.strip().lower() for s in sources}
  if len(dag.nodes) > caps.max_nodes:
    return DAGError("too_many_nodes", f"{len(dag.nodes)} nodes, at most {caps.max_nodes}")
  if len(dag.edges) > caps.max_edges:
    return DAGError("too_many_edges", f"{len(dag.edges)} edges, at most {caps.max_edges}")
  for node in dag.nodes:
    if not node.query.strip():
      return DAGError("empty_query", f"node {node.name}: the query is empty")
    if len(node.query) > caps.max_query_chars:
      return DAGError("query_too_long", f"node {node.name}: the query has {len(node.query)} "
                                        f"characters, at most {caps.max_query_chars}")
    if node.source.strip().lower() not in known:
      return DAGError("unknown_source", f"node {node.name}: unknown source {node.source!r}; "
                                        f"known: {', '.join(sorted(known))}")
  names = {node.name for node in dag.nodes}
  for a, b in dag.edges:
    for end in (a, b):
      if end not in names:
        return DAGError("undefined_node", f"edge {a} -> {b}: node {end} is not defined")
    if a == b:
      return DAGError("self_loop", f"edge {a} -> {b} is a self-loop")
  for node in dag.nodes:
    parents = set(dag.parents(node.name))
    for ref in _REFERENCE.findall(node.query):
      if ref not in names:
        return DAGError("undefined_node", f"node {node.name}: {{{ref}}} is not a defined node")
      if ref not in parents:
        return DAGError("reference_not_parent", f"node {node.name}: uses {{{ref}}} without "
                                                f"the edge {ref} -> {node.name}")
  _, left = _kahn(names, dag.edges)
  if left:
    return DAGError("cycle", f"the edges among {', '.join(sorted(left))} contain a cycle")
  return None


def topological_order(dag: QueryDAG) -> tuple[str, ...]:
  """Node names, parents before children, ties broken by name (so "B" before "C" whenever
  both are ready). For a validated DAG; ValueError on a cycle."""
  order, left = _kahn((n.name for n in dag.nodes), dag.edges)
  if left:
    raise ValueError(f"query DAG has a cycle among {', '.join(sorted(left))}")
  return tuple(order)


def search_blocks(text: str) -> list[str] | DAGError:
  """Every `<search>...</search>` block of `text` (tags included), in order; an error when
  there is none or one is not closed. `text` should be the model's own text
  (`strip_results`)."""
  blocks, pos = [], 0
  while (start := text.find(_OPEN, pos)) >= 0:
    end = text.find(_CLOSE, start + len(_OPEN))
    if end < 0:
      return DAGError("unclosed_search", f"<search> at character {start} is not closed")
    blocks.append(text[start:end + len(_CLOSE)])
    pos = end + len(_CLOSE)
  return blocks or DAGError("no_search_block", "no <search>...</search> block")


def strip_results(text: str) -> str:
  """`text` without the `<r>...</r>` blocks that execution injected (the model's own text)."""
  return _RESULT_BLOCK.sub("", text)


def trajectory_error(text: str, sources: SourceRegistry | Iterable[str],
                     caps: DAGCaps = DAGCaps()) -> DAGError | None:
  """None when the model's text has at least one search block and every block parses and
  validates; else the first block's problem. `<r>` blocks are removed first."""
  blocks = search_blocks(strip_results(text))
  if isinstance(blocks, DAGError):
    return blocks
  for block in blocks:
    dag = parse_dag(block)
    error = dag if isinstance(dag, DAGError) else validate(dag, sources, caps)
    if error is not None:
      return error
  return None


# ------------------------------------------------------------------------------------------
# Execution and rendering
# ------------------------------------------------------------------------------------------

Substitution = Callable[[Sequence[Passage]], str | None]


def top_title(passages: Sequence[Passage]) -> str | None:
  """A parent's result for `{A}`: its top passage's title, whitespace collapsed and cut to
  SUBSTITUTION_CHARS; None without passages."""
  if not passages:
    return None
  return " ".join(passages[0].title.split())[:SUBSTITUTION_CHARS].strip() or None


@dataclasses.dataclass(frozen=True)
class DAGResult:
  """What `execute` did, per node: the query sent (after substitution), the passages, the
  source's note, and an error ("skipped: ..." or "search failed: ...") where it failed."""

  dag: QueryDAG
  order: tuple[str, ...]
  queries: Mapping[str, str]
  passages: Mapping[str, tuple[Passage, ...]]
  notes: Mapping[str, str]
  errors: Mapping[str, str]

  @property
  def num_searches(self) -> int:
    """Queries actually sent to a source (skipped nodes are not)."""
    return sum(not self.errors.get(name, "").startswith("skipped") for name in self.order)


def execute(dag: QueryDAG, sources: SourceRegistry, k: int = 3, caps: DAGCaps = DAGCaps(),
            substitute: Substitution = top_title) -> DAGResult | DAGError:
  """Validates `dag`, then runs its queries in `topological_order`, each child's `{A}`
  replaced by `substitute(A's passages)`; a source that raises gives that node an error and
  no passages (and its referencing children are skipped), never an exception."""
  if k < 1:
    raise ValueError(f"execute: k must be >= 1, got {k}")
  error = validate(dag, sources, caps)
  if error is not None:
    return error
  order = topological_order(dag)
  queries: dict[str, str] = {}
  passages: dict[str, tuple[Passage, ...]] = {}
  notes: dict[str, str] = {}
  errors: dict[str, str] = {}
  for name in order:
    node = dag.node(name)
    source = sources.get(node.source)
    assert source is not None  # validated
    notes[name] = source.note
    values = {ref: substitute(passages[ref]) for ref in _REFERENCE.findall(node.query)}
    missing = sorted(ref for ref, value in values.items() if value is None)
    queries[name] = _REFERENCE.sub(lambda m, v=values: v.get(m.group(1)) or m.group(0),
                                   node.query)
    passages[name] = ()
    if missing:
      errors[name] = f"skipped: {{{missing[0]}}} has no result"
      continue
    try:
      passages[name] = tuple(source.search(queries[name], k))[:k]
    except Exception as e:  # noqa: BLE001  (a failing source costs this node, not the run)
      errors[name] = f"search failed: {type(e).__name__}: {str(e)[:120]}"
  return DAGResult(dag, order, queries, passages, notes, errors)
