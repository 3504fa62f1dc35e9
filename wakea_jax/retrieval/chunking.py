"""Splitting sources into retrievable chunks.

  chunk_text(text)            sentence-respecting windows of <= max_tokens tokens, with overlap
  chunk_python(source)        one chunk per function / class / method (qualified names, via ast),
                              docstrings kept; module-level code goes in a "<module>" chunk
  chunk_file(path, text)      .py -> chunk_python (text chunking if it does not parse), else text
  load_documents(paths)       .txt/.md/.py files (or directories of them) and .jsonl records ->
                              chunked `Document`s with ids "file#i", "file::Qual.name", "id#i"

Tokens are counted by `count_tokens` (default: words and punctuation, a proxy for wordpieces;
pass the embedder's tokenizer for exact budgets).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Callable, Sequence

from wakea_jax.retrieval.store import Document, EmptyCorpusError, read_jsonl_records

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# A sentence ends at . ! ? (and closing quotes/brackets) before whitespace, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (".txt", ".md", ".py", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A piece of a source: its text, character span `[start, end)` and, for code, its name."""

  text: str
  start: int           # character offsets into the source
  end: int
  name: str = ""       # qualified name for code chunks ("Class.method"), else ""
  kind: str = "text"   # "text", "function", "class", "method", "module"


def count_words(text: str) -> int:
  """The default token count: runs of word characters plus single punctuation marks."""
  return len(_TOKEN.findall(text))


def _sentences(text: str) -> list[tuple[int, int]]:
  spans, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    if text[start:m.start()].strip():
      spans.append((start, m.start()))
    start = m.end()
  if text[start:].strip():
    spans.append((start, len(text)))
  return spans


def _split_long(text: str, start: int, end: int, max_tokens: int, overlap: int
                ) -> list[tuple[int, int]]:
  """Token windows over one sentence longer than max_tokens."""
  tokens = [m.span() for m in _TOKEN.finditer(text, start, end)]
  step = max(1, max_tokens - overlap)
  spans = []
  for i in range(0, len(tokens), step):
    window = tokens[i:i + max_tokens]
    spans.append((window[0][0], window[-1][1]))
    if i + max_tokens >= len(tokens):
      break
  return spans


def chunk_text(text: str, *, max_tokens: int = 256, overlap: int = 32,
               count_tokens: Callable[[str], int] = count_words) -> list[Chunk]:
  """Packs whole sentences into chunks of <= max_tokens; each chunk after the first starts
  with the previous chunk's last sentences worth <= overlap tokens. A sentence longer than
  max_tokens is cut into token windows overlapping by `overlap`."""
  if max_tokens < 1 or not 0 <= overlap < max_tokens:
    raise ValueError(f"need max_tokens >= 1 and 0 <= overlap < max_tokens, got "
                     f"max_tokens={max_tokens}, overlap={overlap}")
  units: list[tuple[int, int, int]] = []  # (start, end, tokens)
  for start, end in _sentences(text):
    n = count_tokens(text[start:end])
    if n > max_tokens:
      units += [(s, e, count_tokens(text[s:e]))
                for s, e in _split_long(text, start, end, max_tokens, overlap)]
    else:
      units.append((start, end, n))
  chunks: list[Chunk] = []
  current: list[tuple[int, int, int]] = []
  for unit in units:
    if current and sum(u[2] for u in current) + unit[2] > max_tokens:
      chunks.append(Chunk(text[current[0][0]:current[-1][1]].strip(), current[0][0],
                          current[-1][1]))
      carried: list[tuple[int, int, int]] = []
      for u in reversed(current):
        if sum(c[2] for c in carried) + u[2] > overlap or u[1] > unit[0]:
          break
        carried.insert(0, u)
      # Keep the overlap only where it still leaves room for the new sentence.
      while carried and sum(c[2] for c in carried) + unit[2] > max_tokens:
        carried.pop(0)
      current = carried
    current.append(unit)
  if current:
    chunks.append(Chunk(text[current[0][0]:current[-1][1]].strip(), current[0][0],
                        current[-1][1]))
  return chunks


def _line_offsets(source: str) -> list[int]:
  offsets = [0]
  for line in source.splitlines(keepends=True):
    offsets.append(offsets[-1] + len(line))
  return offsets


