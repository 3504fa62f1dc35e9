"""Retrieval tool: a `SearchBackend` protocol, backends, and the `retrieve` tool.

Backends: BM25 over a local corpus (in memory), or a saved index directory written by
`python -m wakea_jax.build_index` (dense ScaNN, BM25 over its documents, or both fused):

  make_tool(BM25(as_documents("corpus/")))
  make_tool(load_backend("index_dir/", mode="hybrid"))
  make_index_tool("index_dir/")

`Hit`, `Document` and `BM25` live in `wakea_jax.retrieval` and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol

from wakea_jax.retrieval.bm25 import BM25, tokenize
from wakea_jax.retrieval.store import Document, DocumentStore, Hit, read_jsonl_records
from wakea_jax.toolbox.router import Tool

__all__ = ["BM25", "Document", "Hit", "SearchBackend", "tokenize", "load_corpus", "as_documents",
           "load_backend", "make_tool", "make_index_tool", "format_hits", "snippet",
           "SEARCH_PARAMETERS", "BACKEND_MODES"]


class SearchBackend(Protocol):
  """What the search tools query: BM25, DenseIndex, HybridRetriever, HttpSearchBackend."""

  def search(self, query: str, k: int) -> list[Hit]:
    """Returns the best `k` hits for `query`, best first."""
    ...


def load_corpus(path: str) -> list[Document]:
  """Documents from a directory (recursively: .txt/.md are one document each, .jsonl one per
  line with a "text" and optional "id" field) or from a single such file. A saved index
  directory gives the documents of its store."""
  from wakea_jax.retrieval import index as index_lib  # scann is imported lazily there

  if os.path.isdir(path) and index_lib.is_index_dir(path):
    # A saved index: its (chunked) documents, not its internal files.
    index_lib.read_meta(path)
    return list(DocumentStore.load(os.path.join(path, index_lib.DOCUMENTS_FILE)))
  files = ([path] if os.path.isfile(path) else
           sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs))
  if not files:
    raise FileNotFoundError(f"{path}: no corpus files found")
  documents = []
  for file in files:
    rel = os.path.relpath(file, path) if os.path.isdir(path) else os.path.basename(file)
    if file.endswith((".txt", ".md")):
      with open(file, encoding="utf-8") as f:
        documents.append(Document(rel, f.read()))
    elif file.endswith(".jsonl"):
      for line_no, record in read_jsonl_records(file):
        documents.append(Document(str(record.get("id", f"{rel}:{line_no}")), record["text"]))
  if not documents:
    raise FileNotFoundError(f"{path}: no .txt, .md or .jsonl documents found")
  return documents


def as_documents(corpus: str | Iterable[str | Document]) -> list[Document]:
  """A path, or a list of strings (ids "0", "1", ...) or Documents."""
  if isinstance(corpus, (str, os.PathLike)):
    return load_corpus(os.fspath(corpus))
  return [d if isinstance(d, Document) else Document(str(i), d) for i, d in enumerate(corpus)]


def snippet(text: str, max_chars: int) -> str:
  """Collapses whitespace; text over `max_chars` is cut at a word boundary and ends in " ..."."""
  text = " ".join(text.split())
  if len(text) <= max_chars:
    return text
  # Cut at a word boundary; keep the last word only if the cut falls right after it.
  cut = text[:max_chars] if text[max_chars] == " " else text[:max_chars].rsplit(" ", 1)[0]
  return cut + " ..."


def format_hits(hits: list[Hit], max_chars: int = 500, label: str = "") -> str:
  """Numbered hits as the tool's response: `[i] doc_id (score s)` then a snippet per hit.

  Prefixed with `label` on its own line when given; "No results." when `hits` is empty.
  """
  header = f"{label}\n" if label else ""
  if not hits:
    return header + "No results."
  return header + "\n\n".join(
      f"[{i}] {hit.doc_id} (score {hit.score:.2f})\n{snippet(hit.text, max_chars)}"
      for i, hit in enumerate(hits, 1))


SEARCH_PARAMETERS = {
    "type": "object", "required": ["query"],
    "properties": {"query": {"type": "string", "description": "search terms"},
                   "k": {"type": "integer", "description": "number of results (1-10)"}},
}


def _k(arguments: dict, default: int) -> int:
  return max(1, min(int(arguments.get("k", default)), 10))


def make_tool(backend: SearchBackend, k: int = 3, max_chars: int = 500) -> Tool:
  """The `retrieve` tool over `backend`: `query` and an optional `k` (clamped to 1-10)."""
  return Tool(
      name="retrieve",
      description="Search the local document collection and return the most relevant passages.",
      parameters=SEARCH_PARAMETERS,
      run=lambda arguments: format_hits(
          backend.search(arguments["query"], _k(arguments, k)), max_chars),
  )


BACKEND_MODES = ("dense", "bm25", "hybrid")


def load_backend(directory: str, mode: str = "hybrid", *, embedder=None,
                 embedder_path: str | None = None) -> SearchBackend:
  """A backend over a saved index directory: "dense" (ScaNN / exact), "bm25" (over the
  index's documents; no embedder loaded) or "hybrid" (both, reciprocal-rank fused)."""
  from wakea_jax.retrieval import hybrid
  from wakea_jax.retrieval import index as index_lib

  if mode not in BACKEND_MODES:
    raise ValueError(f"unknown retrieval mode {mode!r}; choose one of {BACKEND_MODES}")
  if mode == "bm25":
    index_lib.read_meta(directory)
    return BM25(DocumentStore.load(os.path.join(directory, index_lib.DOCUMENTS_FILE)))
  dense = index_lib.DenseIndex.load(directory, embedder=embedder, embedder_path=embedder_path)
  return dense if mode == "dense" else hybrid.HybridRetriever(dense)


def make_index_tool(directory: str, mode: str = "hybrid", k: int = 3, max_chars: int = 500,
                    **kwargs) -> Tool:
  """The `retrieve` tool over a saved index directory (see `load_backend`)."""
  return make_tool(load_backend(directory, mode, **kwargs), k=k, max_chars=max_chars)
