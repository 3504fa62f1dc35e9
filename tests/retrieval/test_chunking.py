import pytest

from wakea_jax.retrieval.chunking import (
  chunk_file,
  chunk_python,
  chunk_text,
  count_words,
  load_documents,
)
from wakea_jax.retrieval.store import EmptyCorpusError

TEXT = " ".join(f"Sentence number {i} is here." for i in range(20))

CODE = '''"""Module doc."""
import os

X = 1


def top(a):
  """Adds one."""
  return a + 1


class Big:
  """A big class."""

  def first(self):
    """First method."""
    return [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]

  @staticmethod
  def second():
    return "two words here and more words to make it long enough for a split"
'''


def test_chunk_text_respects_sentences_and_overlap():
  chunks = chunk_text(TEXT, max_tokens=20, overlap=6)
  assert len(chunks) > 3
  for c in chunks:
    assert count_words(c.text) <= 20
    assert c.text.startswith("Sentence") and c.text.endswith(".")
  # Each chunk after the first starts with the previous chunk's last sentence.
  assert chunks[1].text.startswith(chunks[0].text.split(". ")[-1].rstrip("."))
  assert TEXT[chunks[0].start:chunks[0].end].strip() == chunks[0].text
  long = chunk_text("word " * 50, max_tokens=20, overlap=5)
  assert [count_words(c.text) for c in long] == [20, 20, 20]
  with pytest.raises(ValueError, match="overlap"):
    chunk_text(TEXT, max_tokens=10, overlap=10)


def test_chunk_python_by_definitions():
  small = chunk_python(CODE, max_tokens=500)
  assert [(c.name, c.kind) for c in small] == [("<module>", "module"), ("top", "function"),
                                              ("Big", "class")]
  assert '"""Adds one."""' in small[1].text
  split = chunk_python(CODE, max_tokens=40)
  names = [c.name for c in split]
  assert names[:4] == ["<module>", "top", "Big", "Big.first"] and "Big.second" in names
  method = split[names.index("Big.second")]
  assert method.text.startswith("class Big:") and "@staticmethod" in method.text
  assert '"""A big class."""' in split[2].text
  assert chunk_file("broken.py", "def (:\n  pass. Still text.")[0].kind == "text"


def test_load_documents(tmp_path):
  (tmp_path / "a.md").write_text(TEXT)
  (tmp_path / "m.py").write_text(CODE)
  (tmp_path / "r.jsonl").write_text('{"id": "r1", "text": "short"}\n')
  (tmp_path / "skip.bin").write_bytes(b"\0")
  docs = load_documents([str(tmp_path)], max_tokens=30, overlap=5)
  ids = [d.doc_id for d in docs]
  assert "a.md#0" in ids and "m.py::top" in ids and "m.py::Big" in ids and "r1" in ids
  assert docs[ids.index("m.py::top")].metadata["kind"] == "function"
  (tmp_path / "empty").mkdir()
  with pytest.raises(EmptyCorpusError, match="no .txt"):
    load_documents([str(tmp_path / "empty")])
  with pytest.raises(FileNotFoundError):
    load_documents([str(tmp_path / "nope")])
