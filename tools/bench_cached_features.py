r"""Step time of LLaVA stage 1 with and without cached encoder features (media.cache_features).

  python tools/bench_cached_features.py [--records=64 --steps=40 --log_every=10 --batch=16]

Writes `--records` generated 32x32 image records (a coloured square, "What colour is it?")
and runs `configs/multimodal.py:projector` (from scratch: the tower and the decoder are frozen,
the projector trains) twice in fresh workdirs, `cache_features` False then True, the same
data, seed and steps. Printed per run: the mean seconds per step over the logged intervals
after the first (which holds compilation), the whole run's wall seconds (cache build,
compilation and checkpoints included) and the last loss, which must agree; then the
cached/uncached step-time ratio. The uncached run is the same-run reference.

Measured 2026-12-01 on the project's CPU machine (lscpu "AMD EPYC", 2 cores, shared with
another engineer's jobs, so times are noisy), `--steps=30`, the rest default:

   cache_features   step s   wall s  last loss
            False    0.172     28.9    6.53074
             True    0.135     20.4    6.53074
  step time cached / uncached: 0.79

The saving is the tower's forward pass and the PNG decoding of every step (the cached run
decodes each image once, while building the cache, which its wall time includes); the
`projector` variant's tower is small (2 layers, 16 tokens per image) beside its decoder, so a
real CLIP / SigLIP tower saves more.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import numpy as np
from absl import app, flags
from machine import cpu_model
from PIL import Image

from wakea_jax.config_files import get_config
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.trainers import run

_RECORDS = flags.DEFINE_integer("records", 64, "Generated image records.")
_STEPS = flags.DEFINE_integer("steps", 40, "Train steps per run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Steps per timed interval.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch size.")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _write_records(directory: pathlib.Path, n: int) -> pathlib.Path:
  rng = np.random.default_rng(0)
  (directory / "images").mkdir(parents=True)
  lines = []
  for i in range(n):
    name = list(COLOURS)[i % 3]
    pixels = np.zeros((32, 32, 3), np.uint8)
    x, y = rng.integers(0, 16, 2)
    pixels[y:y + 16, x:x + 16] = COLOURS[name]
    Image.fromarray(pixels).save(directory / "images" / f"{i}.png")
    lines.append(json.dumps({"messages": [
        {"role": "user", "content": "<image>What colour is it?"},
        {"role": "assistant", "content": name}], "images": [f"images/{i}.png"]}))
  path = directory / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def _run(data: pathlib.Path, workdir: pathlib.Path, cache: bool) -> dict[str, float]:
  config = get_config("multimodal:projector")
  config.data.sources = str(data)
  config.data.batch_size = _BATCH.value
  config.media.cache_features = cache
  config.export.enabled = False
  config.train.update(steps=_STEPS.value, log_every=_LOG_EVERY.value, eval_every=_STEPS.value,
                      checkpoint_every=_STEPS.value)
  start = time.perf_counter()
  last = run(config, workdir)
  wall = time.perf_counter() - start
  rates = [r["steps_per_s"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")
           if "steps_per_s" in r][1:]
  return {"step_s": float(np.mean([1.0 / r for r in rates])), "wall_s": wall,
          "loss": float(last["loss"])}


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    tmp_path = pathlib.Path(tmp)
    data = _write_records(tmp_path / "data", _RECORDS.value)
    results = {cache: _run(data, tmp_path / f"cache_{cache}", cache) for cache in (False, True)}
  print(f"machine: {cpu_model()}")
  print(f"configs/multimodal.py:projector, {_RECORDS.value} records, batch {_BATCH.value}, "
        f"{_STEPS.value} steps")
  print(f"{'cache_features':>15} {'step s':>8} {'wall s':>8} {'last loss':>10}")
  for cache, r in results.items():
    print(f"{str(cache):>15} {r['step_s']:8.3f} {r['wall_s']:8.1f} {r['loss']:10.5f}")
  print(f"step time cached / uncached: {results[True]['step_s'] / results[False]['step_s']:.2f}")


if __name__ == "__main__":
  app.run(main)
