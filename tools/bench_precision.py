r"""Rollout precision benchmark: decode time per step and the sampler-trainer log-prob gap of
float32, bfloat16 and int8 (weight-only) rollouts (sampling/precision.py, rollout.dtype).

  python tools/bench_precision.py [--preset=bench56m --batch=8 --new_tokens=128 --prompt=64]

Each precision samples `batch` completions of the same random prompts (temperature 1, same
key) with the rollout model built from the same float32 params; the decode loop alone is
timed (prefill excluded; best of `repeats` after a compiling run, the precisions taking
turns so that load on a shared machine hits all of them), per decode step. The gap
is |sampler log p - trainer log p| of every generated token, the trainer being the float32
model scoring the whole sequence (models/scoring.py, what the RL learner re-scores with);
float32's own row is the sampler/trainer numerics difference alone; "mean log p" (the
trainer's, of the sampled tokens) says how peaked the policy is. `weight_scale`
multiplies every weight matrix (norms untouched): at 1 the model is a random init whose
logits are near-uniform, which understates the gap a trained, peaked policy shows, so a
sharper model is worth a second run (e.g. --weight_scale=3). Prints lscpu's model name: the
figures differ by machine: on a CPU with fast bfloat16 dots (AMX) the bfloat16 decode
is ~2.4x faster than float32, elsewhere about level; int8 multiplies its codes in the
trainer's float32 compute dtype (about float32's speed on CPU). Decoding on accelerators
is bandwidth-bound and gains from smaller weights.
"""

from __future__ import annotations

import time

from absl import app, flags
from machine import cpu_model

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows decoded at once.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per precision (the best is kept).")
_SCALE = flags.DEFINE_float("weight_scale", 1.0, "Factor on every weight matrix.")
_DTYPES = flags.DEFINE_list("dtypes", ["", "bfloat16", "int8"], "Rollout dtypes ('': float32).")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from wakea_jax.models import scoring
  from wakea_jax.models.config import get_preset
  from wakea_jax.models.transformer import create_model
  from wakea_jax.sampling import Sampler
  from wakea_jax.sampling.precision import rollout_model_for

  cfg = get_preset(_PRESET.value)
  batch, new, width = _BATCH.value, _NEW.value, _PROMPT.value
  model = create_model(cfg)
  if _SCALE.value != 1.0:
    flat = [(p, v.replace(v.get_value() * _SCALE.value if v.get_value().ndim > 1
                          else v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nnx.update(model, nnx.from_flat_state(flat))
  graphdef, params = nnx.split(model)
  prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (batch, width)).tolist()
  print(f"machine: {cpu_model()}, {jax.device_count()} device(s), {jax.default_backend()}")
  print(f"model {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params ({cfg.dtype}), weight "
        f"scale {_SCALE.value:g}; batch {batch}, prompt {width}, {new} new tokens, "
        "temperature 1")

  @jax.jit
  def trainer_logprobs(params, ids):
    m = nnx.merge(graphdef, params)
    return scoring.score_tokens(m, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}).logprobs

  runs = {}
  for dtype in _DTYPES.value:
    rollout = rollout_model_for(graphdef, params, dtype)
    jax.block_until_ready(rollout.convert(params))          # compile
    start = time.perf_counter()
    rparams = jax.block_until_ready(rollout.convert(params))
    runs[dtype] = dict(convert_ms=1e3 * (time.perf_counter() - start), params=rparams,
                       sampler=Sampler(rollout.graphdef, rollout.config, temperature=1.0),
                       best=float("inf"))

  def decode(run):
    state = run["sampler"].start(run["params"], prompts, max_new_tokens=new,
                                 rng=jax.random.key(0))
    jax.block_until_ready(state.logits)
    start = time.perf_counter()
    state = run["sampler"].decode(run["params"], state, jnp.asarray(new, jnp.int32))
    jax.block_until_ready(state.tokens)
    return state, time.perf_counter() - start

  # Round-robin over the precisions, so that a load change on a shared machine hits all.
  for repeat in range(_REPEATS.value + 1):                  # round 0 compiles
    for run in runs.values():
      run["state"], seconds = decode(run)
      run["best"] = min(run["best"], seconds) if repeat else run["best"]
  print(f"{'rollout':9s} {'decode ms/step':>14s} {'vs float32':>10s} {'convert ms':>10s} "
        f"{'weights MiB':>11s} {'gap mean':>9s} {'gap max':>9s} {'mean log p':>10s}")
  base = None
  for dtype, run in runs.items():
    state = run["state"]
    steps = int(state.step)
    assert steps == new and int(np.asarray(state.num_generated).min()) == new, steps
    ms = 1e3 * run["best"] / steps
    base = base or ms
    tokens = np.asarray(state.tokens)[:, :new]
    ids = jnp.asarray(np.concatenate([np.asarray(prompts), tokens], axis=1), jnp.int32)
    ref = np.asarray(trainer_logprobs(params, ids))[:, width - 1:]
    gap = np.abs(ref - np.asarray(state.logprobs)[:, :new])
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run["params"])) / 2**20
    print(f"{dtype or 'float32':9s} {ms:14.2f} {ms / base:9.2f}x {run['convert_ms']:10.1f} "
          f"{weights:11.1f} {gap.mean():9.2e} {gap.max():9.2e} {ref.mean():10.2f}")

if __name__ == "__main__":
  app.run(main)
