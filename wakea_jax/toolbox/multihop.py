"""The multi-hop task's corpus, its cached search index, and teacher trajectories that search
it for real (issue 15, item 4; the KB and questions are data/tasks/multihop_kb.py).

  index = build_index()                       # MiniLM + ScaNN, cached by content hash
  stats = write_teacher_sft("sft.jsonl", 2000, seed=0, protocol="rsearch", index=index.index)
  rag = rag_prompts(128, seed=7, index=index.index, split=1, hop=2)   # the RAG baseline

Why here and not in data/tasks: searching needs retrieval/ and executing a query DAG needs
toolbox/search_dag.py, both above data/ in the layer order, so the data-layer task can only
offer the gold-document teacher (`task:multihop`); this module runs the same teacher
(data/tasks/multihop.py: queries, thoughts, dialogue layout) against the real index.

The index directory is a plain `retrieval.index` directory (ScaNN over MiniLM vectors by
default; BM25 and hybrid search read its document store), so every consumer opens it the usual
way: `load_backend(dir, mode)`, `search_sources.index_source`, `build_index --load`, a config's
index field. Each document's title (`metadata["title"]`, an entity name) is what R-Search's
`{A}` substitution reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from absl import logging

from wakea_jax.data import sources as data_sources
from wakea_jax.data.tasks import multihop as task
from wakea_jax.data.tasks import multihop_kb as kb_lib
from wakea_jax.data.tasks.multihop_kb import KBConfig, Question
from wakea_jax.retrieval import index as index_lib
from wakea_jax.retrieval.store import Document, DocumentStore
from wakea_jax.toolbox import search_render
from wakea_jax.toolbox.retrieval import load_backend
from wakea_jax.toolbox.search_dag import DAGError
from wakea_jax.toolbox.search_sources import BackendSource, Passage, SourceRegistry

# ScaNN even for a few hundred documents (the default IndexConfig searches corpora under
# 10,000 exactly): the task exists to exercise the ScaNN index the search stack serves. Half
# of 16 partitions are scored per query: with the default ~5% of ~sqrt(n) (8 of 47 for the
# 2,256 documents of a 600-person KB) 8% of the teacher's searches missed the gold document
# at k=2 (exact search: 0.4%); with 8 of 16, 0.4% (toolbox/multihop.py teacher stats).
SCANN_CONFIG = index_lib.IndexConfig(brute_force_below=0, num_leaves=16, leaves_to_search=8)
DEFAULT_CACHE = os.path.join("~", ".cache", "wakea_jax", "multihop")
CORPUS_FILE = "corpus.jsonl"
INDEX_DIR = "index"


@dataclasses.dataclass(frozen=True)
class MultihopIndex:
  """Where a built task index lives: `root/corpus.jsonl` and the index directory
  `root/index`; `built_s` is the build time in seconds (0.0 when the cache was reused)."""

  root: str
  corpus: str
  index: str
  key: str
  built_s: float = 0.0


def documents(config: KBConfig = KBConfig()) -> list[Document]:
  """The KB's documents as retrieval Documents, the entity-name title in `metadata`."""
  return [Document(d.id, d.text, {"title": d.title})
          for d in kb_lib.documents(kb_lib.build(config))]


def corpus_lines(config: KBConfig = KBConfig()) -> list[str]:
  """The corpus as JSONL lines `{"id", "title", "text"}`."""
  return [json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False)
          for d in kb_lib.documents(kb_lib.build(config))]


def content_key(config: KBConfig = KBConfig(), embedder: str = "all-MiniLM-L6-v2",
                index_config: index_lib.IndexConfig = SCANN_CONFIG) -> str:
  """sha256 of everything the index depends on: the corpus, the embedder name, the index
  parameters and the index format version (so a format change rebuilds)."""
  digest = hashlib.sha256()
  for part in (*corpus_lines(config), embedder,
               json.dumps(dataclasses.asdict(index_config), sort_keys=True),
               f"{index_lib.FORMAT}/{index_lib.VERSION}"):
    digest.update(part.encode("utf-8") + b"\n")
  return digest.hexdigest()


