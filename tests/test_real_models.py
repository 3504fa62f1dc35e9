"""A real-shaped model end to end: import -> SFT -> GRPO with the tool loop -> export ->
`transformers` (issue 12).

The model has Qwen3-0.6B's (or Llama-3.2-1B's) real width, head layout, rope and padded
vocabulary (151,936 / 128,256 rows), a locally built tokenizer of the real size with the real
chat template, and 2 layers; `transformers` saves it, we import it, train it, export it, and
`transformers` reloads the export with matching logits and the same greedy tokens. Qwen3 is
fully fine-tuned; Llama (twice as wide) trains LoRA adapters and also exports them for PEFT.
Training is one SFT step (at the peak learning rate, so the export carries trained weights)
and one GRPO step through the tool loop, with no held-out evaluation (tested elsewhere): at
this vocabulary every XLA:CPU step, compile and evaluation costs tens of seconds.

The pipeline runs in a child process with 2 CPU devices (FSDP over both): XLA:CPU's memory
for a 151,936-entry vocabulary grows with the number of fake devices, and 8 of them need
about 20 GB where 2 need 9.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

if __name__ == "__main__":  # the child: 2 devices, set before JAX is imported
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import pytest
import real_models
import torch
import transformers
from flax import nnx

from wakea_jax import trainers
from wakea_jax.checkpoints import loader
from wakea_jax.config_files import get_config
from wakea_jax.data import chat
from wakea_jax.data.tokenizer import HFTokenizer
from wakea_jax.sampling.sampler import chat_sampler

PROMPT = [{"role": "user", "content": "What is 12 plus 30?"}]
# Batch and weights over 2 devices; full remat (the XLA:CPU-proof kind) on the real shapes.
SHARED = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 1, "model.remat_policy": "full"}
# Llama-3.2-1B's width (2,048, MLP 8,192) trains with LoRA: full AdamW at this width needs
# ~20 GB here, too close to the CI machine's 23.5 GiB; LoRA also exports PEFT adapters.
LORA = {"lora.enabled": True, "lora.rank": 8, "lora.alpha": 16.0, "export.adapter": True}


def _extra(kind):
  return LORA if kind == "llama3" else {}


def _sft_config(model_dir, kind):
  config = get_config("sft:test", **{
      "init_from": str(model_dir), "train.steps": 1, "train.checkpoint_every": 1,
      "data.seq_len": 160, "data.batch_size": 2, "optimizer.learning_rate": 1e-4,
      "optimizer.warmup_steps": 0, "export.enabled": True, "export.hf": True, **SHARED,
      **_extra(kind)})
  config.data.sources = (("task:arithmetic?n=32&seed=0&tools=1", 1.0),)
  config.data.eval_sources = ()   # evaluation is tested elsewhere; here it only costs time
  return config


def _grpo_config(sft_dir, kind):
  config = get_config("grpo:test", **{
      "init_from": str(sft_dir), "train.steps": 1, "train.checkpoint_every": 1,
      "rollout.group_size": 2, "rollout.max_new_tokens": 12, "rollout.max_tool_calls": 1,
      "rollout.max_tool_tokens": 48, "rl.prompts_per_step": 1, "export.enabled": True,
      "export.hf": True, "optimizer.learning_rate": 1e-5, **SHARED, **_extra(kind)})
  config.rollout.tools = ("calculator", )
  config.data.sources = "task:arithmetic?n=8&seed=100&max_operand=9&tools=1"
  config.data.eval_sources = ""   # as in SFT; stage_check runs our greedy sampler
  return config


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_import_sft_grpo_export_reload(kind, tmp_path):
  start, peaks = time.time(), {}
  for stages in CHILDREN:
    stage = "+".join(stages)
    child = subprocess.run([sys.executable, __file__, kind, str(tmp_path), stage],
                           capture_output=True, text=True, timeout=1400,
                           cwd=pathlib.Path(__file__).parents[1], env=CHILD_ENV)
    assert child.returncode == 0, (f"stage {stage}: exit {child.returncode}\n"
                                   + child.stdout[-3000:] + child.stderr[-6000:])
    peaks[stage] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_gb"]
  print(f"{kind}: import -> SFT -> GRPO -> export -> transformers in "
        f"{time.time() - start:.0f} s; peak RSS per stage (GB) {peaks}")


# One child process per training stage, so that each stage's peak memory is its own; the
# build (torch, freed before JAX allocates) shares the SFT stage's child and the check the
# GRPO stage's, saving two process starts.
CHILDREN = (("build", "sft"), ("grpo", "check"))
# Without the suite's persistent compilation cache (tests/conftest.py): these programs are
# compiled once each, and writing executables of a 151,936-row vocabulary to it only costs.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def stage_build(kind, tmp_path):
  real_models.build_model(kind, tmp_path / "hf", num_layers=2)   # with torch, as a user's


def stage_sft(kind, tmp_path):
  hf_dir = tmp_path / "hf"
  hf_config = json.loads((hf_dir / "config.json").read_text())
  assert HFTokenizer(hf_dir).vocab_size < hf_config["vocab_size"] or kind == "llama3"
  sft = trainers.run(_sft_config(hf_dir, kind), tmp_path / "sft")
  assert np.isfinite(sft["loss"])


def stage_grpo(kind, tmp_path):
  grpo = trainers.run(_grpo_config(tmp_path / "sft", kind), tmp_path / "grpo")
  assert np.isfinite(grpo["loss"]) and "reward_mean" in grpo
  rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
  assert any("tool_calls" in r for r in rows)   # rollouts ran through the tool loop


def stage_check(kind, tmp_path):
  if kind == "llama3":   # the LoRA runs also wrote PEFT adapters
    assert (tmp_path / "grpo" / "export" / "adapter" / "adapter_model.safetensors").is_file()
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  tokenizer = HFTokenizer(tmp_path / "hf")
  export = tmp_path / "grpo" / "export" / "hf"
  assert (export / "tokenizer.json").is_file()
  hf_tok = transformers.AutoTokenizer.from_pretrained(export)
  prompt_ids = chat.render(PROMPT, tokenizer, add_generation_prompt=True).input_ids.tolist()
  hf_ids = hf_tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
  hf_ids = list(hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids)
  assert hf_ids == prompt_ids

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  assert reloaded.config.vocab_size == hf_config["vocab_size"]
  ours = loader.load_model(tmp_path / "grpo")
  ids = np.asarray([prompt_ids], np.int32)
  our_logits = np.asarray(ours(jax.numpy.asarray(ids))[0])
  with torch.no_grad():
    their_logits = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(our_logits, their_logits[0], atol=2e-4, rtol=1e-4)

  # Same greedy tokens from our sampler and from transformers' generate.
  graphdef, params = nnx.split(ours)
  sampler = chat_sampler(graphdef, ours.config, tokenizer, temperature=0.0)
  ours_out = sampler.generate(params, [prompt_ids], max_new_tokens=8, rng=jax.random.key(0))
  with torch.no_grad():
    generated = reloaded.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=list(chat.chat_stop_ids(tokenizer)))
  theirs = generated[0, len(prompt_ids):].tolist()
  assert list(ours_out.tokens[0]) == theirs[:len(ours_out.tokens[0])]
  assert all(t < tokenizer.vocab_size for t in ours_out.tokens[0])


if __name__ == "__main__":
  import resource
  jax.config.update("jax_default_matmul_precision", "highest")
  for name in sys.argv[3].split("+"):
    globals()[f"stage_{name}"](sys.argv[1], pathlib.Path(sys.argv[2]))
  print(json.dumps({"peak_rss_gb": round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))
