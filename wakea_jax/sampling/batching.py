"""Continuous batching: a fixed set of slots over one KV cache, each slot taking the next
waiting request as soon as its own finishes or pauses for a tool.

Static batching (`Sampler.generate`, `run_tool_loop`) decodes a batch until its longest row
is done, so with completions of very different lengths most rows sit finished while the
longest one goes on. `ContinuousBatcher` keeps `slots` rows busy instead:

    ready = every request, in order
    loop:
      free slots take ready requests         Sampler.refill: prefill into those rows only
      decode until a row finishes            Sampler.decode_until_free (at most chunk steps)
      harvest every row's new tokens         host, one transfer per chunk
      stop strings: rows whose text holds one are cut and stopped (host, as in generate)
      a row that pauses (sampling/protocols.py: it ended its turn with tool calls, or wrote
        a protocol's pause string such as Search-R1's `</search>`, and is cut right after
        it): the protocol's response is computed in a thread pool and its slot is free at
        once; when the response is back (tool results, retrieved passages) the request is
        ready again, the response in its context and masked
      other finished rows -> their request's output; their slots are free

A request resumed after a tool turn is prefilled again from its whole context (prompt,
tokens so far, tool turn) into whichever slot is free: recomputing a few hundred tokens of
prefill costs far less than holding a slot idle for a tool call (a sandboxed program runs
for tens to hundreds of milliseconds, many decode steps). Its generated count carries over.

Determinism. A request's draws use its own key, fold_in(rng, request index), folded with its
generated count at every token (`Sampler`'s per-row keys): its tokens and log-probs do not
depend on which slot or batch it ran in, nor on when its tool results came back, and equal
what `Sampler.generate` (or `run_tool_loop`) gives the same request as row `index` of one
static batch (to float rounding: greedy tokens identical, log-probs within 1e-5; tested).

Media prompts (a vision- or audio-language model's sampler): `media` in the per-row layout
(models/media.py, first axis one entry per prompt) travels with its request; every refill
of a request, first start or resume, prefills its context with its media
(`Sampler.refill(media=)`), so a resumed request sees its images again.

Tool calls run on the host in `tool_workers` threads while the device decodes the other
slots (the router's tools are thread-safe; isolated tools use separate worker processes).

Not here: several processes (each process would need the same refill decisions), which
raises; the RL learner falls back to static batching there.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.sampling.protocols import ChatToolCalls, InteractionProtocol
from wakea_jax.sampling.sampler import (
  STOP_ID,
  DecodeState,
  SampleOutput,
  Sampler,
  StopRule,
  pad_media_rows,
  round_pow2,
  row_keys,
  stop_string_cut,
)
from wakea_jax.sampling.tool_loop import ToolLoopOutput, last_turn
from wakea_jax.toolbox.router import Router


@dataclasses.dataclass
class _Request:
  """One request's progress on the host."""
  prompt: list[int]
  limit: int                   # max model tokens
  key: np.ndarray              # [2] uint32
  tokens: list[int] = dataclasses.field(default_factory=list)   # model and tool tokens
  logprobs: list[float] = dataclasses.field(default_factory=list)
  processed: list[float] = dataclasses.field(default_factory=list)
  tool_mask: list[int] = dataclasses.field(default_factory=list)
  generated: int = 0           # model tokens so far (the keys fold this in)
  calls: int = 0
  errors: int = 0
  reason: str = ""

  @property
  def context(self) -> list[int]:
    """What a (re)start prefills: the prompt and everything since."""
    return self.prompt + self.tokens


