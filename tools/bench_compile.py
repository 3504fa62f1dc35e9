r"""Compile-time benchmark: Python loop over layers vs `ModelConfig.scan_layers` (one lax.scan).

  python tools/bench_compile.py [--layers=28 --embed=256 --mlp=768 --vocab=4096 --seq=128 \
      --batch=4 --remat=none,full --layouts=loop,scan --new_tokens=8 --steps=3]

Each (remat, layout) runs in a fresh subprocess (no executable shared between them), on a
deep, narrow model: `--layers` decoder layers of width `--embed`, so that compilation, not
arithmetic, dominates. Printed per configuration:
  trace   seconds to trace and lower the jitted train step (`train/step.py`: forward,
          backward, clipping, AdamW, state donated) on a [batch, seq] batch;
  compile seconds for XLA to compile it;
  step    seconds of one step once compiled, the fastest of `--steps` (the run-time price
          of the layout);
  xla     GB of the compiled step's buffers (arguments + outputs - donated + temporaries,
          `memory_analysis()`), so memory of the two layouts can be compared;
  sample  seconds of the first `Sampler.generate` call (greedy, `--new_tokens` tokens:
          compiling prefill and decode, plus running them) minus the second call's;
  rss     the child's peak RSS in GB (`os.wait4`), compilation included.
The loop rows are the same-run reference for the scan rows. GB = 1e9 bytes.

Measured 2026-11-30 on the project's CPU machine (lscpu "AMD EPYC", 2 cores, shared: load 3
to 5 from other jobs, so step times are noisy), the default command, 87 s in all:

  remat layout    trace s  compile s   step s   xla GB  sample s   rss GB
  none  loop         2.32       7.38    1.262    0.780      5.35     1.75
  none  scan         0.31       2.52    1.009    0.908      1.38     1.61
  full  loop         2.43       7.55    0.726    0.489      5.10     1.49
  full  scan         0.29       3.48    1.347    0.526      1.84     1.17

Trace + compile of the train step: 9.7 -> 2.8 s (3.4x) without remat, 10.0 -> 3.8 s (2.6x)
with full remat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags
from machine import cpu_model

_LAYERS = flags.DEFINE_integer("layers", 28, "Decoder layers (Qwen3-0.6B: 28).")
_EMBED = flags.DEFINE_integer("embed", 256, "Model width.")
_MLP = flags.DEFINE_integer("mlp", 768, "MLP width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "Vocabulary size.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per training row.")
_BATCH = flags.DEFINE_integer("batch", 4, "Training rows.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 8, "Tokens sampled per prompt (0: skip).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps after the first (fastest shown).")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "ModelConfig.remat_policy values.")
_LAYOUTS = flags.DEFINE_list("layouts", ["loop", "scan"], "Layer layouts: loop and/or scan.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one 'remat:layout' here.")

GB = 1e9
_RESULT = "RESULT "
_FLAG_NAMES = ("layers", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "seq",
               "batch", "new_tokens", "steps")


def model_config(remat: str, layout: str):
  """The benchmark's ModelConfig for one configuration."""
  from wakea_jax.models.config import ModelConfig
  return ModelConfig(
      vocab_size=_VOCAB.value, embed_dim=_EMBED.value, num_layers=_LAYERS.value,
      num_heads=_HEADS.value, num_kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
      mlp_dim=_MLP.value, max_seq_len=max(_SEQ.value, 256), remat_policy=remat,
      scan_layers=layout == "scan")