def build_index(cache_dir: str | os.PathLike[str] | None = None, *,
                config: KBConfig = KBConfig(), embedder: str = "all-MiniLM-L6-v2",
                index_config: index_lib.IndexConfig = SCANN_CONFIG) -> MultihopIndex:
  """The corpus and index of the KB `config` under `cache_dir/multihop-<key[:16]>`, built
  unless a valid one is there (`key` = `content_key`). `embedder` is a name for
  `retrieval.embed.load_embedder` ("hash-64" needs no weights)."""
  from wakea_jax.retrieval.embed import load_embedder

  key = content_key(config, embedder, index_config)
  root = os.path.join(os.path.expanduser(os.fspath(cache_dir or DEFAULT_CACHE)),
                      f"multihop-{key[:16]}")
  corpus, directory = os.path.join(root, CORPUS_FILE), os.path.join(root, INDEX_DIR)
  if os.path.isfile(corpus) and index_lib.is_index_dir(directory):
    try:
      index_lib.read_meta(directory)   # checksums: a truncated cache is rebuilt, not trusted
      return MultihopIndex(root, corpus, directory, key)
    except (index_lib.IndexFormatError, ValueError, OSError) as err:
      logging.warning("%s: cached multihop index is invalid (%s); rebuilding", directory, err)
  start = time.perf_counter()
  os.makedirs(root, exist_ok=True)
  index_lib.DenseIndex.build(documents(config), load_embedder(embedder),
                             index_config).save(directory)
  tmp = corpus + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(corpus_lines(config)) + "\n")
  os.replace(tmp, corpus)   # written last: its presence marks a complete cache entry
  built = time.perf_counter() - start
  logging.info("multihop index: %d documents -> %s in %.1fs", len(kb_lib.documents(
      kb_lib.build(config))), directory, built)
  return MultihopIndex(root, corpus, directory, key, built)


def searcher(index: str, mode: str = "dense") -> task.Searcher:
  """The teacher's `Searcher` over an index directory (`mode` as `load_backend`'s)."""
  backend = load_backend(index, mode)
  store = DocumentStore.load(os.path.join(index, index_lib.DOCUMENTS_FILE))

  def search(query: str, k: int) -> list[task.Retrieved]:
    return [task.Retrieved(h.doc_id, _title(store, h.doc_id), h.text)
            for h in backend.search(query, k)[:k]]

  return search


def _title(store: DocumentStore, doc_id: str) -> str:
  title = store.get(doc_id).metadata.get("title") if doc_id in store else None
  return title if isinstance(title, str) and title.strip() else doc_id


def source_registry(index: str, mode: str = "dense", name: str = task.DEFAULT_SOURCE
                    ) -> SourceRegistry:
  """One R-Search source `name` over the index directory (titles from its store)."""
  store = DocumentStore.load(os.path.join(index, index_lib.DOCUMENTS_FILE))
  titles = {d.doc_id: _title(store, d.doc_id) for d in store}
  return SourceRegistry([BackendSource(name, load_backend(index, mode), titles)])


@dataclasses.dataclass(frozen=True)
class _GoldFirst:
  """A source whose results for `query` start with the gold passage (the fallback)."""

  name: str
  inner: Any
  query: str
  gold: Passage
  note: str = ""

  def search(self, query: str, k: int) -> list[Passage]:
    found = list(self.inner.search(query, k))
    if query != self.query:
      return found
    return [self.gold, *[p for p in found if p.text != self.gold.text]][:k]


def injection(rendered: str) -> str:
  """What an R-Search rollout injects after `</search>` (sampling/protocols.py RSearch):
  the rendered `<r>` blocks between newlines."""
  return f"\n{rendered}\n"


