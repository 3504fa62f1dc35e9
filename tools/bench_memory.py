r"""Memory benchmark: one optimizer step of GRPO and of DPO for a Qwen3-0.6B-shaped model.

  python tools/bench_memory.py [--layers=28 --vocab=151936 --seq=512 --completions=8 \
      --pairs=4 --modes=grpo:before,grpo:after,dpo:before,dpo:after --remat=none,full \
      --max_rss_gb=18]

Each configuration runs in a fresh subprocess: random init (float32 weights and compute),
AdamW state, then ONE step of the real train step (`train/step.py`: forward, backward,
global-norm clipping, AdamW update, state donated) on
  grpo   `completions` rollout rows x `seq` tokens through `rl/update.policy_loss_fn`;
  dpo    `pairs` preference pairs (2 x pairs rows) x `seq` tokens through `objectives/dpo`;
either "after" (the loss functions as the trainers use them: token log-probs from hidden
states in sequence chunks, `models/scoring.py`) or "before" (the same losses on the model's
whole [rows, seq, vocab] logits, as rl/update.py and objectives/dpo.py computed them before
4e7f200). Printed per configuration: the child's peak RSS (`os.wait4`'s ru_maxrss of that
child alone, so it includes the Python/JAX runtime and XLA's compilation), its RSS once the
train state is built (the same-run reference: what parameters + AdamW state cost before any
step), XLA's compiled `memory_analysis()` (arguments + outputs - donated aliases + temporaries,
the buffers of the step itself), compile and step seconds. A child whose RSS passes
--max_rss_gb is killed, and one whose step's buffers cannot be allocated fails; both are
reported as "no: ..." beside XLA's estimate. GB = 1e9 bytes.

Measured 2026-11-30 on the project's CPU machine (lscpu "AMD EPYC", 2 cores, 23.5 GiB RAM),
the default command (28 layers, vocab 151,936, GRPO 8 x 512 tokens, DPO 4 pairs = 8 rows x 512
tokens), 604 s in all. Peak RSS of the child (GB) / XLA buffers of one step (GB):

                  remat=none                        remat=full
  grpo  before    no: XLA 42.81 (cannot allocate)   no: killed at 18.0 RSS, XLA 20.80
  grpo  after     no: XLA 33.05 (cannot allocate)   yes: 14.56 RSS, XLA 12.80, step 136 s
  dpo   before    no: XLA 40.32 (cannot allocate)   no: killed at 18.0 RSS, XLA 18.31
  dpo   after     no: XLA 33.05 (cannot allocate)   yes: 14.53 RSS, XLA 12.80, step 133 s

The state alone (params + AdamW moments) is 7.6 GB of RSS. Chunked scoring saves 8.0 (GRPO)
and 5.5 GB (DPO) of the step's buffers with full remat, 9.8 and 7.3 GB without. Without remat
the activations (~0.75 GB per layer at 8 x 512) do not fit any variant. Three changes made
the remat=full step fit: remat that XLA:CPU keeps (models/transformer.py: jax.checkpoint's
recomputation was merged back into the forward by CSE, so "full" saved nothing: 32.45 GB
before), the tied head contracted as the embedding itself (no transposed copy), and gradients
taken of the weight-normalised loss (no second parameter-sized pass): 32.45 -> 16.15 ->
12.80 GB of XLA buffers.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from machine import cpu_model

_LAYERS = flags.DEFINE_integer("layers", 28, "Decoder layers (Qwen3-0.6B: 28).")
_VOCAB = flags.DEFINE_integer("vocab", 151_936, "Vocabulary size (Qwen3: 151,936).")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per row.")
_COMPLETIONS = flags.DEFINE_integer("completions", 8, "GRPO rows (completions).")
_PAIRS = flags.DEFINE_integer("pairs", 4, "DPO preference pairs (2 rows each).")
_MODES = flags.DEFINE_list("modes", ["grpo:before", "grpo:after", "dpo:before", "dpo:after"],
                           "objective:mode pairs; objective grpo|dpo, mode before|after.")
_REMAT = flags.DEFINE_list("remat", ["none", "full"],
                           "ModelConfig.remat_policy values to measure each mode under.")
_MAX_RSS_GB = flags.DEFINE_float("max_rss_gb", 18.0,
                                 "Kill a configuration whose RSS passes this (GB).")
_FIT_GB = flags.DEFINE_float("fit_gb", 16.0, "The budget a step must fit in (GB).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one 'objective:mode:remat' here.")

GB = 1e9
_RESULT = "RESULT "


def _rss_bytes(pid: int | str = "self") -> int:
  """Current resident set size of `pid` from /proc (0 when it is gone)."""
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def model_config(remat: str):
  from wakea_jax.models.config import get_preset
  return get_preset("qwen3-0.6b", dtype="float32", param_dtype="float32",
                    num_layers=_LAYERS.value, vocab_size=_VOCAB.value, remat_policy=remat,
                    max_seq_len=max(_SEQ.value, 512))


# ------------------------------------------------------------------------------------------
# The child: one configuration, one step.
# ------------------------------------------------------------------------------------------


def _full_logits_scores(model, batch):
  """(log-probs, entropies) from the whole [b, t, vocab] logits: the formula of rl/update.py
  before the scoring was chunked (4e7f200)."""
  import jax
  import jax.numpy as jnp

  from wakea_jax.models import scoring

  out = model.forward(batch["input_ids"], positions=batch.get("positions"),
                      segment_ids=batch.get("segment_ids"))
  logprobs = scoring.token_logprobs(out.logits, batch["targets"])
  logp_all = jax.nn.log_softmax(jax.lax.stop_gradient(out.logits), axis=-1)
  return logprobs, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _grpo_before(model, batch, rng, *, loss_config):
  import jax.numpy as jnp

  from wakea_jax.objectives import grpo as grpo_lib

  del rng
  logprobs, entropy = _full_logits_scores(model, batch)
  mask = batch["loss_mask"]
  loss_sum, sums = grpo_lib.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"],
                                        mask, loss_config)
  return loss_sum, {**sums, "entropy": jnp.sum(entropy * mask)}


def _dpo_before(model, batch, rng, *, config):
  """objectives/dpo.py's loss on the whole logits (its sequence_logps before 4e7f200)."""
  import jax.numpy as jnp

  from wakea_jax.models import scoring
  from wakea_jax.objectives import dpo

  del rng
  logits = model.forward(batch["input_ids"]).logits
  mask = batch["loss_mask"]
  logps = jnp.sum(scoring.token_logprobs(logits, batch["targets"]) * mask, axis=-1)
  tokens = jnp.sum(mask, axis=-1)
  b = logps.shape[0] // 2
  return dpo.preference_loss(logps[:b], logps[b:], batch["ref_chosen_logps"],
                             batch["ref_rejected_logps"], config=config,
                             chosen_tokens=tokens[:b], rejected_tokens=tokens[b:],
                             pair_mask=batch["pair_mask"])


