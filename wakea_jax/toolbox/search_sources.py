"""Search sources for query DAGs (toolbox/search_dag.py): one interface over every retriever.

A query DAG names a source per node ("Local", "BM25", "Web", "News"); a `SourceRegistry` maps
those names, case-insensitively, to `SearchSource`s. Every source returns `Passage`s with a
title, because a child node's query is filled in from its parent's top passage's title (see
search_dag.py), so the title has to be defined the same way for every source:

  - documents of a corpus or an index directory: `metadata["title"]` when it is a non-empty
    string, else the document id (so a knowledge base whose ids are entity names needs nothing
    more);
  - the HTTP backend: the result's "title" field, else its "id"/"url".

The adapters reuse the existing retrievers rather than wrapping them anew: `BM25`, a saved
index directory through `toolbox.retrieval.load_backend` (dense ScaNN, BM25 or hybrid), and
`toolbox.web.HttpSearchBackend` for an online (or locally served) web/news search API. An
offline web or news source (BM25 over a local snapshot) says so in its `note`, which the
rendered results repeat, as the web_search tool does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from wakea_jax.retrieval.store import Document, DocumentStore
from wakea_jax.toolbox.retrieval import BM25, SearchBackend, as_documents, load_backend
from wakea_jax.toolbox.web import HttpSearchBackend

OFFLINE_NOTE = "offline snapshot, not the live web"


@dataclasses.dataclass(frozen=True)
class Passage:
  """One search result as a query DAG sees it; `source` is the name of the source that
  returned it. Scores are comparable only within one source."""

  title: str
  text: str
  score: float
  source: str


class SearchSource(Protocol):
  """What a query DAG node is sent to."""

  name: str
  note: str   # shown next to the source's results ("" for none), e.g. OFFLINE_NOTE

  def search(self, query: str, k: int) -> list[Passage]:
    """The best `k` passages for `query`, best first."""
    ...


def title_of(document: Document) -> str:
  """A document's title: metadata["title"] when a non-empty string, else its id."""
  title = document.metadata.get("title")
  return title if isinstance(title, str) and title.strip() else document.doc_id


def _titles(documents: Iterable[Document]) -> dict[str, str]:
  """doc_id -> title, only for documents whose title differs from their id (sparse)."""
  return {d.doc_id: t for d in documents if (t := title_of(d)) != d.doc_id}


@dataclasses.dataclass(frozen=True)
class BackendSource:
  """Any `SearchBackend` (BM25, DenseIndex, HybridRetriever, ...) as a `SearchSource`; the
  title of a hit is `titles[doc_id]`, else the doc id."""

  name: str
  backend: SearchBackend
  titles: Mapping[str, str] = dataclasses.field(default_factory=dict)
  note: str = ""

  def search(self, query: str, k: int) -> list[Passage]:
    """The backend's hits for `query` as passages, at most `k`."""
    return [Passage(self.titles.get(hit.doc_id, hit.doc_id), hit.text, float(hit.score),
                    self.name) for hit in self.backend.search(query, k)[:k]]


@dataclasses.dataclass(frozen=True)
class HttpSource:
  """`HttpSearchBackend` (GET {url}?q=&k=, JSON {"results": [...]}) as a `SearchSource`,
  keeping each result's "title" field, which the plain backend drops."""

  name: str
  backend: HttpSearchBackend
  note: str = ""

  def search(self, query: str, k: int) -> list[Passage]:
    """Fetches the results for `query`, at most `k` (network errors propagate; execute()
    turns them into a per-node error)."""
    request = self.backend.build_request(query, k)
    with urllib.request.urlopen(request, timeout=self.backend.timeout_s) as response:
      body = response.read()
    return self.parse(body)[:k]

  def parse(self, body: bytes) -> list[Passage]:
    """Passages from a response body (ValueError without a "results" list)."""
    hits = HttpSearchBackend.parse_response(body)
    results = json.loads(body)["results"]
    passages = []
    for hit, record in zip(hits, results):
      title = record.get("title") if isinstance(record, dict) else None
      title = title if isinstance(title, str) and title.strip() else hit.doc_id
      passages.append(Passage(title, hit.text, hit.score, self.name))
    return passages


