r"""GRPO step benchmark: bench56m, 2 prompts x 8 completions, 64 prompt + 128 new tokens, KL on.

  python tools/bench_grpo.py [--preset=bench56m --prompts=2 --group=8 --prompt_tokens=64 \
      --new=128 --steps=3 --kl_beta=0.04 --modes=trainer,auto --model=field=value,...]

One GRPO step of the real learner (`trainers.make_learner` on `configs/grpo.py`, the shared
run setup: from-scratch model of the preset's shapes and dtypes, `--model` overrides such as
dtype=bfloat16,attention=cudnn on top, AdamW, bundled tokenizer),
called directly (`Learner.step`), broken into the phases the learner itself times:
  rollout  prefill + decode of every completion (sampler, stop ids checked in the loop)
  reward   the host reward (a vowel-fraction reward registered here: every completion gets a
           different value, so the advantages are non-zero and every update is real)
  score    batching + the scoring passes: the reference policy's log-probs (KL on) and, with
           rl.old_logprobs=trainer, the trainer's re-scoring of the old log-probs
  update   the policy-gradient AdamW step
Each mode has its own learner from the same seed (same initial model, same prompts): one
warm-up step each (compilation), then `steps` timed steps taken in turns across the modes, so
load changes on a shared machine hit both alike; the table shows the mean of the timed steps.
The reference measured in the same run is rl.old_logprobs=trainer (re-scores the rollouts, as
before the sampler's log-probs were used); `auto` takes the sampler's log-probs as the old
ones (one update per rollout batch). A mode may name a rollout precision after an @
(`auto@bfloat16`: rollout.dtype=bfloat16, sampling in bfloat16 while the trainer keeps its
dtype; the old log-probs then come from the trainer's scoring, as they must). Prompts are
~`prompt_tokens` tokens after the chat template (a file written to a temporary folder); a
completion stops early at a stop id, so the generated-token count is printed beside the time.

--tunix_python=/tmp/tunix-venv/bin/python (an interpreter with google-tunix installed) also
runs tools/bench_tunix_grpo.py there after ours, on the same shapes and sizes (Tunix's own
GRPOLearner loop, vanilla rollout), and prints its row and the step-time ratio beside ours.

--tensor_parallel=N runs every phase on N host devices as mesh.tensor=N; --rollout_tensor=N
samples on a tensor=N mesh (rollout.tensor) and trains data-parallel on the same N devices,
or, with --train_devices=1 (mesh.devices), on the first device alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import tempfile
import time

from absl import app, flags
from machine import cpu_model

_PRESET = flags.DEFINE_string("preset", "bench56m", "Model preset (models/config.py).")
_MODEL = flags.DEFINE_list("model", [], "ModelConfig overrides on the preset: field=value,...")
_PROMPTS = flags.DEFINE_integer("prompts", 2, "Prompts per step (rl.prompts_per_step).")
_GROUP = flags.DEFINE_integer("group", 8, "Completions per prompt (rollout.group_size).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "Prompt length after the template.")
_NEW = flags.DEFINE_integer("new", 128, "Max new tokens per completion.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per mode (after one warm-up step).")
_KL_BETA = flags.DEFINE_float("kl_beta", 0.04, "loss.kl_beta (> 0: reference scoring on).")
_MODES = flags.DEFINE_list("modes", ["trainer", "auto"],
                           "rl.old_logprobs values to measure, each optionally @rollout.dtype "
                           "(auto@bfloat16).")
_TUNIX_PYTHON = flags.DEFINE_string(
    "tunix_python", "", "An interpreter with google-tunix installed: also time Tunix's GRPO "
    "step (tools/bench_tunix_grpo.py) on the same shapes and print it beside ours.")
_TUNIX_TIMEOUT = flags.DEFINE_integer("tunix_timeout", 1800, "Seconds for the Tunix run.")
_TENSOR = flags.DEFINE_integer(
    "tensor_parallel", 1, "Run on N host devices as mesh.tensor=N (XLA:CPU runs a device's "
    "small-batch decode matmuls on one core; N = cores uses them all).")
_ROLLOUT_TENSOR = flags.DEFINE_integer(
    "rollout_tensor", 0, "Sample on a tensor-parallel mesh of N host devices (rollout.tensor=N"
    ", params resharded each update) while the trainer runs data-parallel over the same "
    "devices (mesh.data=N): each phase on the layout that suits it. Not with "
    "--tensor_parallel.")
_TRAIN_DEVICES = flags.DEFINE_integer(
    "train_devices", 0, "mesh.devices: the trainer's mesh spans the first N devices (0: all). "
    "With --rollout_tensor=2, 1 trains on one host device (whose large matmuls use every "
    "core anyway) while the rollouts sample over both.")
_FULL = flags.DEFINE_bool(
    "full_length", False, "Every completion runs to --new tokens (the sampler's stop ids off), "
    "as the Tunix run does: a random model otherwise stops early on the chat stop ids.")

_XLA_FLAGS_BEFORE = os.environ.get("XLA_FLAGS", "")
PHASES = ("rollout", "reward", "score", "update", "step")
_WORDS = ("alpha beta gamma delta river stone cloud maple quiet orange window seven green "
          "silver paper market honest little garden yellow winter").split()


def vowel_reward():
  """Fraction of the final turn's characters that are vowels: a different value for nearly
  every completion of a random model, so no group has zero-variance rewards."""
  import numpy as np

  def reward(samples):
    return np.asarray([sum(c in "aeiou" for c in s.final) / max(len(s.final), 1)
                       for s in samples], np.float32)
  return reward


def write_prompts(path: pathlib.Path, n: int, target: int) -> int:
  """Writes `n` prompt records of ~`target` rendered tokens (chat template included) to
  `path`; -> the longest rendered length."""
  import numpy as np

  from wakea_jax.data.tokenizer import default_tokenizer
  from wakea_jax.rl.prompts import to_prompt_record

  tokenizer = default_tokenizer()
  rng = np.random.default_rng(0)
  longest = 0
  with path.open("w") as f:
    for i in range(n):
      words: list[str] = []
      # Grow the text word by word until the rendered prompt reaches the target: the
      # template adds its own tokens, so the text length alone would not say.
      while True:
        raw = {"prompt": " ".join(words + [str(rng.choice(_WORDS))]), "answer": "0"}
        length = len(to_prompt_record(raw, f"prompt {i}").render(tokenizer))
        if length > target and words:
          break
        words = raw["prompt"].split()
        if length >= target:
          break
      record = {"prompt": " ".join(words), "answer": "0"}
      longest = max(longest, len(to_prompt_record(record, f"prompt {i}").render(tokenizer)))
      f.write(json.dumps(record) + "\n")
  return longest


def grpo_config(mode: str, prompt_file: pathlib.Path):
  """configs/grpo.py:test with the preset's model shapes and the benchmark's sizes; `mode`
  is rl.old_logprobs, optionally followed by @rollout.dtype."""
  mode, _, rollout_dtype = mode.partition("@")
  from wakea_jax.config_files import get_config
  from wakea_jax.models.config import get_preset

  fields = dict(get_preset(_PRESET.value).to_dict())
  for item in _MODEL.value:
    key, _, value = item.partition("=")
    if key not in fields:
      raise ValueError(f"--model: {key!r} is not a ModelConfig field")
    current = fields[key]
    if isinstance(current, bool):
      fields[key] = value.lower() in ("1", "true")
    else:
      fields[key] = value if current is None else type(current)(value)
  fields["max_seq_len"] = max(fields["max_seq_len"], 2 * (_PROMPT_TOKENS.value + _NEW.value))
  config = get_config("grpo:test", **{
      "rollout.group_size": _GROUP.value, "rollout.max_new_tokens": _NEW.value,
      "rl.prompts_per_step": _PROMPTS.value, "rl.old_logprobs": mode,
      "rollout.dtype": rollout_dtype,
      "loss.kl_beta": _KL_BETA.value, "train.steps": _STEPS.value + 1,
      "data.sources": str(prompt_file), "data.eval_sources": "",
      "train.eval_at_start": False, "export.enabled": False,
      "mesh.tensor": _TENSOR.value, "rollout.tensor": _ROLLOUT_TENSOR.value,
      "mesh.devices": _TRAIN_DEVICES.value})
  config.model.update(fields)
  config.reward = {"vowels": {"weight": 1.0}}
  return config


def bench_modes(modes: list[str], prompt_file: pathlib.Path) -> dict[str, dict[str, float]]:
  """Per mode: mean per-phase seconds and tokens of `steps` learner steps, build and first-step
  seconds. One learner per mode, all built and warmed up first; the timed steps then take
  turns (mode A step 1, mode B step 1, ...), so a load change on a shared machine hits every
  mode alike instead of whichever ran last."""
  import numpy as np

  from wakea_jax import trainers

  with tempfile.TemporaryDirectory() as workdir:
    learners, out = {}, {}
    for mode in modes:
      start = time.perf_counter()
      learners[mode] = trainers.make_learner(grpo_config(mode, prompt_file),
                                             pathlib.Path(workdir) / mode)
      if _FULL.value:
        learners[mode].sampler = dataclasses.replace(learners[mode].sampler, stop_ids=())
      build_s = time.perf_counter() - start
      first = learners[mode].step(0)
      out[mode] = {"build": build_s, "first_step": first["time/step_s"]}
      print(f"  [{mode}] build {build_s:.1f} s, warm-up step (compile) "
            f"{first['time/step_s']:.1f} s", flush=True)
    timed: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for step in range(1, _STEPS.value + 1):
      for mode in modes:
        timed[mode].append(learners[mode].step(step))
  for mode, metrics in timed.items():
    out[mode].update({p: float(np.mean([m[f"time/{p}_s"] for m in metrics])) for p in PHASES})
    out[mode].update(tokens=float(np.mean([m["generated_tokens"] for m in metrics])),
                     reward_std=float(np.mean([m["reward_std"] for m in metrics])),
                     finite=float(min(m["finite"] for m in metrics)))
  return out


def bench_tunix(model_fields: dict) -> dict | None:
  """tools/bench_tunix_grpo.py under --tunix_python on the same shapes and sizes: its
  figures (it prints its own lines, passed through here), or None when it failed."""
  script = pathlib.Path(__file__).resolve().parent / "bench_tunix_grpo.py"
  command = [_TUNIX_PYTHON.value, str(script), "--json", f"--shapes={json.dumps(model_fields)}",
             f"--prompts={_PROMPTS.value}", f"--group={_GROUP.value}",
             f"--prompt_tokens={_PROMPT_TOKENS.value}", f"--new={_NEW.value}",
             f"--steps={_STEPS.value}", f"--kl_beta={_KL_BETA.value}"]
  print(f"Tunix ({_TUNIX_PYTHON.value}):", flush=True)
  try:
    # Tunix runs on one host device, as it would by default: not on the devices this process
    # forced for --tensor_parallel / --rollout_tensor.
    env = dict(os.environ, XLA_FLAGS=_XLA_FLAGS_BEFORE)
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=_TUNIX_TIMEOUT.value, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    print(f"  Tunix run failed: {e}")
    return None
  result = None
  for line in done.stdout.splitlines():
    if line.startswith("TUNIX_JSON "):
      result = json.loads(line.removeprefix("TUNIX_JSON "))
    else:
      print(f"  {line}")
  if done.returncode or result is None:
    tail = "\n    ".join(done.stderr.strip().splitlines()[-15:])
    print(f"  Tunix run failed (exit {done.returncode}):\n    {tail}")
    return None
  return result


def main(argv):
  del argv
  if _TENSOR.value > 1 and _ROLLOUT_TENSOR.value:
    raise ValueError("give --tensor_parallel or --rollout_tensor, not both")
  devices = max(_TENSOR.value, _ROLLOUT_TENSOR.value)
  if devices > 1:   # before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
  import jax

  from wakea_jax.models.config import get_preset
  from wakea_jax.rl import rewards

  rewards.REWARDS["vowels"] = vowel_reward
  wall = time.perf_counter()
  rows = _PROMPTS.value * _GROUP.value
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}")
  with tempfile.TemporaryDirectory() as tmp:
    prompt_file = pathlib.Path(tmp) / "prompts.jsonl"
    longest = write_prompts(prompt_file, 64, _PROMPT_TOKENS.value)
    cfg = grpo_config("auto", prompt_file).model
    model = get_preset(_PRESET.value, **cfg.to_dict())
    print(f"model {_PRESET.value}: {model.num_params() / 1e6:.1f}M params, {model.dtype} "
          f"compute, {model.param_dtype} weights, attention={model.attention!r}; {_PROMPTS.value} "
          f"prompts x {_GROUP.value} completions, prompts <= {longest} tokens, "
          f"{_NEW.value} new tokens, loss.kl_beta {_KL_BETA.value}; mean of {_STEPS.value} "
          f"steps after a warm-up step")
    results = bench_modes(_MODES.value, prompt_file)
  tunix = bench_tunix(cfg.to_dict()) if _TUNIX_PYTHON.value else None
  header = f"{'rl.old_logprobs':<17}" + "".join(f"{p + ' s':>10}" for p in PHASES)
  print(header + f"{'tokens':>9}{'tokens/s':>10}")
  for mode, r in results.items():
    print(f"{mode:<17}" + "".join(f"{r[p]:>10.2f}" for p in PHASES)
          + f"{r['tokens']:>9.0f}{r['tokens'] / r['step']:>10.1f}"
          + f"  (reward std {r['reward_std']:.3f}, finite {r['finite']:.0f})")
  if tunix:
    label = f"tunix {tunix['version']}"
    print(f"{label:<17}" + "".join(f"{tunix[p]:>10.2f}" for p in PHASES)
          + f"{tunix['tokens']:>9.0f}{tunix['tokens'] / tunix['step']:>10.1f}"
          + "  (same shapes and sizes, Tunix's GRPOLearner; tools/bench_tunix_grpo.py)")
  if "trainer" in results and "auto" in results:
    ref, new = results["trainer"], results["auto"]
    print(f"auto vs trainer (the reference): step {ref['step'] / new['step']:.2f}x faster, "
          f"score phase {ref['score']:.2f} -> {new['score']:.2f} s; rollout is "
          f"{new['rollout'] / new['step']:.0%} of the auto step "
          f"({rows * _NEW.value} max new tokens: "
          f"{new['rollout'] / _NEW.value * 1e3:.1f} ms per decode step incl. prefill)")
  if tunix:
    # Ours dispatches the scoring passes during the rollout phase (score_s is only the wait
    # left after the rewards), so rollout + score is the phase to set against Tunix's.
    for mode, r in results.items():
      print(f"{mode} vs {label}: step {r['step']:.2f} vs {tunix['step']:.2f} s, step time "
            f"Tunix / ours = {tunix['step'] / r['step']:.2f} (> 1: ours faster; rollout + "
            f"score {(tunix['rollout'] + tunix['score']) / (r['rollout'] + r['score']):.2f}x, "
            f"update {tunix['update'] / r['update']:.2f}x)")
  print(f"total wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  app.run(main)