def _batch(objective: str, vocab: int):
  """Random rows of the shapes the trainers feed: GRPO rollouts (a 64-token prompt, the rest
  completion) or stacked DPO pairs (a shared 64-token prompt, then the response)."""
  import numpy as np

  rng = np.random.default_rng(0)
  seq = _SEQ.value
  rows = _COMPLETIONS.value if objective == "grpo" else 2 * _PAIRS.value
  prompt = min(64, seq // 2)
  mask = np.zeros((rows, seq), np.float32)
  mask[:, prompt:] = 1.0
  batch = {"input_ids": rng.integers(1, vocab, (rows, seq)).astype(np.int32),
           "targets": rng.integers(1, vocab, (rows, seq)).astype(np.int32),
           "loss_mask": mask}
  if objective == "grpo":
    batch.update(segment_ids=np.ones((rows, seq), np.int32),
                 positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
                 old_logprobs=np.full((rows, seq), -np.log(vocab), np.float32) * mask,
                 advantages=rng.normal(size=rows).astype(np.float32))
  else:
    pairs = _PAIRS.value
    batch.update(pair_mask=np.ones(pairs, np.float32),
                 ref_chosen_logps=np.full(pairs, -(seq - prompt) * np.log(vocab), np.float32),
                 ref_rejected_logps=np.full(pairs, -(seq - prompt) * np.log(vocab),
                                            np.float32))
  return batch


def _loss_fn(objective: str, mode: str):
  from wakea_jax.objectives import dpo
  from wakea_jax.objectives import grpo as grpo_lib
  from wakea_jax.rl import update

  if objective == "grpo":
    loss_config = grpo_lib.LossConfig()
    if mode == "after":
      return functools.partial(update.policy_loss_fn, loss_config=loss_config)
    return functools.partial(_grpo_before, loss_config=loss_config)
  config = dpo.PreferenceConfig()
  if mode == "after":
    return dpo.make_loss_fn(config)
  return functools.partial(_dpo_before, config=config)


def _emit(figures: dict[str, float | str]) -> None:
  print(_RESULT + json.dumps(figures), flush=True)


def run_child(spec: str) -> dict[str, float | str]:
  """Builds the model and train state, compiles and runs one step; returns the figures,
  printing them once compiled too (a child killed in its step has reported XLA's estimate)."""
  objective, mode, remat = spec.split(":")
  import jax

  from wakea_jax.models import transformer
  from wakea_jax.train import optimizer as opt_lib
  from wakea_jax.train import state as state_lib
  from wakea_jax.train import step as step_lib

  cfg = model_config(remat)
  optimizer = opt_lib.make_optimizer(opt_lib.OptimizerConfig(warmup_steps=0), 1000)
  graphdef, state = state_lib.create_train_state(transformer.create_model(cfg, seed=0),
                                                 optimizer)
  batch = jax.device_put(_batch(objective, cfg.vocab_size))
  jax.block_until_ready((state, batch))
  state_rss = _rss_bytes()
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer, _loss_fn(objective, mode)),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
         + stats.temp_size_in_bytes) if stats is not None else float("nan")
  temp = stats.temp_size_in_bytes if stats is not None else float("nan")
  figures = {"spec": spec, "state_rss": state_rss, "xla": xla, "xla_temp": temp,
             "compile_s": compile_s}
  _emit(figures)
  start = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  figures.update(step_s=time.perf_counter() - start, loss_sum=float(metrics["loss_sum"]),
                 finite=bool(metrics["finite"]))
  return figures


