r"""Sampling benchmark: bench56m, batch 8, prompt 128, 128 new tokens, top-k 50, float32.

  python tools/bench_sample.py [--batch=8 --prompt=128 --new=128 --top_k=50 --no_torch
                                --tensor_parallel=2 --dtype=bfloat16
                                --top_k=0 --top_p=0.95 --temperature=0.02]

Prints prefill time, per-step decode time and generated tokens/s of `wakea_jax.sampling`,
a memory-bandwidth bound per decode step (bytes of parameters + KV cache read per step over
a memcpy bandwidth measured in the same run), and, when torch and transformers are
installed, `transformers` `generate` on the same shapes (LlamaForCausalLM, random init,
do_sample with top_k, exactly `new` tokens) with the ratio. `--dtype` decodes with the
rollout model of that precision (`rollout.dtype`, sampling/precision.py: bfloat16 weights,
compute and KV cache, or int8 weight-only); the bound then counts its bytes, and the
transformers reference runs in the same dtype for bfloat16 (`model.to(torch.bfloat16)`),
in float32 for int8.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
from machine import cpu_model, memcpy_bandwidth

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_PROMPT = flags.DEFINE_integer("prompt", 128, "Prompt length.")
_NEW = flags.DEFINE_integer("new", 128, "New tokens per sequence.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Top-k (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (nucleus; 1: off), on both sides.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "Sampling temperature on both sides. The random-init model's logits "
    "are nearly flat, so its nucleus at top-p 0.95 is most of the vocabulary; a low "
    "temperature (0.02) makes the distribution as peaked as a trained model's.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the transformers reference.")
_TENSOR = flags.DEFINE_integer(
    "tensor_parallel", 1, "Split the model over this many host devices on a (1, 1, N) mesh "
    "(XLA:CPU runs a device's small-batch matmuls on one core: N = cores uses them all).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "int8"],
                           "Decode precision (rollout.dtype; float32: the model as is).")
_LAYOUT = flags.DEFINE_enum(
    "weight_layout", "auto", ["auto", "packed", "fused", "head", "stored"],
    "Sampler(weight_layout=) of the measured run. When it packs the weights, a second run "
    "with the stored layout is timed too, as the same-run reference.")


def bench_jax(batch: int, prompt: int, new: int, top_k: int,
              layout: str) -> tuple[float, float, int, str]:
  """-> (prefill seconds, decode seconds for `new` steps, bytes read per decode step,
  the weight layout the decode loop ran on: Sampler.layout)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from wakea_jax.models.config import get_preset
  from wakea_jax.models.transformer import create_model
  from wakea_jax.parallel import mesh as mesh_lib
  from wakea_jax.sampling import Sampler
  from wakea_jax.sampling.precision import rollout_model_for

  cfg = get_preset(_PRESET.value)
  graphdef, params = nnx.split(create_model(cfg))
  if _DTYPE.value != "float32":
    rollout = rollout_model_for(graphdef, params, _DTYPE.value)
    graphdef, cfg, params = rollout.graphdef, rollout.config, rollout.convert(params)
  mesh = mesh_lib.create_mesh((1, 1, _TENSOR.value)) if _TENSOR.value > 1 else None
  if mesh is not None:
    params = mesh_lib.shard_state(params, mesh)
  sampler = Sampler(graphdef, cfg, temperature=_TEMPERATURE.value, top_k=top_k,
                    top_p=_TOP_P.value, mesh=mesh,
                    weight_layout=layout)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt)).tolist()
  width, steps, capacity = sampler.buckets(prompt, new)

  def timed_run(seed: int) -> tuple[float, float, jax.Array]:
    start = time.perf_counter()
    state = sampler.start(params, prompts, max_new_tokens=new, rng=jax.random.key(seed))
    jax.block_until_ready(state)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    state = sampler.decode(params, state, jnp.asarray(steps, jnp.int32))
    jax.block_until_ready(state)
    assert int(state.num_generated.min()) == new
    return prefill_s, time.perf_counter() - start, state

  start = time.perf_counter()
  timed_run(0)
  print(f"jax ({sampler.layout} weight layout): compile + "
        f"first run {time.perf_counter() - start:.1f}s (prompt bucket {width}, cache capacity "
        f"{capacity})")
  prefill_s, decode_s, state = timed_run(1)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  if not cfg.tie_embeddings:
    # A decode step gathers `batch` rows of the input embedding, not the whole table.
    table = params["embed"].get_value()
    param_bytes -= table.nbytes - batch * table.shape[1] * table.dtype.itemsize
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state.cache))
  return prefill_s, decode_s, param_bytes + cache_bytes, sampler.layout


