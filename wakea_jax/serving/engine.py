"""The serving engine: continuous batching for requests that arrive at any time.

`sampling.batching.ContinuousBatcher` runs a known list of requests; a server receives them
one by one from many clients, wants their text as it is generated, and may drop them when a
client goes away. `Engine` runs the same slot machinery (`Sampler.refill` into free rows,
`Sampler.decode_until_free`, one host harvest per chunk) on a thread of its own:

    submit(request, on_event)   any thread: queued, returns a Handle (cancel())
    engine thread:              free slots take queued requests (prefill into their rows);
                                decode until a row finishes or `chunk_steps` steps;
                                each request's new text goes to its `on_event` as a Delta,
                                a finished one gets Done(finish_reason, usage)

so an asyncio server never waits on the device: its handlers submit and await events that
`on_event` hands back to their loop (`loop.call_soon_threadsafe`).

Per-request sampling. Each request has its own temperature, top-p, seed and max tokens: the
engine's Sampler runs with `per_row=True`, so these are rows of the decode state, set by
`refill`. A request's tokens are drawn with its own key (its `seed`, else a fresh one), so
the same request with the same seed gives the same completion whatever else is running.

Text. The tokens generated so far are detokenised at each harvest and the new text sent;
a trailing incomplete UTF-8 character (U+FFFD) and a tail that could be the start of a stop
string are held back until they resolve. A stop string ends the request; the text returned
stops before it (OpenAI semantics). Stop ids (end of turn, EOS) end it with reason "stop".
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from wakea_jax.sampling.batching import refill_rows
from wakea_jax.sampling.sampler import STOP_ID, DecodeState, Sampler, row_keys


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """One completion to generate from token ids. `media`: the prompt's images or audio for a
  vision- or audio-language model, in the per-row layout without the row axis
  (sampling/media_inputs.py: pixel_values [k, 3, H, W] + image_mask [k], or input_features
  + feature_attention_mask), the prompt's placeholders already expanded."""
  prompt: Sequence[int]
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int | None = None
  logprobs: bool = False
  media: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Delta:
  """New output of a request: text (may be empty while held back), its tokens, log-probs."""
  text: str
  token_ids: list[int]
  logprobs: list[float]


@dataclasses.dataclass(frozen=True)
class Done:
  """The end of a request: finish_reason "stop" | "length" | "cancelled" | "error"; `text` is
  the last piece not yet sent (held back until now)."""
  finish_reason: str
  text: str
  prompt_tokens: int
  completion_tokens: int
  error: str = ""


Event = Delta | Done


class EngineClosed(RuntimeError):
  """Raised by `submit` once the engine stops taking requests (draining or closed)."""


class Handle:
  """A submitted request: `cancel()` stops it at the next harvest (its slot is freed)."""

  def __init__(self, request_id: int):
    self.request_id = request_id
    self.cancelled = threading.Event()

  def cancel(self) -> None:
    """Asks the engine to stop this request (idempotent)."""
    self.cancelled.set()


@dataclasses.dataclass
class _Live:
  """A request's progress on the engine thread."""
  request: GenerationRequest
  on_event: Callable[[Event], None]
  handle: Handle
  key: np.ndarray
  tokens: list[int] = dataclasses.field(default_factory=list)
  sent: int = 0          # characters of text already sent
  stopped: bool = False  # a stop string appeared
  started: float = 0.0