# ------------------------------------------------------------------------------------------
# The parent: one subprocess per configuration, its peak RSS, a kill past --max_rss_gb.
# ------------------------------------------------------------------------------------------


def _child_argv(spec: str) -> list[str]:
  names = ("layers", "vocab", "seq", "completions", "pairs")
  return [sys.executable, os.path.abspath(__file__), f"--child={spec}",
          *(f"--{n}={flags.FLAGS[n].value}" for n in names)]


def measure(spec: str, max_rss: float) -> dict[str, float | str]:
  """Runs `spec` in a fresh process; adds its peak RSS, or marks it killed at `max_rss`."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(_child_argv(spec), stdout=out, stderr=err, text=True)
    killed, seen = False, 0
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      rss = _rss_bytes(proc.pid)
      seen = max(seen, rss)
      if rss > max_rss and not killed:
        os.kill(proc.pid, signal.SIGKILL)
        killed = True
      time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    lines = [line for line in out.read().splitlines() if line.startswith(_RESULT)]
    err_text = err.read()
  result: dict[str, float | str] = {"spec": spec, "wall_s": wall,
                                    "peak_rss": max(usage.ru_maxrss * 1024, seen)}
  if lines:
    result.update(json.loads(lines[-1][len(_RESULT):]))
  # XLA:CPU allocates a step's temporaries as one block; when the machine cannot give it, the
  # step fails at once with RESOURCE_EXHAUSTED instead of growing into the kill.
  oom = re.search(r"RESOURCE_EXHAUSTED: Out of memory allocating (\d+) bytes", err_text)
  if killed:
    result["status"] = f"no: killed at {max_rss / GB:.1f} GB RSS"
  elif oom:
    result["status"] = f"no: out of memory allocating {int(oom.group(1)) / GB:.2f} GB"
  elif proc.returncode != 0 or "step_s" not in result:
    tail = " | ".join(err_text.strip().splitlines()[-3:])
    result["status"] = f"failed (exit {proc.returncode}): {tail}"
  else:
    result["status"] = "ok"
  return result


def _gb(x: float | str | None) -> str:
  return f"{x / GB:6.2f}" if isinstance(x, (int, float)) and x == x else "     -"


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value:
    _emit(run_child(_CHILD.value))
    return
  cfg = model_config("none")
  params = cfg.num_params()
  logits_rows = {"grpo": _COMPLETIONS.value, "dpo": 2 * _PAIRS.value}
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB RAM")
  print(f"model: Qwen3-0.6B shapes, {cfg.num_layers} layers, vocab {cfg.vocab_size:,}, float32: "
        f"{params / 1e6:.1f}M params = {4 * params / GB:.2f} GB; + grads + AdamW (2 moments) "
        f"= {16 * params / GB:.2f} GB")
  for objective, rows in logits_rows.items():
    print(f"{objective}: {rows} rows x {_SEQ.value} tokens; whole logits [{rows}, {_SEQ.value}, "
          f"{cfg.vocab_size}] float32 = {4 * rows * _SEQ.value * cfg.vocab_size / GB:.2f} GB")
  print("peak RSS: the child process's maximum resident set; state RSS: the same child once "
        "params + AdamW state are built (reference); XLA: compiled memory_analysis "
        "(args + outputs - donated + temp). GB = 1e9 bytes.")
  header = (f"{'objective':9} {'mode':6} {'remat':5} {'peak RSS':>8} {'state RSS':>9} "
            f"{'XLA':>6} {'XLA temp':>8} {'compile s':>9} {'step s':>7} {'wall s':>7}  "
            f"fits {_FIT_GB.value:g} GB")
  print(header)
  total = time.perf_counter()
  xla: dict[tuple[str, str, str], float] = {}
  for remat in _REMAT.value:
    for pair in _MODES.value:
      objective, mode = pair.split(":")
      r = measure(f"{objective}:{mode}:{remat}", _MAX_RSS_GB.value * GB)
      ok = r["status"] == "ok"
      fits = ("yes" if r["peak_rss"] <= _FIT_GB.value * GB else "no") if ok else r["status"]
      step = f"{r['step_s']:7.1f}" if ok else "      -"
      compile_s = f"{r['compile_s']:9.1f}" if "compile_s" in r else "        -"
      print(f"{objective:9} {mode:6} {remat:5} {_gb(r['peak_rss']):>8} "
            f"{_gb(r.get('state_rss')):>9} {_gb(r.get('xla')):>6} {_gb(r.get('xla_temp')):>8} "
            f"{compile_s} {step} {r['wall_s']:7.1f}  {fits}", flush=True)
      if isinstance(r.get("xla"), (int, float)):
        xla[objective, mode, remat] = r["xla"]
  for (objective, mode, remat), before in sorted(xla.items()):
    after = xla.get((objective, "after", remat))
    if mode == "before" and after is not None:
      print(f"{objective} remat={remat}: chunked scoring saves {(before - after) / GB:.2f} GB "
            f"of the step's XLA buffers ({before / GB:.2f} -> {after / GB:.2f} GB)")
  print(f"total wall time {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
  app.run(main)
