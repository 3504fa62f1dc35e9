r"""Quick-start demo binary: model + tokenizer + chat format + sharding + HF export, end to end.

  python -m wakea_jax.demo --config=configs/demo.py --workdir=/tmp/wakea_demo

It builds the configured model directly sharded on the mesh, renders the bundled chat
examples (tool calls, tool results, think blocks) into token ids with assistant-only loss
masks, runs a jitted forward + masked next-token loss, times it, then exports the model as a
Hugging Face checkpoint, re-imports it and checks the logits agree.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from wakea_jax import config_lib
from wakea_jax.checkpoints import hf
from wakea_jax.data import chat
from wakea_jax.data import sources
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import transformer
from wakea_jax.objectives.sft import sft_loss
from wakea_jax.parallel import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/demo.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/wakea_demo", "Where the HF export goes.")

_BUNDLED_CHATS = pathlib.Path(__file__).parent / "data" / "assets" / "demo_chats.jsonl"


def load_chats(path: pathlib.Path) -> list[list[dict]]:
  conversations = []
  for line_no, record in sources.jsonl_lines(path):
    if isinstance(record, Exception):
      raise record
    if not isinstance(record, dict) or "messages" not in record:
      raise ValueError(f"{path}:{line_no}: field 'messages' is missing")
    conversations.append(record["messages"])
  if not conversations:
    raise ValueError(f"{path}: no conversations")
  return conversations


def make_batch(conversations: list[list[dict]], tok: tokenizer_lib.Tokenizer, batch_size: int,
               seq_len: int) -> dict[str, np.ndarray]:
  """Renders chats and right-pads them (cycling through the data) into one batch."""
  ids = np.full((batch_size, seq_len), tok.pad_id if tok.pad_id is not None else 0, np.int32)
  loss_mask = np.zeros((batch_size, seq_len), np.float32)
  attention_mask = np.zeros((batch_size, seq_len), np.int32)
  for row in range(batch_size):
    rendered = chat.render(conversations[row % len(conversations)], tok)
    n = min(len(rendered.input_ids), seq_len)
    ids[row, :n] = rendered.input_ids[:n]
    loss_mask[row, :n] = rendered.loss_mask[:n]
    attention_mask[row, :n] = 1
  return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  model_config = config_lib.model_config_from(config.model)
  tok = (tokenizer_lib.load_tokenizer(config.tokenizer) if config.tokenizer
         else tokenizer_lib.default_tokenizer())
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_config.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({tok.vocab_size})")
  mesh = config_lib.mesh_from(config)
  rules = config_lib.rules_from(config)
  logging.info("mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)

  model = transformer.create_model(model_config, seed=config.seed, mesh=mesh, rules=rules)
  graphdef, state = nnx.split(model)
  n_params = transformer.count_params(model)
  logging.info("model: %s, %.2fM parameters", config.preset, n_params / 1e6)

  conversations = load_chats(pathlib.Path(config.data) if config.data else _BUNDLED_CHATS)
  batch = make_batch(conversations, tok, config.batch_size, config.seq_len)
  batch = mesh_lib.shard_batch(batch, mesh, rules)

  @jax.jit
  def forward_loss(state, batch):
    logits = transformer.apply(graphdef, state, batch["input_ids"],
                               attention_mask=batch["attention_mask"])
    ids, mask = batch["input_ids"], batch["loss_mask"]
    total, sums = sft_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    count = sums["tokens"]
    return total / jnp.maximum(count, 1.0), count

  with mesh_lib.logical_rules(mesh, rules):
    start = time.perf_counter()
    loss, count = jax.block_until_ready(forward_loss(state, batch))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(config.timing_steps):
      loss, count = jax.block_until_ready(forward_loss(state, batch))
    step_s = (time.perf_counter() - start) / max(config.timing_steps, 1)
  tokens = config.batch_size * config.seq_len
  results = {
      "params_m": n_params / 1e6,
      "loss": float(loss),
      "uniform_loss": float(np.log(model_config.vocab_size)),
      "assistant_tokens": float(count),
      "compile_s": compile_s,
      "forward_tokens_per_s": tokens / step_s,
  }
  print(f"model {config.preset}: {n_params / 1e6:.2f}M params on mesh {dict(mesh.shape)}")
  print(f"assistant-token loss at init: {results['loss']:.4f} "
        f"(uniform would be {results['uniform_loss']:.4f}) over {int(count)} tokens")
  print(f"jitted forward: compile {compile_s:.2f}s, {tokens / step_s:,.0f} tokens/s")

  if config.export_hf:
    out = pathlib.Path(workdir) / "hf_export"
    hf.save_model(model, out)
    reloaded = hf.load_model(out, dtype=model_config.dtype)
    g2, s2 = nnx.split(reloaded)
    ids = np.asarray(batch["input_ids"])[:2, :64]
    apply = jax.jit(transformer.apply, static_argnums=0)
    diff = float(jnp.max(jnp.abs(apply(graphdef, state, ids) - apply(g2, s2, ids))))
    results["export_roundtrip_max_abs"] = diff
    print(f"exported Hugging Face checkpoint to {out}; re-imported logits max |diff| = {diff:.2e}")
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
