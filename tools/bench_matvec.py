r"""What a decode step's matmuls can reach on this CPU: small-batch dots against bandwidth.

  python tools/bench_matvec.py [--batch=8 --preset=bench56m --repeats=20 --no_torch \
                                --sweep=1,4,8,16,32]

A decode step multiplies a few rows (the batch) by every weight matrix once, so it is often
called bandwidth-bound and measured against a bound of bytes over memcpy bandwidth
(tools/bench_sample.py). This benchmark asks how fast the dots themselves stream weights:
for the preset's decode matmuls (every layer's q, k, v, o, gate, up and down, then the LM
head: distinct weights, as a step reads them) at `batch` rows it prints the weight bytes
streamed per second by

  - XLA:CPU (the step's dots jitted as one program), the sampler's engine;
  - numpy (OpenBLAS) and, when installed, torch (`F.linear`), the references;

beside the memory bandwidth measured in the same run: a single-thread read (numpy sum), a
two-thread read, and memcpy (read + write, as bench_sample.py's bound counts it). The step
time the dots alone need at the XLA rate is printed as the attainable decode step.

`--xla_flag_sets` times the same XLA dots again in a fresh process for each set of XLA:CPU
flags named (XLA reads them once, at start-up): the matmul back ends this jaxlib offers
(oneDNN, XNNPACK, YNNPACK's fusion kinds, Eigen), so whether any of them streams the
weights faster at `batch` rows is a measurement, not a guess. A set this jaxlib does not
know is reported as such (XLA aborts on an unknown flag).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from absl import app, flags
from machine import cpu_model, memcpy_bandwidth

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset whose decode matmuls to run.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per dot (the decode batch).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats of each measurement.")
_NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the torch reference.")
_SWEEP = flags.DEFINE_list(
    "sweep", ["1", "4", "8", "16", "32"],
    "Row counts at which to time the XLA dots again, for the table of weight GB/s and "
    "GFLOP/s against rows (where the step stops being bandwidth-bound); empty: none.")
_XLA_ONLY = flags.DEFINE_bool(
    "xla_only", False, "Time only the XLA:CPU dots (the child runs of --xla_flag_sets).")
# Each set is one XLA_FLAGS value; sets are separated by ';'. "default" is the jaxlib's own
# choice, timed in a child process like the others so that all of them compare alike.
DEFAULT_FLAG_SETS = (
    "default;"
    "--xla_cpu_use_onednn=true;"
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot;"
    "--xla_cpu_use_xnnpack=true;"
    "--xla_cpu_experimental_xnn_fusion_type=dot;"
    "--xla_cpu_experimental_ynn_fusion_type=;"
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot;"
    "--xla_cpu_multi_thread_eigen=false")
_FLAG_SETS = flags.DEFINE_string(
    "xla_flag_sets", "",
    "';'-separated XLA_FLAGS values under which to time the XLA dots again, each in a fresh "
    f"process ('default': none); 'all' is {DEFAULT_FLAG_SETS!r}. Empty: none.")


def _timed(fn, repeats: int) -> float:
  """Seconds per call, after one warm-up call."""
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def read_bandwidths(repeats: int) -> dict[str, float]:
  """Bytes per second: one thread summing 256 MiB, two threads a half each, and memcpy
  (`machine.memcpy_bandwidth`, bench_sample.py's: 2x the bytes copied, read + write)."""
  import numpy as np
  a = np.ones(64 * 2 ** 20, np.float32)
  halves = (a[:a.size // 2], a[a.size // 2:])

  def two_threads():
    threads = [threading.Thread(target=h.sum) for h in halves]
    for t in threads:
      t.start()
    for t in threads:
      t.join()

  return {"read, 1 thread": a.nbytes / _timed(a.sum, repeats),
          "read, 2 threads": a.nbytes / _timed(two_threads, repeats),
          "memcpy (read + write)": memcpy_bandwidth(repeats=repeats)}


def decode_shapes(preset: str) -> list[tuple[int, int]]:
  """(in, out) of every decode matmul of `preset`, in step order."""
  from wakea_jax.models.config import get_preset
  c = get_preset(preset)
  d, q, kv, m = c.embed_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.mlp_dim
  layer = [(d, q), (d, kv), (d, kv), (q, d), (d, m), (d, m), (m, d)]
  return layer * c.num_layers + [(d, c.vocab_size)]


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  b, repeats = _BATCH.value, _REPEATS.value
  shapes = decode_shapes(_PRESET.value)
  rng = np.random.default_rng(0)
  weights = [rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[0]))
             for s in shapes]
  nbytes = sum(w.nbytes for w in weights)
  print(f"machine: {cpu_model()}, {jax.device_count()} device(s), jax {jax.__version__}")
  print(f"{_PRESET.value} decode matmuls: {len(shapes)} dots, {nbytes / 1e6:.1f} MB of float32 "
        f"weights, batch {b}")
  bandwidth = {} if _XLA_ONLY.value else read_bandwidths(repeats)
  for name, value in bandwidth.items():
    print(f"  {name:<28} {value / 1e9:7.1f} GB/s")

  # Each dot takes a fixed [b, in] input (the chain's activations are not what is measured,
  # and a fixed input keeps every dot independent of the last one's values).
  inputs = {s[0]: rng.standard_normal((b, s[0]), dtype=np.float32) for s in shapes}

  def run_all(dot, xs, ws):
    return [dot(xs[w.shape[0]], w) for w in ws]

  jit_weights = [jnp.asarray(w) for w in weights]
  jit_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  step = jax.jit(lambda xs, ws: run_all(jnp.dot, xs, ws))
  rates = {"XLA:CPU (jax.jit)": nbytes / _timed(
      lambda: jax.block_until_ready(step(jit_inputs, jit_weights)), repeats)}
  if _XLA_ONLY.value:
    print(f"xla dots: {rates['XLA:CPU (jax.jit)'] / 1e9:.2f} GB/s")
    return
  out_major = [jnp.asarray(np.ascontiguousarray(w.T)) for w in weights]   # [out, in]
  step_t = jax.jit(lambda xs, ws: [jax.lax.dot_general(xs[w.shape[1]], w, (((1,), (1,)), ((), ())))
                                   for w in ws])
  rates["XLA:CPU, [out, in] weights"] = nbytes / _timed(
      lambda: jax.block_until_ready(step_t(jit_inputs, out_major)), repeats)
  rates["numpy (OpenBLAS)"] = nbytes / _timed(lambda: run_all(np.dot, inputs, weights), repeats)
  if not _NO_TORCH.value:
    try:
      import torch
    except ImportError:
      torch = None
    if torch is not None:
      t_weights = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in weights]   # [out, in]
      t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
      with torch.no_grad():
        rates[f"torch {torch.__version__} (F.linear)"] = nbytes / _timed(
            lambda: [torch.nn.functional.linear(t_inputs[w.shape[1]], w) for w in t_weights],
            repeats)
  print("weights streamed by the dots:")
  for name, rate in rates.items():
    print(f"  {name:<28} {rate / 1e9:7.1f} GB/s  ({nbytes / rate * 1e3:6.2f} ms per step)")
  memcpy = bandwidth["memcpy (read + write)"]
  xla = rates["XLA:CPU (jax.jit)"]
  print(f"bound by memcpy bandwidth: {nbytes / memcpy * 1e3:.2f} ms per step for these weights; "
        f"the XLA dots alone take {nbytes / xla * 1e3:.2f} ms ({memcpy / xla:.2f}x the bound)")
  if _SWEEP.value:
    # The same dots at other row counts: a bandwidth-bound kernel costs the same at any
    # count, a compute-bound one grows with it.
    flops_per_row = 2 * sum(w.size for w in weights)
    print("XLA:CPU dots by rows (the batch):")
    print(f"  {'rows':>4}  {'GB/s':>6}  {'GFLOP/s':>7}  {'ms per step':>11}  "
          f"{'x memcpy bound':>14}")
    for rows in map(int, _SWEEP.value):
      xs = {k: jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32)) for k in inputs}
      seconds = _timed(lambda xs=xs: jax.block_until_ready(step(xs, jit_weights)), repeats)
      print(f"  {rows:>4}  {nbytes / seconds / 1e9:6.1f}  "
            f"{rows * flops_per_row / seconds / 1e9:7.1f}  {seconds * 1e3:11.2f}  "
            f"{seconds * memcpy / nbytes:14.2f}")
  sets = DEFAULT_FLAG_SETS if _FLAG_SETS.value == "all" else _FLAG_SETS.value
  if sets:
    print(f"XLA:CPU dots at {b} rows under other XLA flags (a fresh process each):")
    print(f"  {'GB/s':>6}  {'ms per step':>11}  {'x memcpy bound':>14}  XLA_FLAGS")
    for flag_set in (f.strip() for f in sets.split(";")):
      rate = flag_set_rate(flag_set, preset=_PRESET.value, batch=b, repeats=repeats)
      if isinstance(rate, str):
        print(f"  {'-':>6}  {'-':>11}  {'-':>14}  {flag_set or 'default'}: {rate}")
      else:
        print(f"  {rate / 1e9:6.1f}  {nbytes / rate * 1e3:11.2f}  {memcpy / rate:14.2f}  "
              f"{flag_set or 'default'}")


def flag_set_rate(flag_set: str, *, preset: str, batch: int, repeats: int) -> float | str:
  """The XLA dots' weight bytes per second in a child process run with XLA_FLAGS=flag_set
  ('default' or '': none), or why there is no figure (XLA's own message when it refused the
  flags)."""
  flag_set = "" if flag_set == "default" else flag_set
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--preset={preset}", f"--batch={batch}",
       f"--repeats={repeats}", "--xla_only", "--sweep="],
      capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": flag_set})
  match = re.search(r"^xla dots: ([\d.]+) GB/s$", proc.stdout, re.MULTILINE)
  if proc.returncode == 0 and match:
    return float(match.group(1)) * 1e9
  refused = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", proc.stderr)
  if refused:
    return f"not known to this jaxlib ({refused.group(1).strip()})"
  tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
  return f"failed (exit {proc.returncode}: {tail[0][:120]})"


if __name__ == "__main__":
  app.run(main)
