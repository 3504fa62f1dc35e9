"""The tool registry: `default_router(enabled=...)` builds a Router with the named tools."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from wakea_jax.retrieval.index import is_index_dir
from wakea_jax.toolbox import calculator, retrieval, sandbox, web
from wakea_jax.toolbox.procedures import ProcedureMemory, procedure_tool
from wakea_jax.toolbox.retrieval import BM25, Document, SearchBackend
from wakea_jax.toolbox.router import Router
from wakea_jax.toolbox.sandbox import SandboxConfig

TOOL_NAMES = ("calculator", "python", "retrieve", "web_search", "procedures")


def default_router(
    enabled: Iterable[str] = ("calculator",),
    retrieval_corpus: str | Iterable[str | Document] | None = None,
    retrieval_backend: SearchBackend | None = None,
    web_corpus: str | Iterable[str | Document] | None = None,
    web_backend: SearchBackend | None = None,
    sandbox_config: SandboxConfig = SandboxConfig(),
    tool_timeout_s: float | None = 30.0,
    procedures: str | os.PathLike[str] | ProcedureMemory | None = None,
) -> Router:
  """Builds a Router with the named tools. A search tool needs a backend or a corpus: an
  index directory (dense + BM25 hybrid) or documents / a JSONL file (BM25).
  `web_backend` is treated as online; `web_corpus` gives the offline-labelled local search.
  "procedures" needs `procedures`: a ProcedureMemory, or a JSON file or directory of SOPs
  (matched by trigger words and priority; pass a memory built with an embedder for
  similarity)."""
  tools = []
  for name in enabled:
    if name == "calculator":
      tool = calculator.make_tool()
    elif name == "python":
      tool = sandbox.make_tool(sandbox_config)
    elif name == "retrieve":
      if retrieval_backend is None:
        if retrieval_corpus is None:
          raise ValueError("tool 'retrieve' needs retrieval_corpus or retrieval_backend")
        if isinstance(retrieval_corpus, str) and is_index_dir(retrieval_corpus):
          # A directory written by `python -m wakea_jax.build_index`: hybrid dense + BM25.
          retrieval_backend = retrieval.load_backend(retrieval_corpus)
        else:
          retrieval_backend = BM25(retrieval.as_documents(retrieval_corpus))
      tool = retrieval.make_tool(retrieval_backend)
    elif name == "web_search":
      if web_backend is not None:
        tool = web.make_tool(web_backend, offline=False)
      elif web_corpus is not None:
        tool = web.make_tool(BM25(retrieval.as_documents(web_corpus)), offline=True)
      else:
        raise ValueError("tool 'web_search' needs web_corpus (offline) or web_backend")
    elif name == "procedures":
      if procedures is None:
        raise ValueError("tool 'procedures' needs procedures (a ProcedureMemory, or a JSON "
                         "file or directory of procedures)")
      if not isinstance(procedures, ProcedureMemory):
        procedures = ProcedureMemory.from_path(procedures)
      tool = procedure_tool(procedures)
    else:
      raise ValueError(f"unknown tool {name!r}; known: {', '.join(TOOL_NAMES)}")
    tools.append(dataclasses.replace(tool, timeout_s=tool_timeout_s))
  return Router(tools)
