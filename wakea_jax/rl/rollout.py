"""Rollouts: prompts -> G sampled completions each (tool loop on or off) -> a train batch.

`generate_rollouts` runs the jitted sampler (and, with tools, `run_tool_loop`, which pauses a
row at its tool call, executes it and injects the response) and returns flat per-row
results, group-major: rows g*G .. g*G+G-1 are the G completions of prompt g.

`to_batch` lays rows out as fixed-shape arrays for the jitted update: the sequence is
prompt + completion, `input_ids = seq[:-1]`, `targets = seq[1:]`, and `loss_mask` is 1
exactly on the targets the policy generated, so prompt tokens, padding and tool-output
tokens (injected by the tool loop) are excluded from every loss. The width is rounded up to
a multiple of `width_multiple` so that the update compiles once per width bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.retrieval.index import is_index_dir
from wakea_jax.rl.media_prompts import PromptMedia
from wakea_jax.rl.prompts import PromptRecord
from wakea_jax.rl.samples import Sample
from wakea_jax.sampling import precision
from wakea_jax.sampling.batching import ContinuousBatcher
from wakea_jax.sampling.protocols import InteractionProtocol, RSearch, SearchR1
from wakea_jax.sampling.sampler import Sampler, StopRule
from wakea_jax.sampling.tool_loop import ToolLoopOutput, last_turn, run_tool_loop
from wakea_jax.toolbox.registry import default_router
from wakea_jax.toolbox.router import Router
from wakea_jax.toolbox.search_sources import SearchSource, SourceRegistry, bm25_source, index_source


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """config.rollout: how completions are sampled for training (and evaluation)."""

  group_size: int = 8              # completions per prompt (G)
  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0                   # 0 disables
  top_p: float = 1.0               # 1 disables
  tools: tuple[str, ...] = ()      # toolbox names; empty: no tool loop
  max_tool_calls: int = 2
  max_tool_tokens: int = 64
  chunk_steps: int = 16            # decode steps per while_loop chunk
  # Continuous batching (sampling/batching.py): this many rows decode at once and each takes
  # the next completion when its own finishes or pauses for a tool call. 0: static batching
  # (every row at once). On one process; several processes batch statically.
  slots: int = 0
  # Decode precision (sampling/precision.py): "" runs the trainer's params in its dtype;
  # "bfloat16" casts weights and compute to bfloat16; "int8" stores the layer projections in
  # per-channel int8. With either, the learner re-scores the rollouts with the trainer (the
  # importance ratio is against the trainer's log-probs) and logs the gap every step.
  dtype: str = ""
  # Tensor-parallel sampling (verl's resharding between phases): N > 0 samples on a mesh of
  # its own, (data=-1, fsdp=1, tensor=N) over the same devices, and the policy's params are
  # resharded onto it once per update; the trainer keeps config.mesh for scoring and the
  # update. Decode streams every weight each step, so splitting the layers over N devices
  # (XLA:CPU runs one device's small matmuls on one core) speeds it up, while the update's
  # large matmuls run best on the trainer's layout. 0: sample on the trainer's mesh.
  tensor: int = 0
  # Search protocols (sampling/protocols.py): "" (the chat tools above, if any), "search_r1"
  # (<search>q</search> -> <information> passages) or "rsearch" (a <search> query DAG over
  # sources -> <r> blocks). Both search `index`: a directory written by
  # `python -m wakea_jax.build_index` (searched by `search_mode`), or a corpus file or
  # directory (BM25); R-Search names it "Local" (dense or `search_mode`) and "BM25".
  protocol: str = ""
  index: str = ""
  search_mode: str = "dense"
  search_k: int = 3
  max_searches: int = 4
  search_tokens: int = 256          # token cap of one injected results block
  search_tag: str = "search"
  information_tag: str = "information"

  def __post_init__(self) -> None:
    object.__setattr__(self, "tools", tuple(self.tools))
    precision.check_dtype(self.dtype)
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"rollout.protocol={self.protocol!r} is not one of {PROTOCOLS}")
    if self.protocol and not self.index:
      raise ValueError(f"rollout.protocol={self.protocol!r} needs rollout.index (an index "
                       "directory or a corpus file to search)")
    if self.protocol and self.tools:
      raise ValueError(f"rollout.protocol={self.protocol!r} and rollout.tools={self.tools} "
                       "cannot be combined: a rollout speaks one protocol")
    for name in ("search_k", "max_searches", "search_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("group_size", "max_new_tokens", "max_tool_tokens", "chunk_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
    if self.tensor < 0:
      raise ValueError(f"rollout.tensor must be >= 0 (0: the trainer's mesh), got {self.tensor}")
    if self.slots < 0:
      raise ValueError(f"rollout.slots must be >= 0 (0: static batching), got {self.slots}")
    if self.max_tool_calls < 0:
      raise ValueError(f"rollout.max_tool_calls must be >= 0, got {self.max_tool_calls}")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"rollout: temperature ({self.temperature}) and top_k ({self.top_k}) "
                       f"must be >= 0 and top_p ({self.top_p}) in (0, 1]")


PROTOCOLS = ("", "search_r1", "rsearch")


def router_for(config: RolloutConfig) -> Router | None:
  """The tool router for `config.tools` (None: rollouts without tools)."""
  return default_router(enabled=config.tools) if config.tools else None


def search_source(index: str, mode: str = "dense", name: str = "Local") -> SearchSource:
  """The source a search protocol queries: an index directory (by `mode`) or a corpus
  (BM25). Errors name the path."""
  if is_index_dir(index):
    return index_source(name, index, mode)
  if not os.path.exists(index):
    raise FileNotFoundError(f"rollout.index: {index} is neither an index directory nor a "
                            "corpus file or directory")
  return bm25_source(name, index)


def protocol_for(config: RolloutConfig, tokenizer: Tokenizer) -> InteractionProtocol | None:
  """The search protocol of `config` (None without one). Cached on the search settings, so
  the index is loaded once per process however many rollouts and evaluations use it."""
  if not config.protocol:
    return None
  return _search_protocol(config.protocol, config.index, config.search_mode, config.search_k,
                          config.max_searches, config.search_tokens, config.search_tag,
                          config.information_tag, tokenizer)


@functools.lru_cache(maxsize=4)
def _search_protocol(protocol: str, index: str, mode: str, k: int, max_searches: int,
                     tokens: int, search_tag: str, information_tag: str,
                     tokenizer: Tokenizer) -> InteractionProtocol:
  if protocol == "search_r1":
    return SearchR1(tokenizer, search_source(index, mode), k=k, max_searches=max_searches,
                    max_tokens=tokens, search_tag=search_tag, information_tag=information_tag)
  sources = [search_source(index, mode)]
  if is_index_dir(index):
    sources.append(search_source(index, "bm25", name="BM25"))
  return RSearch(tokenizer, SourceRegistry(sources), k=k, max_searches=max_searches,
                 max_tokens=tokens)


@dataclasses.dataclass
class Rollouts:
  """Flat, group-major rows (len = num_prompts * group_size)."""
  prompts: list[PromptRecord]          # one per row (repeated within a group)
  prompt_ids: list[list[int]]
  completion_ids: list[list[int]]      # model and tool tokens, in order
  sampler_logprobs: list[np.ndarray]   # per completion token; 0 for tool tokens
  tool_mask: list[np.ndarray]          # 1 on tool-output tokens
  num_tool_calls: list[int]
  stop_reason: list[str]
  texts: list[str]                     # decoded completions
  finals: list[str]                    # decoded last assistant turn (no stop token)
  tool_errors: list[int]               # tool results that were "Error: ..."
  group_size: int
  # The rows' media in the per-row layout (models/media.py), for media prompts; else None.
  media: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.completion_ids)

  @property
  def num_groups(self) -> int:
    """Prompts in these rollouts (rows / group size)."""
    return len(self) // self.group_size

  def samples(self) -> list[Sample]:
    """What the rewards see about each row."""
    out = []
    for i, prompt in enumerate(self.prompts):
      tool_text = self.texts[i]
      model_tokens = int(len(self.completion_ids[i]) - self.tool_mask[i].sum())
      out.append(Sample(
          prompt=prompt.text, completion=tool_text, answer=prompt.answer, meta=prompt.meta,
          num_tool_calls=self.num_tool_calls[i],
          tool_errors=self.tool_errors[i],
          truncated=self.stop_reason[i] in ("length", "capacity"),
          num_tokens=model_tokens, final_text=self.finals[i]))
    return out

  def select(self, groups: Sequence[int]) -> Rollouts:
    """The rows of the given groups, in that order."""
    rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
    pick = lambda xs: [xs[r] for r in rows]
    return Rollouts(
        prompts=pick(self.prompts), prompt_ids=pick(self.prompt_ids),
        completion_ids=pick(self.completion_ids), sampler_logprobs=pick(self.sampler_logprobs),
        tool_mask=pick(self.tool_mask), num_tool_calls=pick(self.num_tool_calls),
        stop_reason=pick(self.stop_reason), texts=pick(self.texts), finals=pick(self.finals),
        tool_errors=pick(self.tool_errors), group_size=self.group_size,
        media=None if self.media is None else {k: v[rows] for k, v in self.media.items()})

  @staticmethod
  def concat(parts: Sequence[Rollouts]) -> Rollouts:
    """The rows of `parts` one after another (same group size)."""
    first = parts[0]
    merged = {f.name: [x for p in parts for x in getattr(p, f.name)]
              for f in dataclasses.fields(Rollouts) if f.name not in ("group_size", "media")}
    media = None
    if first.media is not None:
      media = {k: np.concatenate([p.media[k] for p in parts]) for k in first.media}
    return Rollouts(**merged, group_size=first.group_size, media=media)


def generate_rollouts(sampler: Sampler, params: nnx.State, prompts: Sequence[PromptRecord], *,
                      tokenizer: Tokenizer, config: RolloutConfig, rng: jax.Array,
                      router: Router | None = None, tool_schemas: Any = None,
                      protocol: InteractionProtocol | None = None,
                      media: PromptMedia | None = None,
                      stop: Sequence[StopRule] = ()) -> Rollouts:
  """G completions of each prompt. With a `router` the tool loop runs tool calls; with a
  search `protocol` (`protocol_for`) rows search as they go, always on continuous batching
  (`rollout.slots`, or every row at once when 0). With `media` (rl/media_prompts.py) the
  prompts' images or audio are rendered and prefilled with them, on static or continuous
  batching, with the tool loop or a search protocol too (their turns are text; a row resumed
  after one is prefilled again with its media). `stop`: host-side stops of plain generation
  (sampler.StopRule: strings or predicates on a row's text, e.g. SRL's end of a step)."""
  g = config.group_size
  rows = [p for p in prompts for _ in range(g)]
  row_media = None
  if media is not None:
    rendered = {id(p): media.render(p) for p in prompts}
    row_media = media.arrays(rows)
  else:
    rendered = {id(p): p.render(tokenizer, tool_schemas) for p in prompts}
  prompt_ids = [rendered[id(p)] for p in rows]
  with_media = {} if row_media is None else {"media": row_media}
  continuous = bool(config.slots) and jax.process_count() == 1 and bool(prompt_ids)
  # With slots 0 only the search protocols use it, with every row at once.
  batcher = ContinuousBatcher(sampler, slots=config.slots or max(len(rows), 1),
                              chunk_steps=config.chunk_steps)
  protocol = protocol or protocol_for(config, tokenizer)
  if stop and (protocol is not None or (router is not None and config.max_tool_calls > 0)):
    raise ValueError("generate_rollouts: `stop` applies to plain generation; the tool loop "
                     "and the search protocols end turns themselves")
  if protocol is not None:
    if jax.process_count() > 1:
      raise ValueError(f"rollout.protocol={config.protocol!r} runs on one process for now "
                       "(its pauses use continuous batching)")
    out = batcher.run_protocol(params, prompt_ids, protocol, rng=rng,
                               max_new_tokens=config.max_new_tokens, **with_media)
  elif router is not None and config.max_tool_calls > 0:
    tool_settings = dict(tokenizer=tokenizer, router=router, rng=rng,
                         max_new_tokens=config.max_new_tokens,
                         max_tool_calls=config.max_tool_calls,
                         max_tool_tokens=config.max_tool_tokens, **with_media)
    out = (batcher.run_tools(params, prompt_ids, **tool_settings) if continuous else
           run_tool_loop(sampler, params, prompt_ids, chunk_steps=config.chunk_steps,
                         **tool_settings))
  else:
    stops = {"stop_strings": tuple(stop), "tokenizer": tokenizer} if stop else {}
    out = (batcher if continuous else sampler).generate(
        params, prompt_ids, max_new_tokens=config.max_new_tokens, rng=rng, **with_media,
        **stops)
  return _rollouts(rows, prompt_ids, out, tokenizer, sampler, g, media=row_media)


def _rollouts(rows: list[PromptRecord], prompt_ids: list[list[int]], out: Any,
              tokenizer: Tokenizer, sampler: Sampler, g: int,
              media: dict[str, np.ndarray] | None = None) -> Rollouts:
  tokens, logprobs = out.tokens, out.logprobs
  if isinstance(out, ToolLoopOutput):
    tool_mask, calls, reasons, errors = (out.tool_mask, out.num_tool_calls, out.stop_reason,
                                         out.tool_errors)
  else:
    tool_mask = [np.zeros(len(t), np.int32) for t in tokens]
    calls, reasons, errors = [0] * len(rows), out.stop_reason, [0] * len(rows)
  return Rollouts(prompts=rows, prompt_ids=prompt_ids, completion_ids=[list(t) for t in tokens],
                  sampler_logprobs=[np.asarray(lp, np.float32) for lp in logprobs],
                  tool_mask=[np.asarray(m, np.int32) for m in tool_mask],
                  num_tool_calls=list(calls), stop_reason=list(reasons),
                  texts=[tokenizer.decode(t) for t in tokens],
                  finals=[tokenizer.decode(final_turn(t, m, sampler.stop_ids))
                          for t, m in zip(tokens, tool_mask)],
                  tool_errors=list(errors), group_size=g, media=media)


def final_turn(tokens: Sequence[int], tool_mask: Sequence[int], stop_ids: Sequence[int]
               ) -> list[int]:
  """The tokens of the last assistant turn: after the last tool token, without a final stop
  id (the tool turn ends with the next generation prompt, so what follows is model output)."""
  turn = last_turn(tokens, tool_mask)
  if turn and turn[-1] in stop_ids:
    turn.pop()
  return turn


def batch_width(rollouts: Rollouts, multiple: int = 64) -> int:
  """The train batch width: the longest prompt + completion - 1, rounded up to `multiple`."""
  longest = max(len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids))
  return -(-(longest - 1) // multiple) * multiple


def to_batch(rollouts: Rollouts, *, width: int | None = None, pad_id: int = 0,
             width_multiple: int = 64) -> dict[str, np.ndarray]:
  """Fixed-shape arrays [rows, width]: input_ids, targets, loss_mask, segment_ids,
  positions, sampler_logprobs (aligned with targets)."""
  width = width or batch_width(rollouts, width_multiple)
  n = len(rollouts)
  batch = {
      "input_ids": np.full((n, width), pad_id, np.int32),
      "targets": np.full((n, width), pad_id, np.int32),
      "loss_mask": np.zeros((n, width), np.float32),
      "segment_ids": np.zeros((n, width), np.int32),
      "positions": np.zeros((n, width), np.int32),
      "sampler_logprobs": np.zeros((n, width), np.float32),
  }
  for r in range(n):
    prompt, completion = rollouts.prompt_ids[r], rollouts.completion_ids[r]
    seq = np.asarray(prompt + completion, np.int32)
    length = len(seq) - 1
    if length > width:
      raise ValueError(f"row {r} needs width {length} > {width}")
    batch["input_ids"][r, :length] = seq[:-1]
    batch["targets"][r, :length] = seq[1:]
    batch["segment_ids"][r, :length] = 1
    batch["positions"][r, :length] = np.arange(length)
    start = len(prompt) - 1          # the position whose target is the first completion token
    k = len(completion)
    batch["loss_mask"][r, start:start + k] = 1 - rollouts.tool_mask[r]
    batch["sampler_logprobs"][r, start:start + k] = rollouts.sampler_logprobs[r]
  if rollouts.media is not None:
    batch.update(rollouts.media)
  return batch