def rsearch_dialogue(question: Question, sources: SourceRegistry, *, k: int = 3,
                     stats: task.TeacherStats | None = None, config: KBConfig = KBConfig(),
                     source: str = task.DEFAULT_SOURCE) -> dict[str, Any]:
  """An R-Search teacher dialogue: the question's whole DAG in one `<search>` block
  (`task.dag_block`), executed and rendered exactly as a rollout injects it
  (`search_render.search_response`, between newlines), then the answer, in one assistant
  turn whose `injected` ranges cover the results (so the loss leaves them out). When a hop's
  gold document is not in its node's results (or a 2-hop's `{A}` is not the bridge), the
  dialogue is instead one single-node block per fact, each naming the entity read before it; a
  fact still missing gets its gold passage first (`stats.gold_fallbacks`)."""
  stats = stats if stats is not None else task.TeacherStats()
  messages = task.prompt_messages(question, "rsearch")
  answer = (task.answer_text(question, config), False)
  block = task.dag_block(question, source)
  rendered, result = search_render.search_response(block, sources, k=k)
  golds = [task.fact_text(question, hop, config) for hop in range(len(question.hops))]
  if not isinstance(result, DAGError):
    stats.searches += result.num_searches
    found = [any(p.text == gold for p in result.passages.get(name, ()))
             for name, gold in zip("AB", golds)]
    if question.bridge is not None:   # {A} must have become the bridge, not just any title
      found.append(question.bridge in result.queries.get("B", ""))
    if all(found):
      return {"messages": [*messages, task.assistant_turn(
          [(block, False), (injection(rendered), True), answer])]}
  stats.misses += 1
  read, segments = "", []
  for hop, (subject, relation, _) in enumerate(question.hops):
    query = task.QUERIES[relation][0].format(s=subject)
    block = f"<search>\nNodes:\nA: {query} ({source})\n</search>"
    rendered, result = search_render.search_response(block, sources, k=k)
    stats.searches += 1
    passages = () if isinstance(result, DAGError) else result.passages["A"]
    if not any(p.text == golds[hop] for p in passages):
      stats.gold_fallbacks += 1
      gold = task.gold_passage(kb_lib.doc_id(relation, subject), config)
      inner = sources.get(source)
      patched = SourceRegistry([_GoldFirst(inner.name, inner, query,
                                           Passage(gold.title, gold.text, 1.0, inner.name),
                                           inner.note)])
      rendered, _ = search_render.search_response(block, patched, k=k)
    segments += [(f"{read}{block}", False), (injection(rendered), True)]
    read = golds[hop] + " "
  return {"messages": [*messages, task.assistant_turn([*segments, answer])]}


def teacher_records(num_examples: int, seed: int = 0, *, index: str, protocol: str,
                    split: int = 0, hop: int = 0, k: int = 3, mode: str = "dense",
                    config: KBConfig = KBConfig()) -> tuple[list[dict[str, Any]],
                                                            task.TeacherStats]:
  """(SFT dialogues, search stats) of `protocol` ("search_r1" or "rsearch") for the questions
  `task.select(num_examples, seed, split=, hop=)` picks, searching the index directory
  `index` by `mode`."""
  if protocol not in ("search_r1", "rsearch"):
    raise ValueError(f"teacher_records: protocol must be 'search_r1' or 'rsearch', got "
                     f"{protocol!r}")
  questions = task.select(num_examples, seed, split=split, hop=hop, config=config)
  stats = task.TeacherStats()
  if protocol == "search_r1":
    search = searcher(index, mode)
    records = [task.search_r1_dialogue(q, search, k=k, stats=stats, config=config)
               for q in questions]
  else:
    registry = source_registry(index, mode)
    records = [rsearch_dialogue(q, registry, k=k, stats=stats, config=config)
               for q in questions]
  return records, stats


def write_teacher_sft(path: str | os.PathLike[str], num_examples: int, seed: int = 0, *,
                      index: str, protocol: str, **kwargs: Any) -> task.TeacherStats:
  """Writes `teacher_records` as JSONL (an SFT data source: `config.data.sources`) and
  returns the search stats."""
  records, stats = teacher_records(num_examples, seed, index=index, protocol=protocol,
                                   **kwargs)
  data_sources.write_jsonl(records, path)
  return stats


def rag_prompts(num_examples: int, seed: int = 0, *, index: str, split: int = 1,
                hop: int = 2, k: int = 3, mode: str = "dense",
                config: KBConfig = KBConfig()) -> list[dict[str, Any]]:
  """The RAG baseline's RL/eval prompt records: the top-`k` passages for the question itself
  in an `<information>` block above it, answered once (the "direct" system prompt); the same
  questions, answers and fields as `task.prompts` with the same arguments."""
  search = searcher(index, mode)
  out = []
  for q in task.select(num_examples, seed, split=split, hop=hop, config=config):
    context = task.information_block(search(q.text, k))
    out.append({"messages": [{"role": "system", "content": task.SYSTEMS["direct"]},
                             {"role": "user", "content": f"{context}\n{q.text}"}],
                "answer": q.answer, "hop_type": q.hop_type, "template": q.template,
                "gold_docs": list(q.gold_docs)})
  return out


def gold_recall(questions: Sequence[Question], index: str, mode: str = "bm25", k: int = 3
                ) -> float:
  """The fraction of 1-hop questions whose gold document is in the top `k` for the teacher's
  query (a quick health check of an index)."""
  search = searcher(index, mode)
  one = [q for q in questions if q.hop_type == "one_hop"]
  hits = 0
  for q in one:
    subject, relation, _ = q.hops[0]
    hits += any(p.doc_id == q.gold_docs[0]
                for p in search(task.QUERIES[relation][0].format(s=subject), k))
  return hits / max(1, len(one))
