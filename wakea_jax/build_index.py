r"""Retrieval index binary: build an index directory, or query one.

  python -m wakea_jax.build_index --docs=notes/,code/pkg,extra.jsonl --out=/tmp/index
  python -m wakea_jax.build_index --load=/tmp/index --query="how is the KV cache donated?"

--docs takes files and directories (.txt, .md, .py, .jsonl; see retrieval/chunking.py for
chunk ids). --embedder names the embedder (default all-MiniLM-L6-v2; "hash-64" needs no
weights); --mode picks dense, bm25 or hybrid search for --query.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from wakea_jax.retrieval import chunking
from wakea_jax.retrieval import index as index_lib
from wakea_jax.retrieval.store import Hit

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_list("docs", [], "Files or directories to index (.txt, .md, .py, .jsonl).")
  flags.DEFINE_string("out", None, "Index directory to write (with --docs).")
  flags.DEFINE_string("load", None, "Index directory to query (with --query).")
  flags.DEFINE_string("query", None, "A query to run against --load.")
  flags.DEFINE_integer("k", 5, "Number of results.")
  flags.DEFINE_enum("mode", "hybrid", ["dense", "bm25", "hybrid"], "Search mode for --query.")
  flags.DEFINE_string("embedder", "all-MiniLM-L6-v2", "Embedder name ('hash-<dim>' for tests).")
  flags.DEFINE_string("embedder_path", None, "Model directory for the embedder (optional).")
  flags.DEFINE_integer("chunk_tokens", 256, "Maximum tokens per chunk.")
  flags.DEFINE_integer("chunk_overlap", 32, "Tokens of overlap between text chunks.")
  flags.DEFINE_integer("brute_force_below", index_lib.IndexConfig.brute_force_below,
                       "Corpora smaller than this are searched exactly.")
  flags.DEFINE_integer("num_leaves", None, "ScaNN tree leaves (default: by corpus size).")
  flags.DEFINE_integer("leaves_to_search", None, "ScaNN leaves per query (default: by size).")
  flags.DEFINE_integer("reorder", None, "ScaNN candidates rescored exactly (default 250).")


class BuildIndexUsageError(ValueError):
  """A bad combination of flags."""


def build(docs: Sequence[str], out: str, *, embedder: str = "all-MiniLM-L6-v2",
          embedder_path: str | None = None, chunk_tokens: int = 256, chunk_overlap: int = 32,
          config: index_lib.IndexConfig = index_lib.IndexConfig()) -> index_lib.DenseIndex:
  """Chunks `docs`, embeds, builds and saves the index to `out`; returns it."""
  from wakea_jax.retrieval.embed import load_embedder

  if not docs:
    raise BuildIndexUsageError("--docs is empty: give at least one file or directory")
  documents = chunking.load_documents(docs, max_tokens=chunk_tokens, overlap=chunk_overlap)
  index = index_lib.DenseIndex.build(documents, load_embedder(embedder, path=embedder_path),
                                     config)
  index.save(out)
  return index


def query(load: str, text: str, *, k: int = 5, mode: str = "hybrid",
          embedder: str | None = None, embedder_path: str | None = None) -> list[Hit]:
  """Top-k hits for `text` from the index directory `load`. A given `embedder` name must be
  the one the index was built with."""
  from wakea_jax.toolbox.retrieval import load_backend

  if embedder is not None and mode != "bm25":
    meta = index_lib.read_meta(load, verify=False)
    if meta["embedder"]["name"] != embedder:
      raise index_lib.EmbedderMismatchError(
          f"{load}/meta.json: index was built with embedder {meta['embedder']['name']!r}, "
          f"--embedder={embedder!r} was asked for")
  return load_backend(load, mode, embedder_path=embedder_path).search(text, k)


def run(*, docs: Sequence[str] = (), out: str | None = None, load: str | None = None,
        query_text: str | None = None, **kwargs) -> index_lib.DenseIndex | list[Hit]:
  """--docs + --out builds; --load + --query searches."""
  if docs and out and not load and query_text is None:
    keys = ("embedder", "embedder_path", "chunk_tokens", "chunk_overlap", "config")
    return build(docs, out, **{k: v for k, v in kwargs.items() if k in keys})
  if load and query_text is not None and not docs and not out:
    keys = ("k", "mode", "embedder", "embedder_path")
    return query(load, query_text, **{k: v for k, v in kwargs.items() if k in keys})
  raise BuildIndexUsageError("use either --docs=PATH[,PATH] --out=DIR, or --load=DIR "
                             "--query=TEXT")


def main(argv: Sequence[str]) -> None:
  """Builds an index (--docs, --out) or queries one (--load, --query) and prints the result."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = index_lib.IndexConfig(brute_force_below=FLAGS.brute_force_below,
                                 num_leaves=FLAGS.num_leaves,
                                 leaves_to_search=FLAGS.leaves_to_search, reorder=FLAGS.reorder)
  embedder_given = FLAGS["embedder"].present
  try:
    result = run(docs=FLAGS.docs, out=FLAGS.out, load=FLAGS.load, query_text=FLAGS.query,
                 k=FLAGS.k, mode=FLAGS.mode,
                 embedder=FLAGS.embedder if (FLAGS.docs or embedder_given) else None,
                 embedder_path=FLAGS.embedder_path, chunk_tokens=FLAGS.chunk_tokens,
                 chunk_overlap=FLAGS.chunk_overlap, config=config)
  except BuildIndexUsageError as e:
    raise app.UsageError(str(e)) from None
  if isinstance(result, index_lib.DenseIndex):
    print(f"indexed {len(result)} chunks ({result.backend}, embedder {result.embedder.name}, "
          f"dim {result.dim}) -> {FLAGS.out}")
    return
  from wakea_jax.toolbox.retrieval import format_hits

  print(format_hits(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
