r"""Rollout benchmark: continuous vs static batching on completions of widely varying length.

  python tools/bench_rollout.py [--preset=bench56m --requests=64 --slots=8 --prompt=64]

The workload is an RL rollout's: `requests` completions whose lengths vary widely, here set
by per-request `max_new_tokens` (a random-init model rarely emits a stop id, so its lengths
are dictated): 3 in 4 short (8..64 tokens), 1 in 4 long (128..256), shuffled, fixed seed.
Static batching (`Sampler.generate`, the reference, measured in the same run) runs the
requests in batches of `slots`, each until its longest row is done; continuous batching
(`ContinuousBatcher`) keeps `slots` rows busy, each taking the next request when its own
finishes. Both sample the same tokens (per-request keys); the figure is generated tokens/s.
Prints lscpu's model name: CPU figures differ by machine.
"""

from __future__ import annotations

import heapq
import time

from absl import app, flags
from machine import cpu_model

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Completions to generate (8 prompts x 8).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Rows decoded at once (both ways).")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt length.")
_SHORT = flags.DEFINE_list("short", ["8", "64"], "Range of the short completions' lengths.")
_LONG = flags.DEFINE_list("long", ["128", "256"], "Range of the long completions' lengths.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Top-k.")
_LAYOUT = flags.DEFINE_enum("weight_layout", "auto",
                            ["auto", "packed", "fused", "head", "stored"],
                            "Sampler(weight_layout=): the decode loop's weight layout.")


def workload(n: int, short: tuple[int, int], long: tuple[int, int]) -> list[int]:
  """Per-request lengths: 3 in 4 short, 1 in 4 long, in a fixed shuffled order."""
  import numpy as np
  rng = np.random.default_rng(0)
  lengths = [int(rng.integers(*long, endpoint=True)) if i % 4 == 3
             else int(rng.integers(*short, endpoint=True)) for i in range(n)]
  return [lengths[i] for i in rng.permutation(n)]


def main(argv):
  del argv
  import jax
  import numpy as np
  from flax import nnx

  from wakea_jax.models.config import get_preset
  from wakea_jax.models.transformer import create_model
  from wakea_jax.sampling import ContinuousBatcher, Sampler

  cfg = get_preset(_PRESET.value)
  n, slots = _REQUESTS.value, _SLOTS.value
  limits = workload(n, tuple(map(int, _SHORT.value)), tuple(map(int, _LONG.value)))
  prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (n, _PROMPT.value)).tolist()
  graphdef, params = nnx.split(create_model(cfg))
  sampler = Sampler(graphdef, cfg, temperature=1.0, top_k=_TOP_K.value,
                    weight_layout=_LAYOUT.value)
  batcher = ContinuousBatcher(sampler, slots=slots)
  print(f"machine: {cpu_model()}, {jax.device_count()} device(s)")
  print(f"model {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params; {n} requests, prompt "
        f"{_PROMPT.value}, lengths {min(limits)}..{max(limits)} (mean {np.mean(limits):.0f}, "
        f"{sum(limits)} tokens), {slots} rows at a time, top-k {_TOP_K.value}, "
        f"weight layout {_LAYOUT.value} ({sampler.layout})")

  def static(rng):
    out = []
    for start in range(0, n, slots):
      out += sampler.generate(params, prompts[start:start + slots],
                              max_new_tokens=limits[start:start + slots],
                              rng=jax.random.fold_in(rng, start)).tokens
    return out

  def continuous(rng):
    return batcher.generate(params, prompts, max_new_tokens=limits, rng=rng).tokens

  results = {}
  for name, fn in (("static", static), ("continuous", continuous)):
    start = time.perf_counter()
    fn(jax.random.key(0))            # compile (every bucket this workload touches)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens = fn(jax.random.key(1))
    seconds = time.perf_counter() - start
    assert [len(t) for t in tokens] == limits
    results[name] = seconds
    print(f"{name:10s}: {seconds:6.2f} s, {sum(limits) / seconds:7.0f} generated tokens/s "
          f"(first run with compilation {compile_s:.1f} s)")
  # Static steps: every batch runs to its longest row. Continuous: the makespan of handing
  # requests in order to the first free slot (lengths are not known in advance, so no
  # longest-first ordering); at least total / slots.
  static_steps = sum(max(limits[i:i + slots]) for i in range(0, n, slots))
  free_at = [0] * min(slots, n)
  for length in limits:
    heapq.heappush(free_at, heapq.heappop(free_at) + length)
  print(f"decode steps: static {static_steps}, continuous {max(free_at)} "
        f"(>= {-(-sum(limits) // slots)}); ratio of steps {static_steps / max(free_at):.2f}x")
  print(f"continuous / static tokens/s: {results['static'] / results['continuous']:.2f}x")


if __name__ == "__main__":
  app.run(main)