def run_child(spec: str) -> dict[str, float]:
  """Measures one 'remat:layout' configuration in this process."""
  import jax
  import numpy as np
  from flax import nnx

  from wakea_jax.models import transformer
  from wakea_jax.sampling import Sampler
  from wakea_jax.train import optimizer as opt_lib
  from wakea_jax.train import state as state_lib
  from wakea_jax.train import step as step_lib

  remat, layout = spec.split(":")
  config = model_config(remat, layout)
  model = transformer.create_model(config, seed=0)
  figures: dict[str, float] = {}
  if _NEW_TOKENS.value:  # first: the train step donates (deletes) the parameters
    graphdef, params = nnx.split(model)
    sampler = Sampler(graphdef, config, temperature=0.0)
    prompts = [[1, 2, 3, 4, 5][: 2 + i] for i in range(4)]
    times = []
    for _ in range(2):
      start = time.perf_counter()
      sampler.generate(params, prompts, max_new_tokens=_NEW_TOKENS.value, rng=jax.random.key(0))
      times.append(time.perf_counter() - start)
    figures["sample"] = times[0] - times[1]
  optimizer = opt_lib.make_optimizer(opt_lib.OptimizerConfig(warmup_steps=0), 1000)
  graphdef, state = state_lib.create_train_state(model, optimizer)
  del model
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer), donate_argnums=0)
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (_BATCH.value, _SEQ.value + 1))
  batch = jax.device_put({"input_ids": ids[:, :-1].astype(np.int32),
                          "targets": ids[:, 1:].astype(np.int32),
                          "loss_mask": np.ones((_BATCH.value, _SEQ.value), np.float32)})
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  figures["trace"] = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  figures["compile"] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  figures["xla"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / GB
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  figures["step"] = min(times)
  return figures


def measure(spec: str) -> dict[str, float | str]:
  """Runs one configuration in a subprocess: its figures plus its peak RSS."""
  argv = [sys.executable, os.path.abspath(__file__), f"--child={spec}",
          *(f"--{n}={flags.FLAGS[n].value}" for n in _FLAG_NAMES)]
  child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(child.pid, 0)
  out, err = child.stdout.read(), child.stderr.read()
  child.returncode = os.waitstatus_to_exitcode(status)
  result: dict[str, float | str] = {}
  for line in out.splitlines():
    if line.startswith(_RESULT):
      result = json.loads(line[len(_RESULT):])
  if child.returncode or not result:
    errors = [line for line in err.splitlines() if "Error" in line] or err.splitlines()[-1:]
    return {"error": f"exit {child.returncode}: {errors[-1:]}"}
  result["rss"] = usage.ru_maxrss * 1024 / GB  # ru_maxrss is in KiB on Linux
  return result


def _format(value: float | str | None, digits: int = 2) -> str:
  return "-" if value is None else value if isinstance(value, str) else f"{value:.{digits}f}"


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    print(_RESULT + json.dumps(run_child(_CHILD.value)), flush=True)
    return
  start = time.perf_counter()
  config = model_config("none", "loop")
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
  print(f"model: {config.num_layers} layers, embed {config.embed_dim}, mlp {config.mlp_dim}, "
        f"heads {config.num_heads}/{config.num_kv_heads} x {config.head_dim}, vocab "
        f"{config.vocab_size}, {config.num_params() / 1e6:.1f}M params; train batch "
        f"{_BATCH.value} x {_SEQ.value}, sampling 4 prompts x {_NEW_TOKENS.value} tokens")
  header = (f"{'remat':<6}{'layout':<8}{'trace s':>9}{'compile s':>11}{'step s':>9}"
            f"{'xla GB':>9}{'sample s':>10}{'rss GB':>9}")
  print(header)
  results: dict[tuple[str, str], dict[str, float | str]] = {}
  for remat in _REMAT.value:
    for layout in _LAYOUTS.value:
      r = results[remat, layout] = measure(f"{remat}:{layout}")
      if "error" in r:
        print(f"{remat:<6}{layout:<8}failed: {r['error']}", flush=True)
        continue
      print(f"{remat:<6}{layout:<8}{_format(r['trace']):>9}{_format(r['compile']):>11}"
            f"{_format(r['step'], 3):>9}{_format(r['xla'], 3):>9}"
            f"{_format(r.get('sample')):>10}{_format(r['rss']):>9}", flush=True)
  for remat in _REMAT.value:
    loop, scan = results.get((remat, "loop")), results.get((remat, "scan"))
    if loop and scan and "error" not in loop and "error" not in scan:
      total = lambda r: r["trace"] + r["compile"]
      print(f"remat={remat}: trace + compile of the train step {total(loop):.1f} s (loop) vs "
            f"{total(scan):.1f} s (scan): loop / scan = {total(loop) / total(scan):.1f}x")
  print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
