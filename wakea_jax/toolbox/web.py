"""Web search tool. There is no network here, so the default backend is an OFFLINE local corpus
behind the same `SearchBackend` interface, and both its description and its results say so;
`HttpSearchBackend` is the pluggable online backend (a JSON search API at a given URL).
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
import urllib.request
from typing import Any

from wakea_jax.toolbox.retrieval import SEARCH_PARAMETERS, Hit, SearchBackend, _k, format_hits
from wakea_jax.toolbox.router import Tool

OFFLINE_LABEL = "[offline web search: results come from a local snapshot, not the live web]"


@dataclasses.dataclass(frozen=True)
class HttpSearchBackend:
  """Queries `GET {url}?q=...&k=...`, expecting JSON `{"results": [{"id"|"url", "score",
  "text"|"snippet"}, ...]}` (a thin adapter in front of any real search API)."""

  url: str
  headers: tuple[tuple[str, str], ...] = ()
  timeout_s: float = 10.0

  def build_request(self, query: str, k: int) -> urllib.request.Request:
    """The GET request for `query` and `k`, appending to any query string already in `url`."""
    params = urllib.parse.urlencode({"q": query, "k": k})
    separator = "&" if urllib.parse.urlsplit(self.url).query else "?"
    return urllib.request.Request(f"{self.url}{separator}{params}", headers=dict(self.headers),
                                  method="GET")

  @staticmethod
  def parse_response(body: bytes) -> list[Hit]:
    """Hits from a JSON response body, in its order; ValueError without a "results" list."""
    payload: Any = json.loads(body)
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
      raise ValueError("search response has no 'results' list")
    return [Hit(str(r.get("id") or r.get("url", i)), float(r.get("score", 0.0)),
                str(r.get("text") or r.get("snippet", ""))) for i, r in enumerate(results)]

  def search(self, query: str, k: int) -> list[Hit]:
    """Fetches and parses the results for `query`, at most `k` (network errors propagate)."""
    with urllib.request.urlopen(self.build_request(query, k), timeout=self.timeout_s) as response:
      return self.parse_response(response.read())[:k]


def make_tool(backend: SearchBackend, offline: bool, k: int = 3, max_chars: int = 500) -> Tool:
  """`offline` must be True for a local-corpus backend: it labels description and results."""
  description = "Search the web and return the top results with snippets."
  label = ""
  if offline:
    description = ("OFFLINE web search: searches a local snapshot of documents, not the live "
                   "web; results may be stale or missing.")
    label = OFFLINE_LABEL
  return Tool(
      name="web_search", description=description, parameters=SEARCH_PARAMETERS,
      run=lambda arguments: format_hits(
          backend.search(arguments["query"], _k(arguments, k)), max_chars, label),
  )
