r"""GPU benchmark sections, run one per process by tools/bench_gpu.sh (each section gets the
whole GPU memory and its own time limit):

  python tools/bench_gpu.py --section=info
  python tools/bench_gpu.py --section=train  [--preset=llama3.2-1b --batch=8 --seq=2048 \
      --steps=5 --remat=dots --attention=cudnn --dtype=bfloat16 --peak_tflops=0]
  python tools/bench_gpu.py --section=decode [--preset=llama3.2-1b --decode_batch=64 \
      --prompt=128 --new=256 --attention=cudnn --dtype=bfloat16]

train: the real SFT train step (`train.step.make_train_step`, AdamW, float32 master weights,
bf16 compute, packed rows of 4 documents each) -> seconds per step, tokens/s and MFU =
FLOPs / step time / the GPU's peak dense bf16 FLOP/s. FLOPs per step are
`train.flops.train_flops_per_token` x tokens: 6 x (matmul weights: every weight but the
norms, the tied embedding once as the LM head) + 12 x layers x heads x head_dim x seq for
attention, counted full (non-causal), the PaLM convention (arXiv 2204.02311, app. B) the
project's MFU uses everywhere; the MFU with causal attention (half that term) is printed
beside it. The compiled step is searched for cuDNN's fused-attention custom call, and the
line says whether cuDNN attention actually ran.

parity: cuDNN's fused attention (the "xla" kernel on CPU, for --smoke) against the native
kernel of layers.py computed in float32 on the same bf16-rounded inputs, at the preset's head
shapes: packed rows (three and two documents, then padding) with the causal rule, values and
the gradients of q, k, v; and the decode form (one query over `key_value_seq_lengths`). The
XLA kernel in the same dtype is measured beside it as the yardstick of bf16 rounding; the
section fails (exit 1) where cuDNN is further off than twice that plus 1e-2 (relative to the
reference's largest value), where a padding row is not exactly 0, or where the compiled
function holds no cuDNN call.

decode: `sampling.Sampler` (temperature 1, no top-k), bf16 weights and KV cache, right-padded
prompts of `prompt` tokens, exactly `new` tokens per row -> prefill time, ms per decode step,
generated tokens/s, and the HBM bound of a step (bytes of weights + KV cache over the GPU's
memory bandwidth).

Peak FLOP/s and bandwidth come from the device name (the table below; dense bf16, no
sparsity); `--peak_tflops` / `--peak_tbps` override them, and an unknown GPU prints no MFU
unless given. On CPU (`--smoke`, via bench_gpu.sh --smoke) the sections run at toy size so
the test suite can check the script end to end.
"""

from __future__ import annotations

import functools
import os
import time

from absl import app, flags
from machine import cpu_model

_SECTION = flags.DEFINE_enum("section", "info", ["info", "parity", "train", "decode"],
                             "What to run.")
