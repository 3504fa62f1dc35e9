"""Okapi BM25 over a document store: the lexical half of hybrid retrieval.

This is the one BM25 in the codebase; `wakea_jax.toolbox.retrieval.BM25` re-exports it. Posting
lists are numpy arrays, fine for local corpora (a query costs the length of its terms' posting
lists). It indexes whatever sequence of `Document`s it is given, usually the `DocumentStore`
of a dense index, so row `i` here is row `i` there.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from wakea_jax.retrieval.store import Document, Hit

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
  """Lowercased runs of word characters in `text`: the terms BM25 indexes and queries with."""
  return _TOKEN.findall(text.lower())


class BM25:
  """Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework", eq. 3.15)
  with the non-negative idf log(1 + (N - n + 0.5) / (n + 0.5)) used by Lucene."""

  def __init__(self, documents: Sequence[Document], k1: float = 1.5, b: float = 0.75):
    if not documents:
      raise ValueError("BM25 needs at least one document")
    self.k1, self.b = k1, b
    self.documents: list[Document] = []
    self._counts: list[Counter[str]] = []
    self.add(documents)

  def add(self, documents: Iterable[Document]) -> None:
    """Appends documents and recomputes the statistics (idf and average length change with
    every document, so there is nothing cheaper to do exactly)."""
    documents = list(documents)
    self.documents += documents
    self._counts += [Counter(tokenize(d.text)) for d in documents]
    self._finalize()

  def _finalize(self) -> None:
    counts = self._counts
    self.vocab = {t: i for i, t in enumerate(sorted(set().union(*counts)))}
    self.doc_len = np.array([sum(c.values()) for c in counts], dtype=np.float64)
    self.avg_len = max(float(self.doc_len.mean()), 1e-9)
    # Posting lists: term id -> (doc indices, term frequencies).
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
    self._norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / self.avg_len)

  def scores(self, query: str) -> np.ndarray:
    """float64 [num_documents] BM25 scores of every document for `query`."""
    scores = np.zeros(len(self.documents))
    for term in tokenize(query):
      t = self.vocab.get(term)
      if t is None:
        continue
      docs, tf = self.postings[t]
      scores[docs] += self.idf[t] * tf * (self.k1 + 1.0) / (tf + self._norm[docs])
    return scores

  def search_rows(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [<=k] int64, scores [<=k]) of the best documents with a positive score."""
    scores = self.scores(query)
    # Stable sort on -score keeps ties in corpus order, so results are deterministic.
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[scores[order] > 0]
    return order, scores[order]

  def search(self, query: str, k: int) -> list[Hit]:
    """The best `k` documents with a positive score for `query`, best first."""
    rows, scores = self.search_rows(query, k)
    return [Hit(self.documents[i].doc_id, float(s), self.documents[i].text)
            for i, s in zip(rows, scores)]