def chunk_python(source: str, *, max_tokens: int = 512, overlap: int = 32,
                 count_tokens: Callable[[str], int] = count_words) -> list[Chunk]:
  """One chunk per top-level function and class, with decorators and docstrings. A class too
  long for max_tokens becomes a "class" chunk (its source up to the first method) plus one
  chunk per method named "Class.method"; a function still too long is text-chunked into
  parts named "name#2", ... Raises SyntaxError if the source does not parse."""
  tree = ast.parse(source)
  offsets = _line_offsets(source)

  def span(node: ast.AST) -> tuple[int, int]:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return offsets[first - 1], offsets[node.end_lineno]

  chunks: list[Chunk] = []

  def emit(start: int, end: int, name: str, kind: str, prefix: str = "") -> None:
    text = source[start:end].rstrip()
    if count_tokens(prefix + text) <= max_tokens:
      chunks.append(Chunk(prefix + text, start, end, name, kind))
      return
    for i, part in enumerate(chunk_text(text, max_tokens=max_tokens, overlap=overlap,
                                        count_tokens=count_tokens)):
      chunks.append(Chunk(prefix + part.text, start + part.start, start + part.end,
                          name if i == 0 else f"{name}#{i + 1}", kind))

  module_parts: list[tuple[int, int]] = []
  defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
  for node in tree.body:
    if not isinstance(node, defs):
      module_parts.append((offsets[node.lineno - 1], offsets[node.end_lineno]))
      continue
    start, end = span(node)
    if isinstance(node, ast.ClassDef):
      methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
      if methods and count_tokens(source[start:end]) > max_tokens:
        emit(start, span(methods[0])[0], node.name, "class")
        header = f"class {node.name}:  # method of {node.name}\n"
        for method in methods:
          m_start, m_end = span(method)
          emit(m_start, m_end, f"{node.name}.{method.name}", "method", header)
        continue
      emit(start, end, node.name, "class")
    else:
      emit(start, end, node.name, "function")
  if module_parts:
    text = "\n".join(source[s:e].rstrip() for s, e in module_parts)
    for i, part in enumerate(chunk_text(text, max_tokens=max_tokens, overlap=overlap,
                                        count_tokens=count_tokens)):
      chunks.insert(i, Chunk(part.text, module_parts[0][0], module_parts[-1][1],
                             "<module>" if i == 0 else f"<module>#{i + 1}", "module"))
  return chunks


def chunk_file(path: str, text: str, *, max_tokens: int = 256, overlap: int = 32,
               count_tokens: Callable[[str], int] = count_words) -> list[Chunk]:
  """Chunks by file type: Python by definitions (text if it does not parse), else text."""
  if path.endswith(".py"):
    try:
      return chunk_python(text, max_tokens=max_tokens, overlap=overlap,
                          count_tokens=count_tokens)
    except SyntaxError:
      pass
  return chunk_text(text, max_tokens=max_tokens, overlap=overlap, count_tokens=count_tokens)


def _files(path: str) -> list[tuple[str, str]]:
  """(file, id prefix) for a file, or for the files with a known suffix under a directory."""
  if os.path.isfile(path):
    return [(path, os.path.basename(path))]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  files = sorted(os.path.join(root, f) for root, dirs, fs in os.walk(path)
                 for f in fs if f.endswith(SUFFIXES))
  return [(f, os.path.relpath(f, path).replace(os.sep, "/")) for f in files]


def load_documents(paths: Sequence[str], *, max_tokens: int = 256, overlap: int = 32,
                   count_tokens: Callable[[str], int] = count_words) -> list[Document]:
  """Chunked documents from files and directories (see the module docstring for ids)."""
  documents: list[Document] = []
  for path in paths:
    files = _files(path)
    if os.path.isdir(path) and not files:
      raise EmptyCorpusError(f"{path}: no {', '.join(SUFFIXES)} files found")
    for file, prefix in files:
      if file.endswith(".jsonl"):
        for line_no, record in read_jsonl_records(file):
          base = str(record.get("id", f"{prefix}:{line_no}"))
          chunks = chunk_text(record["text"], max_tokens=max_tokens, overlap=overlap,
                              count_tokens=count_tokens)
          for i, chunk in enumerate(chunks):
            documents.append(Document(base if len(chunks) == 1 else f"{base}#{i}", chunk.text,
                                      {"source": f"{file}:{line_no}", "kind": "text",
                                       "start": chunk.start, "end": chunk.end}))
        continue
      if not file.endswith(SUFFIXES):
        raise ValueError(f"{file}: unsupported file type; expected one of {SUFFIXES}")
      with open(file, encoding="utf-8") as f:
        text = f.read()
      for i, chunk in enumerate(chunk_file(file, text, max_tokens=max_tokens, overlap=overlap,
                                           count_tokens=count_tokens)):
        doc_id = f"{prefix}::{chunk.name}" if chunk.name else f"{prefix}#{i}"
        documents.append(Document(doc_id, chunk.text,
                                  {"source": file, "kind": chunk.kind, "name": chunk.name,
                                   "start": chunk.start, "end": chunk.end}))
  return documents