class Engine:
  """Serves generation requests from one model on a background thread (module docstring).

  `capacity` is the KV cache length of every slot: a request needs prompt + max_tokens
  <= capacity (checked at submit). `slots` rows decode together; `chunk_steps` bounds the
  steps between harvests (the streaming granularity).
  """

  def __init__(self, sampler: Sampler, params: nnx.State, tokenizer: Any, *, slots: int = 8,
               chunk_steps: int = 8, capacity: int = 1024, name: str = "model"):
    if not sampler.per_row:
      raise ValueError("the engine needs a Sampler(per_row=True): each request brings its "
                       "own temperature and top_p")
    if slots < 1 or chunk_steps < 1:
      raise ValueError(f"slots and chunk_steps must be >= 1, got {slots}, {chunk_steps}")
    capacity = -(-capacity // 128) * 128
    if capacity > sampler.config.max_seq_len:
      raise ValueError(f"capacity {capacity} > the model's max_seq_len "
                       f"{sampler.config.max_seq_len}")
    # The engine decodes the same params for its whole life: pack them once.
    self.sampler, self.params = sampler.with_packed_weights(params)
    self.tokenizer = tokenizer
    self.slots, self.chunk_steps, self.capacity, self.name = slots, chunk_steps, capacity, name
    self._inbox: queue.SimpleQueue[_Live | None] = queue.SimpleQueue()
    self._ids = itertools.count()
    self._seed_base = int.from_bytes(os.urandom(4), "little")
    self._accepting = True
    self._lock = threading.Lock()
    self._idle = threading.Condition(self._lock)
    self._in_flight = 0
    self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "errors": 0,
                  "prompt_tokens": 0, "generated_tokens": 0, "active": 0, "queued": 0}
    self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
    self._thread.start()

  # ---------------------------------------------------------------------------------------
  # Any thread
  # ---------------------------------------------------------------------------------------

  def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Handle:
    """Queues `request`; its events go to `on_event` (called on the engine thread: keep it
    short and thread-safe). Raises ValueError for a request that cannot run, EngineClosed
    once the engine is draining."""
    if not request.prompt:
      raise ValueError("the prompt has no tokens")
    if request.max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
    if len(request.prompt) + request.max_tokens > self.capacity:
      raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens "
                       f"({request.max_tokens}) exceeds the context of {self.capacity} tokens")
    if not 0.0 <= request.temperature or not 0.0 < request.top_p <= 1.0:
      raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got "
                       f"{request.temperature}, {request.top_p}")
    handle = Handle(next(self._ids))
    seed = (request.seed if request.seed is not None
            else (self._seed_base + handle.request_id) % 2 ** 31)
    key = row_keys(jax.random.key(seed), 0, 1)[0]
    with self._lock:
      if not self._accepting:
        raise EngineClosed(f"engine {self.name!r} is not taking requests")
      self._in_flight += 1
      self.stats["requests"] += 1
      self.stats["queued"] += 1
    self._inbox.put(_Live(request, on_event, handle, key, started=time.perf_counter()))
    return handle

  def drain(self, timeout: float | None = None) -> bool:
    """Stops taking requests and waits until those in flight are done; whether they are."""
    with self._lock:
      self._accepting = False
      return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

  def close(self, timeout: float | None = 30.0) -> None:
    """Drains, then stops the engine thread."""
    self.drain(timeout)
    self._inbox.put(None)
    self._thread.join(timeout)

  def snapshot(self) -> dict[str, int]:
    """A consistent copy of the engine's counters (requests, tokens, queue, active)."""
    with self._lock:
      return dict(self.stats)

  @property
  def in_flight(self) -> int:
    """Requests submitted and not yet done."""
    return self._in_flight

  # ---------------------------------------------------------------------------------------
  # Engine thread
  # ---------------------------------------------------------------------------------------

  def _finish(self, live: _Live, reason: str, error: str = "") -> None:
    text = self._text(live, final=True) if reason in ("stop", "length") else ""
    try:
      live.on_event(Done(reason, text, len(live.request.prompt), len(live.tokens), error))
    except Exception:   # a broken callback must not stop the engine
      logging.exception("engine %s: on_event failed", self.name)
    with self._lock:
      self._in_flight -= 1
      key = {"stop": "completed", "length": "completed", "cancelled": "cancelled"}.get(
          reason, "errors")
      self.stats[key] += 1
      self.stats["generated_tokens"] += len(live.tokens)
      self.stats["prompt_tokens"] += len(live.request.prompt)
      if self._in_flight == 0:
        self._idle.notify_all()

  def _text(self, live: _Live, *, final: bool) -> str:
    """The new text of `live` since the last call, holding back what may still change;
    sets `live.stopped` when a stop string appears (the text is cut before it)."""
    tokens = live.tokens
    if tokens and tokens[-1] in self.sampler.stop_ids:
      tokens = tokens[:-1]
    text = self.tokenizer.decode(tokens)
    stops = live.request.stop
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
      text, final = text[:cut], True
      live.stopped = True
    if not final:
      hold = max((len(s) - 1 for s in stops), default=0)
      end = len(text) - hold
      while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
      text = text[:max(end, live.sent)]
    new = text[live.sent:]
    live.sent = len(text)
    return new

  def _loop(self) -> None:
    sampler = self.sampler
    state = sampler.idle_state(self.slots, self.chunk_steps, self.capacity)
    owner: list[_Live | None] = [None] * self.slots
    counts = np.zeros(self.slots, np.int64)
    waiting: collections.deque[_Live] = collections.deque()
    closing = False
    while True:
      # Take what has arrived; block only when there is nothing to decode.
      idle = all(o is None for o in owner) and not waiting
      while True:
        try:
          live = self._inbox.get(block=idle and not closing)
        except queue.Empty:
          break
        if live is None:
          closing = True
        else:
          waiting.append(live)
        idle = False
      if closing and all(o is None for o in owner) and not waiting:
        return
      for live in [w for w in waiting if w.handle.cancelled.is_set()]:
        waiting.remove(live)
        self._dequeued(1)
        self._finish(live, "cancelled")
      free = [i for i, o in enumerate(owner) if o is None]
      if free and waiting:
        start = [(slot, waiting.popleft()) for slot in free[:len(waiting)]]
        self._dequeued(len(start))
        try:
          state = self._refill(state, start)
        except Exception as e:   # e.g. out of memory: fail these requests, keep serving
          logging.exception("engine %s: prefill failed", self.name)
          for _, live in start:
            self._finish(live, "error", f"{type(e).__name__}: {e}")
          continue
        for slot, live in start:
          owner[slot] = live
          counts[slot] = 0
      active = [i for i, o in enumerate(owner) if o is not None]
      if not active:
        continue
      self._set_active(len(active))
      state = sampler.decode_until_free(self.params, state,
                                        jnp.asarray(self.chunk_steps, jnp.int32))
      host = jax.device_get({"tokens": state.tokens, "logprobs": state.logprobs,
                             "done": state.done, "counts": state.num_generated,
                             "codes": state.stop_code})
      stop_rows = []
      for slot in active:
        live = owner[slot]
        d = int(host["counts"][slot] - counts[slot])
        counts[slot] = host["counts"][slot]
        new_tokens = host["tokens"][slot, :d].tolist()
        live.tokens += new_tokens
        text = self._text(live, final=bool(host["done"][slot]))
        cancelled = live.handle.cancelled.is_set()
        if new_tokens and not cancelled:
          self._emit(live, Delta(text, new_tokens, host["logprobs"][slot, :d].tolist()))
        if live.stopped or cancelled or host["done"][slot]:
          if not host["done"][slot]:
            stop_rows.append(slot)
          reason = ("cancelled" if cancelled else "stop" if live.stopped
                    or host["codes"][slot] == STOP_ID else "length")
          owner[slot] = None
          self._finish(live, reason)
      if stop_rows:
        state = state.replace(done=state.done.at[np.asarray(stop_rows)].set(True))
      state = state.replace(step=jnp.zeros((), jnp.int32))
      self._set_active(sum(o is not None for o in owner))

  def _emit(self, live: _Live, event: Event) -> None:
    try:
      live.on_event(event)
    except Exception:
      logging.exception("engine %s: on_event failed; cancelling request %d", self.name,
                        live.handle.request_id)
      live.handle.cancel()

  def _dequeued(self, n: int) -> None:
    with self._lock:
      self.stats["queued"] -= n

  def _set_active(self, n: int) -> None:
    with self._lock:
      self.stats["active"] = n

  def _refill(self, state: DecodeState, start: list[tuple[int, _Live]]) -> DecodeState:
    """Prefills the prompts of `start` into their slots, with their own settings (and media:
    requests without any, in a batch with some, get empty rows)."""
    requests = [live.request for _, live in start]
    return refill_rows(self.sampler, self.params, state, [slot for slot, _ in start],
                       [r.prompt for r in requests], [r.max_tokens for r in requests],
                       [live.key for _, live in start], self.capacity,
                       temperature=[r.temperature for r in requests],
                       top_p=[r.top_p for r in requests],
                       media=stack_media([r.media for r in requests]))


def stack_media(media: Sequence[Mapping[str, np.ndarray] | None]
                ) -> dict[str, np.ndarray] | None:
  """Requests' media (each without the row axis, or None) -> the per-row layout [rows, items,
  ...], items padded with zeros (masked out) to a power of two so that few prefill shapes
  compile; None when no request has media."""
  given = [m for m in media if m]
  if not given:
    return None
  items = max(1, max(len(next(iter(m.values()))) for m in given))
  items = 1 << (items - 1).bit_length()
  out = {}
  for key, first in given[0].items():
    rows = np.zeros((len(media), items) + first.shape[1:], first.dtype)
    for i, m in enumerate(media):
      if m:
        rows[i, :len(m[key])] = m[key]
    out[key] = rows
  return out


def generate_text(engine: Engine, request: GenerationRequest, timeout: float | None = None
                  ) -> tuple[str, Done]:
  """Runs one request to the end on the calling thread -> (text, Done). For tests, warm-up
  and health checks."""
  events: queue.SimpleQueue[Event] = queue.SimpleQueue()
  engine.submit(request, events.put)
  parts = []
  while True:
    event = events.get(timeout=timeout)
    parts.append(event.text)
    if isinstance(event, Done):
      return "".join(parts), event
