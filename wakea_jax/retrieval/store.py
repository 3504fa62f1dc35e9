"""The document store every retriever shares: documents with string ids, in insertion order.

On disk it is one JSONL file, a line `{"id": ..., "text": ..., "metadata": {...}}` per
document; row `i` of the file is row `i` of the dense index and of BM25, so a search returns
rows and the store turns them into `Hit`s. Integrity (truncation, corruption) is checked by the
index directory's checksums (see index.py), not here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from wakea_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result: the document's id and text with its score (higher is better).

  Scores are only comparable within one retriever (cosine, BM25, fused or reranker scores).
  """

  doc_id: str
  score: float
  text: str


@dataclasses.dataclass(frozen=True)
class Document:
  """A retrievable text and its id (unique within a store); `metadata` is never compared."""

  doc_id: str
  text: str
  # Where the text came from (source file, chunk kind, qualified name, offsets); never
  # compared, so two documents with the same id and text are equal.
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False,
                                                  repr=False)


class DuplicateIdError(ValueError):
  """Two documents share an id (the message names the id and where it came from)."""


class EmptyCorpusError(ValueError):
  """There are no documents to index."""


def read_jsonl_records(file: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, record) for each non-blank line of a JSONL file whose records carry a
  string "text"; raises ValueError naming the file and line otherwise."""
  for line_no, record in sources.jsonl_lines(file):
    if isinstance(record, Exception):
      raise record
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{file}:{line_no}: field 'text' is missing or not a string")
    yield line_no, record


class DocumentStore:
  """Documents by row, with an id -> row map; ids are unique strings."""

  def __init__(self, documents: Iterable[Document] = ()):
    self._documents: list[Document] = []
    self._rows: dict[str, int] = {}
    self.extend(documents)

  def extend(self, documents: Iterable[Document]) -> range:
    """Appends documents (all or none: a duplicate id leaves the store unchanged); returns
    their rows."""
    documents = list(documents)
    seen: dict[str, int] = {}
    for i, doc in enumerate(documents):
      if not isinstance(doc, Document):
        raise TypeError(f"document {i}: expected a Document, got {type(doc).__name__}")
      if not isinstance(doc.doc_id, str) or not doc.doc_id:
        raise ValueError(f"document {i}: id must be a non-empty string, got {doc.doc_id!r}")
      if doc.doc_id in self._rows:
        raise DuplicateIdError(f"duplicate document id {doc.doc_id!r}: already in the store "
                               f"(row {self._rows[doc.doc_id]})")
      if doc.doc_id in seen:
        first = seen[doc.doc_id]
        raise DuplicateIdError(f"duplicate document id {doc.doc_id!r}: documents {first} "
                               f"and {i} of this batch{_source_note(documents, first, i)}")
      seen[doc.doc_id] = i
    start = len(self._documents)
    for doc in documents:
      self._rows[doc.doc_id] = len(self._documents)
      self._documents.append(doc)
    return range(start, len(self._documents))

  def __len__(self) -> int:
    return len(self._documents)

  def __getitem__(self, row: int) -> Document:
    return self._documents[row]

  def __iter__(self) -> Iterator[Document]:
    return iter(self._documents)

  def __contains__(self, doc_id: object) -> bool:
    return doc_id in self._rows

  def row(self, doc_id: str) -> int:
    """The row of `doc_id` (KeyError when absent)."""
    return self._rows[doc_id]

  def get(self, doc_id: str) -> Document:
    """The document with id `doc_id` (KeyError when absent)."""
    return self._documents[self._rows[doc_id]]

  @property
  def texts(self) -> list[str]:
    """Every document's text, in row order."""
    return [d.text for d in self._documents]

  def hits(self, rows: Sequence[int], scores: Sequence[float]) -> list[Hit]:
    """`Hit`s for the documents at `rows` with the matching `scores`, in the given order."""
    return [Hit(self._documents[r].doc_id, float(s), self._documents[r].text)
            for r, s in zip(rows, scores)]

  def save(self, path: str) -> None:
    """Writes the store as JSONL, one `{"id", "text"[, "metadata"]}` line per row."""
    with open(path, "w", encoding="utf-8") as f:
      for doc in self._documents:
        record: dict[str, Any] = {"id": doc.doc_id, "text": doc.text}
        if doc.metadata:
          record["metadata"] = dict(doc.metadata)
        f.write(json.dumps(record, ensure_ascii=False) + "\n")

  @classmethod
  def load(cls, path: str) -> DocumentStore:
    """Reads a store written by `save`; raises naming the file (and line) if it is invalid."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: document store is missing")
    docs = []
    for line_no, record in read_jsonl_records(path):
      if not isinstance(record.get("id"), str):
        raise ValueError(f"{path}:{line_no}: field 'id' is missing or not a string")
      docs.append(Document(record["id"], record["text"], record.get("metadata") or {}))
    try:
      return cls(docs)
    except DuplicateIdError as e:
      raise DuplicateIdError(f"{path}: {e}") from None


def _source_note(documents: Sequence[Document], a: int, b: int) -> str:
  sources = [documents[i].metadata.get("source") for i in (a, b)]
  return f" (from {sources[0]} and {sources[1]})" if all(sources) else ""
