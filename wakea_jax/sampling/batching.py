"""Continuous batching: a fixed set of slots over one KV cache, each slot taking the next
waiting request as soon as its own finishes.

Static batching (`Sampler.generate`) decodes a batch until its longest row is done, so with
completions of very different lengths most rows sit finished while the longest one goes on.
`ContinuousBatcher.generate` keeps `slots` rows busy instead:

    queue = every request, in order
    fill the free slots from the queue       Sampler.refill: prefill into those rows only
    loop:
      decode until a row finishes            Sampler.decode_until_free (at most chunk steps)
      harvest every row's new tokens         host, one transfer per chunk
      finished rows -> their request's output; their slots take the next requests

A request's draws use its own key, fold_in(rng, request index), folded with its generated
count at every token (`Sampler`'s per-row keys): its tokens and log-probs do not depend on
which slot or batch it ran in, and equal what `Sampler.generate` gives the same request as
row `index` of one static batch (to float rounding: greedy tokens identical, log-probs within
1e-5; tested).

Stop ids and per-request `max_new_tokens` end a request on device. Not here (yet): stop
strings, tool pauses (the tool loop keeps its static batch) and several processes (each
process would need the same refill decisions); those raise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wakea_jax.sampling.sampler import STOP_ID, SampleOutput, Sampler, row_keys


@dataclasses.dataclass(frozen=True)
class ContinuousBatcher:
  """Runs many requests through `slots` rows of one cache (see the module docstring).

  `chunk_steps` bounds the decode steps between host looks (a row that finishes returns
  control at once; the bound only matters for how long the host waits between harvests).
  """

  sampler: Sampler
  slots: int = 8
  chunk_steps: int = 32

  def __post_init__(self) -> None:
    if self.slots < 1:
      raise ValueError(f"slots must be >= 1, got {self.slots}")
    if self.chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {self.chunk_steps}")

  def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int | Sequence[int], rng: jax.Array) -> SampleOutput:
    """Completions of every prompt, in request order, as `Sampler.generate` returns them."""
    if jax.process_count() > 1:
      raise ValueError("continuous batching runs on one process; on several, use static "
                       "batching (Sampler.generate)")
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    n = len(prompts)
    limits = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (n,)).copy()
    if limits.min() < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampler = self.sampler
    slots = min(self.slots, n)
    slots += -slots % sampler.batch_multiple()      # the mesh's batch shards divide it
    width, _, capacity = sampler.buckets(max(map(len, prompts)), int(limits.max()))
    if capacity > sampler.config.max_seq_len:
      raise ValueError(f"prompt ({max(map(len, prompts))}) + max_new_tokens ({limits.max()}) "
                       f"needs a cache of {capacity} > max_seq_len {sampler.config.max_seq_len}")
    keys = row_keys(rng, 0, n)
    chunk = min(self.chunk_steps, int(limits.max()))
    state = sampler.idle_state(slots, chunk, capacity)

    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    processed: list[list[float]] = [[] for _ in range(n)]
    reasons = [""] * n
    owner = np.full(slots, -1)          # the request each slot runs, -1: free
    waiting = 0                         # the next request to start
    counts = np.zeros(slots, np.int64)
    while True:
      free = np.nonzero(owner < 0)[0]
      if len(free) and waiting < n:
        start = free[:n - waiting]
        state = self._refill(params, state, start, range(waiting, waiting + len(start)),
                             prompts, limits, keys, width)
        owner[start] = np.arange(waiting, waiting + len(start))
        counts[start] = 0
        waiting += len(start)
      if not (owner >= 0).any():
        break
      state = sampler.decode_until_free(params, state, jnp.asarray(chunk, jnp.int32))
      host = jax.device_get({"tokens": state.tokens, "logprobs": state.logprobs,
                             "processed": state.processed_logprobs, "done": state.done,
                             "counts": state.num_generated, "codes": state.stop_code})
      for slot in np.nonzero(owner >= 0)[0]:
        request = owner[slot]
        d = int(host["counts"][slot] - counts[slot])   # columns 0..d-1 of this chunk
        tokens[request] += host["tokens"][slot, :d].tolist()
        logprobs[request] += host["logprobs"][slot, :d].tolist()
        processed[request] += host["processed"][slot, :d].tolist()
        counts[slot] = host["counts"][slot]
        if host["done"][slot]:
          reasons[request] = "stop_id" if host["codes"][slot] == STOP_ID else "length"
          owner[slot] = -1
      state = state.replace(step=jnp.zeros((), jnp.int32))
    return SampleOutput(
        tokens=tokens, logprobs=[np.asarray(x, np.float32) for x in logprobs],
        processed_logprobs=[np.asarray(x, np.float32) for x in processed],
        lengths=[len(t) for t in tokens], stop_reason=reasons)

  def _refill(self, params: nnx.State, state, slots: np.ndarray, requests: range,
              prompts: Sequence[Sequence[int]], limits: np.ndarray, keys: np.ndarray,
              width: int):
    """Prefills `requests` into `slots`; the row count is padded to a power of two (rows
    past the batch, which change nothing) so that few shapes compile."""
    k = 1 << max(0, len(slots) - 1).bit_length()
    batch = state.done.shape[0]
    rows = np.full(k, batch, np.int32)
    rows[:len(slots)] = slots
    ids = np.full((k, width), self.sampler.pad_id, np.int32)
    mask = np.zeros((k, width), np.int32)
    row_limits = np.ones(k, np.int32)
    row_keys_ = np.zeros((k, 2), np.uint32)
    for i, request in enumerate(requests):
      prompt = prompts[request]
      ids[i, :len(prompt)] = prompt
      mask[i, :len(prompt)] = 1
      row_limits[i] = limits[request]
      row_keys_[i] = keys[request]
    return self.sampler.refill(params, state, jnp.asarray(rows), jnp.asarray(ids),
                               jnp.asarray(mask), jnp.asarray(row_limits),
                               jnp.asarray(row_keys_))