def bm25_source(name: str, corpus: str | Iterable[str | Document], *,
                note: str = "") -> BackendSource:
  """BM25 over a corpus: a path (see toolbox.retrieval.load_corpus), strings or Documents."""
  documents = as_documents(corpus)
  return BackendSource(name, BM25(documents), _titles(documents), note)


def index_source(name: str, directory: str, mode: str = "dense", **backend_kwargs: Any
                 ) -> BackendSource:
  """A saved index directory (python -m wakea_jax.build_index) searched by `mode` ("dense",
  "bm25" or "hybrid"; see toolbox.retrieval.load_backend); titles from its document store."""
  from wakea_jax.retrieval import index as index_lib  # scann is imported lazily there

  backend = load_backend(directory, mode, **backend_kwargs)
  store = DocumentStore.load(os.path.join(directory, index_lib.DOCUMENTS_FILE))
  return BackendSource(name, backend, _titles(store))


class SourceRegistry:
  """Sources by name, looked up case-insensitively ("web" finds "Web")."""

  def __init__(self, sources: Iterable[SearchSource]) -> None:
    self._sources: dict[str, SearchSource] = {}
    for source in sources:
      key = source.name.strip().lower()
      if not key:
        raise ValueError("search source with an empty name")
      if key in self._sources:
        raise ValueError(f"two search sources named {source.name!r} (names are "
                         f"case-insensitive)")
      self._sources[key] = source

  def get(self, name: str) -> SearchSource | None:
    """The source called `name` in any case, or None."""
    return self._sources.get(name.strip().lower())

  def __contains__(self, name: object) -> bool:
    return isinstance(name, str) and name.strip().lower() in self._sources

  @property
  def names(self) -> tuple[str, ...]:
    """The sources' names as given, in registration order."""
    return tuple(s.name for s in self._sources.values())


_SOURCE_FIELDS = ("corpus", "index", "url")


def build_sources(spec: Mapping[str, Mapping[str, Any]], where: str = "sources"
                  ) -> SourceRegistry:
  """A registry from a config mapping {name: {exactly one of "corpus", "index", "url"; ...}}:

    corpus: path or documents, searched with BM25; "offline": true adds OFFLINE_NOTE
    index:  a saved index directory; "mode": "dense" (default), "bm25" or "hybrid"
    url:    an HTTP search API (HttpSearchBackend); "headers", "timeout_s"

  e.g. {"Local": {"index": D}, "BM25": {"index": D, "mode": "bm25"},
        "Web": {"corpus": W, "offline": True}, "News": {"url": "http://localhost:8080/news"}}.
  Errors name `where` and the field.
  """
  allowed = {"corpus": {"offline"}, "index": {"mode"}, "url": {"headers", "timeout_s"}}
  sources: list[SearchSource] = []
  for name, options in spec.items():
    options = dict(options or {})
    kinds = [f for f in _SOURCE_FIELDS if options.get(f) is not None]
    if len(kinds) != 1:
      raise ValueError(f"{where}.{name}: give exactly one of {', '.join(_SOURCE_FIELDS)}, got "
                       f"{kinds or 'none'}")
    kind = kinds[0]
    unknown = sorted(set(options) - {kind} - allowed[kind])
    if unknown:
      raise ValueError(f"{where}.{name}: unknown field {unknown[0]!r} for a {kind} source; "
                       f"valid: {', '.join(sorted({kind} | allowed[kind]))}")
    if kind == "corpus":
      sources.append(bm25_source(name, options["corpus"],
                                 note=OFFLINE_NOTE if options.get("offline") else ""))
    elif kind == "index":
      sources.append(index_source(name, options["index"], options.get("mode", "dense")))
    else:
      headers: Sequence[tuple[str, str]] = tuple(dict(options.get("headers") or {}).items())
      sources.append(HttpSource(name, HttpSearchBackend(
          options["url"], headers=tuple(headers),
          timeout_s=float(options.get("timeout_s", 10.0)))))
  return SourceRegistry(sources)