_PRESET = flags.DEFINE_string("preset", "llama3.2-1b", "Model preset (models/config.py).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype (ModelConfig.dtype).")
_ATTENTION = flags.DEFINE_string("attention", "cudnn", "ModelConfig.attention.")
_BATCH = flags.DEFINE_integer("batch", 8, "train: rows per step.")
_SEQ = flags.DEFINE_integer("seq", 2048, "train: tokens per row.")
_DOCS = flags.DEFINE_integer("docs_per_row", 4, "train: packed documents per row.")
_STEPS = flags.DEFINE_integer("steps", 5, "train: timed steps (after a warm-up step).")
_REMAT = flags.DEFINE_string("remat", "dots", "train: ModelConfig.remat_policy.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 64, "decode: rows.")
_PROMPT = flags.DEFINE_integer("prompt", 128, "decode: prompt tokens per row.")
_NEW = flags.DEFINE_integer("new", 256, "decode: new tokens per row.")
_PARITY_SEQ = flags.DEFINE_integer("parity_seq", 1024, "parity: tokens per row.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "Peak dense bf16 TFLOP/s (0: by name).")
_PEAK_TBPS = flags.DEFINE_float("peak_tbps", 0.0, "Peak HBM TB/s (0: by name).")
_MODEL = flags.DEFINE_list("model", [], "More ModelConfig overrides: field=value,...")

# Vendor datasheet figures: dense (no sparsity) bf16 tensor-core FLOP/s and HBM bandwidth.
# The first name found in the device name wins, so the more specific names come first.
PEAKS = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H200", 989e12, 4.8e12),
    ("H100", 989e12, 3.35e12),     # SXM
    ("GH200", 989e12, 4.0e12),
    ("B200", 2250e12, 8.0e12),
    ("A100", 312e12, 2.0e12),
    ("L40S", 362e12, 0.864e12),
)

CUDNN_CALL = "__cudnn$fmha"   # the custom-call target of cuDNN's fused attention


def peaks(device_kind: str) -> tuple[float, float, str]:
  """-> (peak FLOP/s, peak bytes/s, where they come from) for this device."""
  flop, bandwidth, source = 0.0, 0.0, f"unknown device {device_kind!r}"
  for name, f, b in PEAKS:
    if name.lower() in device_kind.lower():
      flop, bandwidth, source = f, b, f"datasheet figure for {name}"
      break
  if _PEAK_TFLOPS.value:
    flop, source = _PEAK_TFLOPS.value * 1e12, "--peak_tflops"
  if _PEAK_TBPS.value:
    bandwidth = _PEAK_TBPS.value * 1e12
  return flop, bandwidth, source


def has_cudnn_call(lowered, compiled) -> bool:
  """Whether cuDNN's fused attention is in a jitted function (its lowered or compiled text)."""
  return CUDNN_CALL in lowered.as_text() or CUDNN_CALL in compiled.as_text()


def model_config(**overrides):
  """The preset with --dtype, --attention and --model applied, then `overrides`."""
  from wakea_jax.models.config import get_preset

  fields = dict(dtype=_DTYPE.value, attention=_ATTENTION.value)
  for item in _MODEL.value:
    key, _, value = item.partition("=")
    fields[key] = value.lower() in ("1", "true") if value.lower() in ("true", "false") else (
        int(value) if value.lstrip("-").isdigit() else value)
  fields.update(overrides)
  return get_preset(_PRESET.value, **fields)


def attention_line(cfg) -> str:
  """Which kernel ModelConfig.attention resolves to here (raises if cuDNN cannot run)."""
  from wakea_jax.models.fused_attention import accelerator_platform, choose_implementation
  chosen = choose_implementation(cfg.attention, cfg.compute_dtype, cfg.head_dim)
  return f"attention={cfg.attention!r} -> {chosen} on {accelerator_platform()}"


def memory_line() -> str:
  """Peak device memory of this process, where the backend reports it."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" not in stats:
    return "peak device memory: not reported by this backend"
  limit = stats.get("bytes_limit", 0)
  return (f"peak device memory {stats['peak_bytes_in_use'] / 2 ** 30:.1f} GiB"
          + (f" of {limit / 2 ** 30:.1f} GiB" if limit else ""))


def section_info() -> None:
  import jax
  import jaxlib

  device = jax.devices()[0]
  print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}, "
        f"platform version {device.client.platform_version!r}")
  print(f"devices: {jax.devices()}")
  print(f"device kind: {device.device_kind} x{jax.device_count()}; host: {cpu_model()}, "
        f"{os.cpu_count()} cores")
  try:
    from jax._src.lib import cuda_versions
    cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
  except (ImportError, AttributeError, RuntimeError):   # the name moves between jax releases
    cudnn = None
  print(f"cuDNN: {cudnn if cudnn else 'not found'}")
  flop, bandwidth, source = peaks(device.device_kind)
  print(f"assumed peak: {flop / 1e12:.0f} TFLOP/s dense bf16, {bandwidth / 1e12:.2f} TB/s HBM "
        f"({source})")


def section_parity() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from wakea_jax.models import fused_attention as fa
  from wakea_jax.models import layers
  from wakea_jax.models.transformer import attention_mask_for

  cfg = model_config()
  n, kv, h, t, b = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, _PARITY_SEQ.value, 2
  impl = "cudnn" if fa.accelerator_platform() == "cuda" else "xla"
  dtype = cfg.compute_dtype
  print(f"parity: {impl} in {jnp.dtype(dtype).name} against the native kernel in float32; "
        f"{b} rows x {t} tokens, {n} heads, {kv} KV heads, head_dim {h}", flush=True)
  bounds = np.array([[0, t // 4, t // 2, t - t // 8], [0, t // 3, t - t // 4, t - t // 4]])
  segments = np.zeros((b, t), np.int32)
  for row, (a, c, d, e) in enumerate(bounds):
    segments[row, a:c], segments[row, c:d], segments[row, d:e] = 1, 2, 3
  mask = attention_mask_for(t, jnp.asarray(segments), None, b)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h)).astype(dtype)
  k = jax.random.normal(keys[1], (b, t, kv, h)).astype(dtype)
  v = jax.random.normal(keys[2], (b, t, kv, h)).astype(dtype)
  cotangent = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
  f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]

  def compare(ref, got, yard):
    """-> (max |got - ref| / max |ref|, the same for the yardstick, max |ref|, ok)."""
    ref = np.asarray(ref, np.float32)
    scale = float(np.abs(ref).max())
    err, yard_err = (float(np.abs(np.asarray(x, np.float32) - ref).max()) / scale
                     for x in (got, yard))
    return err, yard_err, scale, err <= 2 * yard_err + 1e-2 and bool(np.isfinite(got).all())

  def loss(attend, q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  def run(attend, *args):
    fn = jax.jit(jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2),
                                    has_aux=True))
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    (_, out), grads = compiled(*args)
    found = has_cudnn_call(lowered, compiled)
    return [np.asarray(x, np.float32) for x in (out, *grads)], found

  native = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, kv, causal=True)
  fused = lambda implementation: lambda q, k, v: fa.fused_attention(
      q, k, v, mask, kv, implementation=implementation, causal=True)
  reference, _ = run(native, *f32(q, k, v))
  xla, _ = run(fused("xla"), q, k, v)
  tested, found = run(fused(impl), q, k, v)
  failures = []
  if impl == "cudnn" and not found:
    failures.append(f"no {CUDNN_CALL} call in the compiled function")
  for name, ref, yard, got in zip(("out", "dq", "dk", "dv"), reference, xla, tested):
    err, yard_err, scale, ok = compare(ref, got, yard)
    print(f"  packed training form, {name}: max |{impl} - ref| / max |ref| = {err:.2e} "
          f"(xla {yard_err:.2e}; max |ref| {scale:.3g}) {'ok' if ok else 'FAIL'}")
    if not ok:
      failures.append(f"{name} off by {err:.2e}")
  padding = segments == 0
  if np.any(tested[0][padding] != 0):
    failures.append("a padding row is not exactly 0")
  print(f"  padding rows exactly 0: {bool(np.all(tested[0][padding] == 0))}; {CUDNN_CALL} in "
        f"the compiled step: {found}")

  lengths = jnp.asarray([t, t // 2 + 1], jnp.int32)
  q1 = q[:, :1]
  decode_mask = (jnp.arange(t)[None, None, :] < lengths[:, None, None])
  ref1 = layers.dot_product_attention(*f32(q1, k, v), decode_mask, kv, causal=False)
  got1 = jax.jit(lambda q, k, v: fa.fused_attention(
      q, k, v, None, kv, implementation=impl, kv_lengths=lengths))(q1, k, v)
  yard1 = fa.fused_attention(q1, k, v, None, kv, implementation="xla", kv_lengths=lengths)
  err, yard_err, _, ok = compare(ref1, got1, yard1)
  print(f"  decode form (kv lengths {t}, {t // 2 + 1}): {err:.2e} (xla {yard_err:.2e}) "
        f"{'ok' if ok else 'FAIL'}")
  if not ok:
    failures.append(f"decode form off by {err:.2e}")
  if failures:
    raise SystemExit("parity FAILED: " + "; ".join(failures))
  print("parity: ok")


def section_train() -> None:
  import jax
  import numpy as np

  from wakea_jax.models import transformer
  from wakea_jax.train import flops
  from wakea_jax.train import optimizer as opt_lib
  from wakea_jax.train import state as state_lib
  from wakea_jax.train import step as step_lib

  b, t = _BATCH.value, _SEQ.value
  cfg = model_config(remat_policy=_REMAT.value)
  print(f"train: {_PRESET.value} {cfg.num_params() / 1e6:,.1f}M params, compute {cfg.dtype}, "
        f"weights {cfg.param_dtype}, remat {cfg.remat_policy}, batch {b} x {t} "
        f"({_DOCS.value} packed documents per row), AdamW; {attention_line(cfg)}", flush=True)
  start = time.perf_counter()
  model = transformer.create_model(cfg, seed=0)
  optimizer = opt_lib.make_optimizer(opt_lib.OptimizerConfig(warmup_steps=0), 1000)
  graphdef, state = state_lib.create_train_state(model, optimizer)
  del model
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  doc = -(-t // _DOCS.value)
  segments = (np.arange(t) // doc + 1).astype(np.int32)
  batch = jax.device_put({"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                          "loss_mask": np.ones((b, t), np.float32),
                          "segment_ids": np.broadcast_to(segments, (b, t)).copy()})
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer), donate_argnums=0)
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  cudnn = has_cudnn_call(lowered, compiled)
  print(f"build + compile {time.perf_counter() - start:.1f} s; cuDNN fused attention in the "
        f"step: {'yes' if cudnn else 'NO'} ({CUDNN_CALL} custom call "
        f"{'found' if cudnn else 'absent'})", flush=True)
  if cfg.attention == "cudnn" and not cudnn:
    print("WARNING: attention='cudnn' but the step has no cuDNN attention call: layers.Attention "
          "does not read ModelConfig.attention (see the wiring line at the top) or the kernel "
          "fell back; the figures below are not cuDNN's")
  state, metrics = compiled(state, batch)
  first_loss = float(metrics["loss_sum"] / max(float(metrics["weight"]), 1.0))
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / _STEPS.value
  loss = float(metrics["loss_sum"] / max(float(metrics["weight"]), 1.0))
  tokens = b * t
  per_token = flops.train_flops_per_token(cfg, t)
  causal = per_token - 0.5 * 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t
  flop, _, source = peaks(jax.devices()[0].device_kind)
  weights = flops.matmul_params(cfg)
  print(f"train step: {step_s * 1e3:.1f} ms, {tokens / step_s:,.0f} tokens/s, "
        f"{per_token * tokens / step_s / 1e12:.3g} TFLOP/s "
        f"({per_token * tokens / 1e12:.3g} TFLOP per step: 6 x {weights / 1e6:,.1f}M "
        f"matmul weights x tokens + full attention); loss {first_loss:.3f} -> {loss:.3f} (the "
        f"same batch each step), finite "
        f"{bool(metrics['finite'])}")
  if flop:
    print(f"MFU {100 * per_token * tokens / step_s / flop:.1f}% of {flop / 1e12:.0f} TFLOP/s "
          f"({source}); with causal attention FLOPs {100 * causal * tokens / step_s / flop:.1f}%")
  else:
    print(f"MFU: no peak for {jax.devices()[0].device_kind!r} (pass --peak_tflops)")
  print(memory_line())


def section_decode() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from wakea_jax.models.transformer import create_model
  from wakea_jax.sampling import Sampler

  b, p, n = _DECODE_BATCH.value, _PROMPT.value, _NEW.value
  cfg = model_config(param_dtype=_DTYPE.value)
  print(f"decode: {_PRESET.value}, weights and KV cache {cfg.param_dtype}, batch {b}, prompt "
        f"{p}, {n} new tokens, temperature 1; {attention_line(cfg)} (over the KV cache "
        f"'cudnn' runs the XLA kernel: models/fused_attention.py)", flush=True)
  graphdef, params = nnx.split(create_model(cfg, seed=0))
  sampler = Sampler(graphdef, cfg, temperature=1.0)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (b, p)).tolist()
  width, steps, capacity = sampler.buckets(p, n)

  def run(seed: int):
    start = time.perf_counter()
    state = sampler.start(params, prompts, max_new_tokens=n, rng=jax.random.key(seed))
    jax.block_until_ready(state)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    state = sampler.decode(params, state, jnp.asarray(steps, jnp.int32))
    jax.block_until_ready(state)
    if int(state.num_generated.min()) != n:
      raise RuntimeError(f"rows generated {int(state.num_generated.min())} < {n} tokens")
    return prefill_s, time.perf_counter() - start, state

  start = time.perf_counter()
  run(0)
  print(f"compile + first run {time.perf_counter() - start:.1f} s (prompt bucket {width}, "
        f"{steps} decode steps, cache capacity {capacity})", flush=True)
  prefill_s, decode_s, state = run(1)
  step_s = decode_s / n    # rows stop at n tokens; the loop ends when all are done
  step_bytes = (sum(x.nbytes for x in jax.tree.leaves(params))
                + sum(x.nbytes for x in jax.tree.leaves(state.cache)))
  print(f"decode: prefill {prefill_s * 1e3:.1f} ms, {step_s * 1e3:.2f} ms/step, "
        f"{b * n / decode_s:,.0f} generated tokens/s in decode "
        f"({b * n / (prefill_s + decode_s):,.0f} with prefill)")
  _, bandwidth, source = peaks(jax.devices()[0].device_kind)
  if bandwidth:
    bound = step_bytes / bandwidth
    print(f"HBM bound: {step_bytes / 1e9:.2f} GB read per step (weights + whole KV cache) at "
          f"{bandwidth / 1e12:.2f} TB/s ({source}) -> {bound * 1e3:.2f} ms/step; measured "
          f"{step_s / bound:.1f}x the bound")
  print(memory_line())


def main(argv):
  del argv
  {"info": section_info, "parity": section_parity, "train": section_train,
   "decode": section_decode}[_SECTION.value]()


if __name__ == "__main__":
  app.run(main)