@dataclasses.dataclass(frozen=True)
class ContinuousBatcher:
  """Runs many requests through `slots` rows of one cache (see the module docstring).

  `chunk_steps` bounds the decode steps between host looks (a row that finishes returns
  control at once; the bound only matters for how long the host waits between harvests,
  and how far past a stop string a row may run before it is cut).
  """

  sampler: Sampler
  slots: int = 8
  chunk_steps: int = 32
  tool_workers: int = 4

  def __post_init__(self) -> None:
    if self.slots < 1:
      raise ValueError(f"slots must be >= 1, got {self.slots}")
    if self.chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {self.chunk_steps}")
    if self.tool_workers < 1:
      raise ValueError(f"tool_workers must be >= 1, got {self.tool_workers}")

  def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int | Sequence[int], rng: jax.Array,
               stop_strings: Sequence[StopRule] = (), tokenizer: Any = None,
               media: Mapping[str, Any] | None = None) -> SampleOutput:
    """Completions of every prompt, in request order, as `Sampler.generate` returns them.
    `media`: the prompts' images or audio in the per-row layout (first axis len(prompts)),
    as `Sampler.start` takes them; each request's rows go with it into whichever slot."""
    if stop_strings and tokenizer is None:
      raise ValueError("stop_strings need a tokenizer to decode with")
    requests = self._run(params, prompts, max_new_tokens, rng, stop_strings=stop_strings,
                         tokenizer=tokenizer, media=media)
    return SampleOutput(
        tokens=[r.tokens for r in requests],
        logprobs=[np.asarray(r.logprobs, np.float32) for r in requests],
        processed_logprobs=[np.asarray(r.processed, np.float32) for r in requests],
        lengths=[len(r.tokens) for r in requests], stop_reason=[r.reason for r in requests])

  def run_tools(self, params: nnx.State, prompts: Sequence[Sequence[int]], *,
                tokenizer: Tokenizer, router: Router, rng: jax.Array,
                max_new_tokens: int = 256, max_tool_calls: int = 4,
                max_tool_tokens: int = 128,
                media: Mapping[str, Any] | None = None) -> ToolLoopOutput:
    """`run_tool_loop` on continuous batching: the same outputs, request by request (`media`
    as in `generate`; a request resumed after its tool turn is prefilled with its media
    again, since its whole context is)."""
    protocol = ChatToolCalls(tokenizer, router, max_tool_calls, max_tool_tokens)
    if protocol.turn_end not in self.sampler.stop_ids:
      raise ValueError(f"the sampler's stop_ids {self.sampler.stop_ids} must include the chat "
                       f"format's end-of-turn id {protocol.turn_end} (use "
                       "chat.chat_stop_ids(tokenizer))")
    return self.run_protocol(params, prompts, protocol, rng=rng, max_new_tokens=max_new_tokens,
                             media=media)

  def run_protocol(self, params: nnx.State, prompts: Sequence[Sequence[int]],
                   protocol: InteractionProtocol, *, rng: jax.Array,
                   max_new_tokens: int | Sequence[int] = 256,
                   media: Mapping[str, Any] | None = None) -> ToolLoopOutput:
    """Samples with `protocol` (sampling/protocols.py: tool calls, Search-R1, R-Search):
    rows pause, the host responds in a worker thread, and they resume with the response in
    their context (masked in `tool_mask`). `media` as in `generate`."""
    requests = self._run(params, prompts, max_new_tokens, rng, protocol=protocol,
                         reserve=protocol.reserve, media=media)
    return ToolLoopOutput(
        tokens=[r.tokens for r in requests],
        logprobs=[np.asarray(r.logprobs, np.float32) for r in requests],
        tool_mask=[np.asarray(r.tool_mask, np.int32) for r in requests],
        num_tool_calls=[r.calls for r in requests], tool_errors=[r.errors for r in requests],
        stop_reason=[r.reason or "length" for r in requests])

  # ---------------------------------------------------------------------------------------

  def _run(self, params: nnx.State, prompts: Sequence[Sequence[int]],
           max_new_tokens: int | Sequence[int], rng: jax.Array, *,
           stop_strings: Sequence[StopRule] = (), tokenizer: Any = None,
           protocol: InteractionProtocol | None = None, reserve: int = 0,
           media: Mapping[str, Any] | None = None) -> list[_Request]:
    if jax.process_count() > 1:
      raise ValueError("continuous batching runs on one process; on several, use static "
                       "batching (Sampler.generate / run_tool_loop)")
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    n = len(prompts)
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (n,)).copy()
    if limits.min() < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = self.sampler
    longest = max(map(len, prompts))
    _, _, capacity = sampler.buckets(longest, int(limits.max()) + reserve)
    if capacity > sampler.config.max_seq_len:
      raise ValueError(f"prompt ({longest}) + max_new_tokens ({limits.max()}) "
                       + (f"+ tool turns ({reserve}) " if reserve else "")
                       + f"needs a cache of {capacity} > max_seq_len {sampler.config.max_seq_len}")
    if media:
      media = {k: np.asarray(v) for k, v in media.items()}
      wrong = [k for k, v in media.items() if v.ndim < 1 or v.shape[0] != n]
      if wrong:
        raise ValueError(f"media[{wrong[0]!r}] has shape {media[wrong[0]].shape}; the per-row "
                         f"layout needs a first axis of {n} (one entry per prompt)")
    keys = row_keys(rng, 0, n)
    requests = [_Request(list(p), int(limits[i]), keys[i]) for i, p in enumerate(prompts)]
    slots = min(self.slots, n)
    slots += -slots % sampler.batch_multiple()      # the mesh's batch shards divide it
    chunk = min(self.chunk_steps, int(limits.max()))
    sampler, params = sampler.with_packed_weights(params)   # once for every chunk below
    state = sampler.idle_state(slots, chunk, capacity)

    ready = collections.deque(range(n))   # requests waiting for a slot
    owner = np.full(slots, -1)            # the request each slot runs, -1: free
    counts = np.zeros(slots, np.int64)    # each slot's generated count at the last harvest
    running: dict[concurrent.futures.Future, int] = {}   # tool calls -> their request
    pool = (concurrent.futures.ThreadPoolExecutor(self.tool_workers, "tool")
            if protocol is not None else None)
    pause = protocol.pause_strings if protocol is not None else ()
    try:
      while True:
        # Tool results that are back make their requests ready again (first in line: they
        # already hold a share of the work). With nothing else to do, wait for one.
        idle = not (owner >= 0).any() and not ready
        if running:
          finished, _ = concurrent.futures.wait(
              running, timeout=None if idle else 0,
              return_when=concurrent.futures.FIRST_COMPLETED)
          for future in sorted(finished, key=running.get, reverse=True):
            request = running.pop(future)
            if _resume(requests[request], future.result(), capacity):
              ready.appendleft(request)
        free = np.nonzero(owner < 0)[0]
        if len(free) and ready:
          start = free[:len(ready)]
          started = [ready.popleft() for _ in start]
          chosen = [requests[r] for r in started]
          state = refill_rows(sampler, params, state, start, [r.context for r in chosen],
                              [r.limit for r in chosen], [r.key for r in chosen], capacity,
                              generated=[r.generated for r in chosen],
                              media=({k: v[started] for k, v in media.items()} if media
                                     else None))
          owner[start] = started
          counts[start] = [requests[r].generated for r in started]
        if not (owner >= 0).any():
          if running or ready:
            continue
          break
        state = sampler.decode_until_free(params, state, jnp.asarray(chunk, jnp.int32))
        host = jax.device_get({"tokens": state.tokens, "logprobs": state.logprobs,
                               "processed": state.processed_logprobs, "done": state.done,
                               "counts": state.num_generated, "codes": state.stop_code})
        stop_rows = []
        for slot in np.nonzero(owner >= 0)[0]:
          request = requests[owner[slot]]
          d = int(host["counts"][slot] - counts[slot])   # columns 0..d-1 of this chunk
          request.tokens += host["tokens"][slot, :d].tolist()
          request.logprobs += host["logprobs"][slot, :d].tolist()
          request.processed += host["processed"][slot, :d].tolist()
          request.tool_mask += [0] * d
          request.generated += d
          counts[slot] = host["counts"][slot]
          if stop_strings and _cut_turn(request, stop_strings, tokenizer):
            request.reason = "stop_string"
            if not host["done"][slot]:
              stop_rows.append(slot)
            owner[slot] = -1
            continue
          paused = bool(pause) and _cut_turn(request, pause, protocol.tokenizer)
          if not (paused or host["done"][slot]):
            continue
          if not host["done"][slot]:
            stop_rows.append(slot)
          index, owner[slot] = int(owner[slot]), -1
          code = int(host["codes"][slot])
          if protocol is None:
            request.reason = "stop_id" if code == STOP_ID else "length"
            continue
          payload, reason = protocol.on_stop(
              last_turn(request.tokens, request.tool_mask), code=code, paused=paused,
              calls=request.calls, budget_left=request.limit - request.generated)
          if payload is None:
            request.reason = reason
          else:
            running[pool.submit(protocol.respond, payload)] = index
        if stop_rows:   # cut rows that were still decoding: stop them
          state = state.replace(done=state.done.at[np.asarray(stop_rows)].set(True))
        state = state.replace(step=jnp.zeros((), jnp.int32))
    finally:
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    return requests