def bench_torch(batch: int, prompt: int, new: int, top_k: int) -> float | None:
  try:
    import torch
    import transformers
  except ImportError:
    print("torch/transformers not installed: skipping the transformers reference")
    return None
  from wakea_jax.checkpoints import hf
  from wakea_jax.models.config import get_preset
  cfg = get_preset(_PRESET.value)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  # The same architecture as ours, through the exporter's own config mapping.
  hf_values = hf.config_to_hf(cfg.replace(max_seq_len=max(prompt + new, 512)),
                              "LlamaForCausalLM")
  hf_config = transformers.LlamaConfig(**hf_values, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_config).float().eval()
  if _DTYPE.value == "bfloat16":
    model = model.to(torch.bfloat16)
  ids = torch.randint(1, cfg.vocab_size, (batch, prompt))

  def run(n: int) -> None:
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           top_k=top_k, top_p=_TOP_P.value, temperature=_TEMPERATURE.value,
                           min_new_tokens=n,
                           max_new_tokens=n, pad_token_id=0, eos_token_id=None)
    assert out.shape == (batch, prompt + n)

  run(2)   # warm-up
  start = time.perf_counter()
  run(new)
  return time.perf_counter() - start


def main(argv):
  del argv
  if _TENSOR.value > 1:   # before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_TENSOR.value}")
  import jax

  from wakea_jax.models.config import get_preset

  b, p, n, k = _BATCH.value, _PROMPT.value, _NEW.value, _TOP_K.value
  cfg = get_preset(_PRESET.value)
  bandwidth = memcpy_bandwidth()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({cpu_model()}), "
        f"measured memcpy bandwidth {bandwidth / 1e9:.1f} GB/s")
  print(f"model {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params, batch {b}, prompt {p}, "
        f"{n} new tokens, top-k {k}, top-p {_TOP_P.value:g}, temperature "
        f"{_TEMPERATURE.value:g}, decode in {_DTYPE.value}")
  prefill_s, decode_s, step_bytes, layout = bench_jax(b, p, n, k, _LAYOUT.value)
  step_s = decode_s / n
  bound_s = step_bytes / bandwidth
  jax_s = prefill_s + decode_s
  print(f"wakea_jax: prefill {prefill_s * 1e3:.1f} ms, decode {step_s * 1e3:.2f} ms/step, "
        f"{b * n / jax_s:,.0f} generated tokens/s ({b * n / decode_s:,.0f} in decode)")
  print(f"bandwidth bound: {step_bytes / 1e6:.1f} MB read per decode step (params + KV cache) "
        f"-> {bound_s * 1e3:.2f} ms/step; measured step is {step_s / bound_s:.1f}x the bound")
  if layout != "stored":   # the same-run reference for decode_layout's rewritten weights
    _, stored_s, _, _ = bench_jax(b, p, n, k, "stored")
    print(f"stored weight layout: decode {stored_s / n * 1e3:.2f} ms/step "
          f"({stored_s / n / bound_s:.1f}x the bound); {layout} / stored step time "
          f"{decode_s / stored_s:.2f}")
  if not _NO_TORCH.value:
    torch_s = bench_torch(b, p, n, k)
    if torch_s:
      torch_dtype = "bfloat16" if _DTYPE.value == "bfloat16" else "float32"
      print(f"transformers generate ({torch_dtype}): {torch_s:.2f} s, "
            f"{b * n / torch_s:,.0f} generated tokens/s")
      print(f"ratio wakea_jax / transformers tokens/s: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
