r"""Train-step benchmark: bench56m, full-parameter AdamW, batch 8 x 512, float32.

  python tools/bench_train.py [--batch=8 --seq=512 --steps=5 --preset=bench56m --no_torch]
  python tools/bench_train.py --dtype=bfloat16

Prints tokens/s, TFLOP/s and MFU against the matmul rate measured in the same run, and,
when torch and transformers are installed, the same step of transformers'
LlamaForCausalLM on PyTorch with AdamW, and the ratio. `--dtype=bfloat16` is mixed
precision on both sides: float32 master weights and optimizer, bfloat16 compute
(`model.dtype`; `torch.autocast("cpu", torch.bfloat16)` around PyTorch's forward pass), and
MFU against the bfloat16 (float32-accumulating) matmul rate.
"""

from __future__ import annotations

import os
import time

from absl import app, flags
from machine import cpu_model

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 512, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the PyTorch reference.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (weights and optimizer stay float32).")


def matmul_rate(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """Measured matmul FLOP/s of this device (XLA, jitted, n x n @ n x n; in bfloat16 with
  float32 accumulation, as the model's dots)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def bench_jax(preset: str, batch: int, seq: int, steps: int, remat: str,
              dtype: str = "float32") -> float:
  import jax
  import numpy as np

  from wakea_jax.models import transformer
  from wakea_jax.models.config import get_preset
  from wakea_jax.train import optimizer as opt_lib
  from wakea_jax.train import state as state_lib
  from wakea_jax.train import step as step_lib

  cfg = get_preset(preset, remat_policy=remat, max_seq_len=max(seq, 512), dtype=dtype)
  model = transformer.create_model(cfg, seed=0)
  optimizer = opt_lib.make_optimizer(opt_lib.OptimizerConfig(warmup_steps=0), 1000)
  graphdef, state = state_lib.create_train_state(model, optimizer)
  del model
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer), donate_argnums=0)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  batch_arrays = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                  "loss_mask": np.ones((batch, seq), np.float32)}
  batch_arrays = jax.device_put(batch_arrays)
  start = time.perf_counter()
  state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  print(f"jax: compile + first step {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch_arrays)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def bench_torch(preset: str, batch: int, seq: int, steps: int,
                dtype: str = "float32") -> float | None:
  try:
    import torch
    import transformers
  except ImportError:
    print("torch/transformers not installed: skipping the PyTorch reference")
    return None
  from wakea_jax.checkpoints import hf
  from wakea_jax.models.config import get_preset
  cfg = get_preset(preset)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  # The same architecture as ours, through the exporter's own config mapping.
  hf_values = hf.config_to_hf(cfg.replace(max_seq_len=max(seq, 512)), "LlamaForCausalLM")
  hf_config = transformers.LlamaConfig(**hf_values, attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_config).float().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
  ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  start = time.perf_counter()
  one_step()
  print(f"torch: first step {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  for _ in range(steps):
    one_step()
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  import jax

  from wakea_jax.models.config import get_preset
  from wakea_jax.train import flops

  cfg = get_preset(_PRESET.value)
  tokens = _BATCH.value * _SEQ.value
  flop_per_step = flops.train_flops_per_token(cfg, _SEQ.value) * tokens
  peak = matmul_rate(dtype=_DTYPE.value)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({cpu_model()}), "
        f"measured {_DTYPE.value} matmul rate {peak / 1e12:.3f} TFLOP/s")
  print(f"model {_PRESET.value}: {cfg.num_params() / 1e6:.1f}M params, batch {_BATCH.value} x "
        f"{_SEQ.value}, {flop_per_step / 1e12:.2f} TFLOP per step (analytic), {_DTYPE.value}")
  jax_s = bench_jax(_PRESET.value, _BATCH.value, _SEQ.value, _STEPS.value, _REMAT.value,
                    _DTYPE.value)
  print(f"wakea_jax: {jax_s:.3f} s/step, {tokens / jax_s:,.0f} tokens/s, "
        f"{flop_per_step / jax_s / 1e12:.3f} TFLOP/s, "
        f"{100 * flop_per_step / jax_s / peak:.1f}% of measured matmul rate")
  if not _NO_TORCH.value:
    torch_s = bench_torch(_PRESET.value, _BATCH.value, _SEQ.value, _STEPS.value, _DTYPE.value)
    if torch_s:
      print(f"pytorch transformers: {torch_s:.3f} s/step, {tokens / torch_s:,.0f} tokens/s, "
            f"{flop_per_step / torch_s / 1e12:.3f} TFLOP/s")
      print(f"ratio wakea_jax / pytorch tokens/s: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