def refill_rows(sampler: Sampler, params: nnx.State, state: DecodeState, slots: Sequence[int],
                contexts: Sequence[Sequence[int]], limits: Sequence[int], keys: Sequence[Any],
                capacity: int, *, generated: Sequence[int] | None = None,
                temperature: Sequence[float] | None = None,
                top_p: Sequence[float] | None = None,
                media: Mapping[str, Any] | None = None) -> DecodeState:
  """`Sampler.refill` of `contexts` into rows `slots` of a running state, from host lists:
  the row count is padded to a power of two (rows past the batch, which change nothing) and
  the width to a power of two (at least the sampler's smallest prompt bucket, at most the
  capacity), so that few shapes compile. `media`: the contexts' media in the per-row layout
  (first axis len(contexts)), padded with empty rows like the sampler's fillers. Used by the
  batcher and the serving engine."""
  k = round_pow2(len(slots), 1)
  longest = max(map(len, contexts))
  width = min(round_pow2(longest, sampler.min_prompt_bucket), capacity)

  def column(values: Sequence[Any] | None, fill: Any, dtype: Any, shape: tuple = ()) -> Any:
    out = np.full((k,) + shape, fill, dtype)
    if values is not None:
      out[:len(slots)] = values
    return jnp.asarray(out)

  ids = np.full((k, width), sampler.pad_id, np.int32)
  mask = np.zeros((k, width), np.int32)
  for i, context in enumerate(contexts):
    ids[i, :len(context)] = context
    mask[i, :len(context)] = 1
  settings = {} if temperature is None else {
      "temperature": column(temperature, 1.0, np.float32),
      "top_p": column(top_p, 1.0, np.float32)}
  return sampler.refill(
      params, state, column(slots, state.done.shape[0], np.int32), jnp.asarray(ids),
      jnp.asarray(mask), column(limits, 1, np.int32), column(keys, 0, np.uint32, (2,)),
      generated=None if generated is None else column(generated, 0, np.int32), **settings,
      **({"media": {key: jnp.asarray(value) for key, value in
                    pad_media_rows(media, len(slots), k).items()}} if media else {}))


def _cut_turn(request: _Request, strings: Sequence[StopRule], tokenizer: Any) -> bool:
  """Cuts `request` right after the first of `strings` in its current turn (the model's text
  since the last injection; without injections its whole output, as
  `Sampler.apply_stop_strings` cuts); whether one was there."""
  turn = len(last_turn(request.tokens, request.tool_mask))
  start = len(request.tokens) - turn
  kept = stop_string_cut(tokenizer, request.tokens[start:], strings)
  if kept is None:
    return False
  drop = turn - kept
  for name in ("tokens", "logprobs", "processed", "tool_mask"):
    setattr(request, name, getattr(request, name)[:start + kept])
  request.generated -= drop
  return True


def _resume(request: _Request, result: tuple[list[int], int], capacity: int) -> bool:
  """Appends a tool turn to `request`; False (stopped for capacity) when it cannot fit."""
  ids, errors = result
  request.errors += errors
  if len(request.context) + len(ids) + (request.limit - request.generated) > capacity:
    request.reason = "capacity"
    return False
  request.calls += 1
  request.tokens += ids
  request.logprobs += [0.0] * len(ids)
  request.processed += [0.0] * len(ids)
  request.tool_mask += [1] * len(ids)
  return True

