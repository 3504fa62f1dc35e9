r"""Serving load test: many concurrent `openai` clients against `python -m wakea_jax.serve`.

  python tools/bench_serve.py [--preset=bench56m --clients=50 --requests=400 --max_tokens=32]
  python tools/bench_serve.py --checkpoint=DIR        # a model you have instead of a random one

Starts the serve binary on a free loopback port (a random-init model of --preset saved to a
temporary directory, unless --checkpoint), then --clients concurrent clients send
--requests chat completions in all (varied prompts and max_tokens), and prints errors,
p50/p95/max latency, time to first token (streamed requests: every fourth), and generated
tokens/s over the whole run. The reference, measured in the same run: the same prompts
through the `sample` binary's code path (`wakea_jax.sample.run`: one static batch, no
server), its generated tokens/s, and the ratio. Exit status 1 if any request failed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset for the random model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Serve this model directory instead.")
_CLIENTS = flags.DEFINE_integer("clients", 50, "Concurrent clients.")
_REQUESTS = flags.DEFINE_integer("requests", 400, "Requests in all.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Largest max_tokens of a request.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Engine slots.")
_NO_REFERENCE = flags.DEFINE_bool("no_reference", False, "Skip the sample-binary reference.")


def _prompts(n: int) -> list[tuple[str, int]]:
  """(prompt, max_tokens) pairs: varied lengths, so the engine sees ragged work."""
  topics = ["the sea", "prime numbers", "a red fox", "compilers", "tea", "the moon"]
  return [(f"Request {i}: write about {topics[i % len(topics)]}" + " please" * (i % 5),
           max(1, _MAX_TOKENS.value - (i * 7) % max(_MAX_TOKENS.value // 2, 1)))
          for i in range(n)]


async def _load(url: str, work: list[tuple[str, int]], clients: int) -> dict:
  import openai
  client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                              timeout=600)
  queue: asyncio.Queue = asyncio.Queue()
  for i, item in enumerate(work):
    queue.put_nowait((i, item))
  latencies, ttfts, errors, tokens = [], [], [], 0

  async def worker():
    nonlocal tokens
    while not queue.empty():
      i, (prompt, max_tokens) = queue.get_nowait()
      start = time.perf_counter()
      messages = [{"role": "user", "content": prompt}]
      try:
        if i % 4 == 3:
          stream = await client.chat.completions.create(
              model="bench", messages=messages, max_tokens=max_tokens, temperature=0.7,
              seed=i, stream=True, stream_options={"include_usage": True})
          first = None
          async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
              first = time.perf_counter() - start
            if chunk.usage is not None:
              tokens += chunk.usage.completion_tokens
          ttfts.append(first if first is not None else time.perf_counter() - start)
        else:
          reply = await client.chat.completions.create(
              model="bench", messages=messages, max_tokens=max_tokens, temperature=0.7,
              seed=i)
          tokens += reply.usage.completion_tokens
        latencies.append(time.perf_counter() - start)
      except Exception as e:   # noqa: BLE001 - every failure is counted and shown
        errors.append(f"request {i}: {type(e).__name__}: {e}")

  start = time.perf_counter()
  await asyncio.gather(*[worker() for _ in range(clients)])
  wall = time.perf_counter() - start
  await client.close()
  return {"latencies": latencies, "ttfts": ttfts, "errors": errors, "tokens": tokens,
          "wall": wall}


def _pct(values: list[float], q: float) -> float:
  import numpy as np
  return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str]) -> None:
  del argv
  from tools.machine import cpu_model
  print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
  tmp = tempfile.TemporaryDirectory()
  checkpoint = _CHECKPOINT.value
  if not checkpoint:
    from wakea_jax.checkpoints import export
    from wakea_jax.models import transformer
    from wakea_jax.models.config import get_preset
    checkpoint = os.path.join(tmp.name, "model")
    config = get_preset(_PRESET.value, max_seq_len=512)
    if config.vocab_size < 1024:   # room for the bundled tokenizer's 1,024 ids
      config = get_preset(_PRESET.value, max_seq_len=512, vocab_size=1024)
    export.save_model_dir(transformer.create_model(config, seed=0), checkpoint)
  work = _prompts(_REQUESTS.value)
  proc = subprocess.Popen(
      [sys.executable, "-m", "wakea_jax.serve", f"--checkpoint={checkpoint}", "--port=0",
       f"--slots={_SLOTS.value}", "--context=256", "--model_name=bench",
       f"--max_tokens_cap={max(_MAX_TOKENS.value, 1)}"],
      stdout=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    if not line.startswith("serving "):
      raise SystemExit(f"the server did not start: {line!r}")
    url = line.split()[-1]
    asyncio.run(_load(url, work[:min(8, len(work))], 8))      # warm-up: compiles
    out = asyncio.run(_load(url, work, _CLIENTS.value))
  finally:
    proc.terminate()
    proc.wait(60)
  lat, ttft = out["latencies"], out["ttfts"]
  print(f"server: {_REQUESTS.value} requests from {_CLIENTS.value} clients, "
        f"{len(out['errors'])} errors, {out['wall']:.1f} s")
  print(f"  latency p50 {_pct(lat, 50):.2f} s, p95 {_pct(lat, 95):.2f} s, "
        f"max {max(lat, default=float('nan')):.2f} s; first token (streamed) p50 "
        f"{_pct(ttft, 50):.2f} s, p95 {_pct(ttft, 95):.2f} s")
  served_rate = out["tokens"] / out["wall"]
  print(f"  generated {out['tokens']} tokens: {served_rate:.0f} tokens/s")
  for error in out["errors"][:5]:
    print("  " + error)
  if not _NO_REFERENCE.value:
    from wakea_jax import sample
    prompts = [p for p, _ in work]
    sample.run(checkpoint, prompts[:4], tools=(), max_new_tokens=_MAX_TOKENS.value)  # compile
    start = time.perf_counter()
    _, ref = sample.run(checkpoint, prompts, tools=(), temperature=0.7,
                        max_new_tokens=_MAX_TOKENS.value)
    seconds = time.perf_counter() - start
    ref_tokens = sum(len(t) for t in ref.tokens)
    print(f"reference: sample binary path, one static batch of {len(prompts)}, max_new_tokens "
          f"{_MAX_TOKENS.value}: {ref_tokens} tokens in {seconds:.1f} s = "
          f"{ref_tokens / seconds:.0f} tokens/s; server / reference = "
          f"{served_rate / (ref_tokens / seconds):.2f}x")
  tmp.cleanup()
  if out["errors"]:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
