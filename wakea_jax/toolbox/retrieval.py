"""Retrieval tool: a `SearchBackend` protocol and an in-memory BM25 backend over a local corpus.

BM25 is the stand-in until the retrieval package backs this protocol with a ScaNN index; the
tool only depends on `search(query, k) -> list[Hit]`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from typing import Iterable, Protocol, Sequence

import numpy as np

from wakea_jax.toolbox.router import Tool

_TOKEN = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Hit:
  doc_id: str
  score: float
  text: str


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str
  text: str


class SearchBackend(Protocol):
  def search(self, query: str, k: int) -> list[Hit]: ...


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


class BM25:
  """Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework", eq. 3.15)
  with the non-negative idf log(1 + (N - n + 0.5) / (n + 0.5)) used by Lucene."""

  def __init__(self, documents: Sequence[Document], k1: float = 1.5, b: float = 0.75):
    if not documents:
      raise ValueError("BM25 needs at least one document")
    self.documents = list(documents)
    self.k1, self.b = k1, b
    counts = [Counter(tokenize(d.text)) for d in self.documents]
    self.vocab = {t: i for i, t in enumerate(sorted(set().union(*counts)))}
    self.doc_len = np.array([sum(c.values()) for c in counts], dtype=np.float64)
    self.avg_len = max(float(self.doc_len.mean()), 1e-9)
    # Posting lists: term id -> (doc indices, term frequencies); fine for local corpora.
    postings: dict[int, tuple[list[int], list[int]]] = {}
    for doc, c in enumerate(counts):
      for term, tf in c.items():
        docs, tfs = postings.setdefault(self.vocab[term], ([], []))
        docs.append(doc)
        tfs.append(tf)
    self.postings = {t: (np.array(d), np.array(f, dtype=np.float64))
                     for t, (d, f) in postings.items()}
    n = len(self.documents)
    self.idf = {t: math.log(1.0 + (n - len(d) + 0.5) / (len(d) + 0.5))
                for t, (d, _) in self.postings.items()}

  def scores(self, query: str) -> np.ndarray:
    scores = np.zeros(len(self.documents))
    norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / self.avg_len)
    for term in tokenize(query):
      t = self.vocab.get(term)
      if t is None:
        continue
      docs, tf = self.postings[t]
      scores[docs] += self.idf[t] * tf * (self.k1 + 1.0) / (tf + norm[docs])
    return scores

  def search(self, query: str, k: int) -> list[Hit]:
    scores = self.scores(query)
    # Stable sort on -score keeps ties in corpus order, so results are deterministic.
    order = np.argsort(-scores, kind="stable")[:k]
    return [Hit(self.documents[i].doc_id, float(scores[i]), self.documents[i].text)
            for i in order if scores[i] > 0]


def load_corpus(path: str) -> list[Document]:
  """Documents from a directory (recursively: .txt/.md are one document each, .jsonl one per
  line with a "text" and optional "id" field) or from a single such file."""
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
      with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{line_no}: invalid JSON ({e.msg})") from None
          if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{file}:{line_no}: field 'text' is missing or not a string")
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
  text = " ".join(text.split())
  if len(text) <= max_chars:
    return text
  # Cut at a word boundary; keep the last word only if the cut falls right after it.
  cut = text[:max_chars] if text[max_chars] == " " else text[:max_chars].rsplit(" ", 1)[0]
  return cut + " ..."


def format_hits(hits: list[Hit], max_chars: int = 500, label: str = "") -> str:
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
  return Tool(
      name="retrieve",
      description="Search the local document collection and return the most relevant passages.",
      parameters=SEARCH_PARAMETERS,
      run=lambda arguments: format_hits(
          backend.search(arguments["query"], _k(arguments, k)), max_chars),
  )
