"""Preference-optimisation run (DPO / IPO / SimPO / ORPO) from a config.

Mirrors train/run.py (and reuses its helpers): model from config.init_from or scratch,
optional LoRA, AdamW, the objective-agnostic train_loop with checkpoints and exact resume,
evaluation on config.data.eval_sources, export at the end. What differs:

* data are preference pairs (data/preferences.py) held in memory and tokenised once;
* for losses with a reference (dpo, ipo) the reference log-probs of every train and eval
  pair are computed once, before the first step, under the initial model (with LoRA: the
  base, the adapters being zero), and attached to each batch by pair index. A resumed run
  recomputes them from the same initial model (same config and seed), so they are identical;
* eval_loss is the preference loss per pair and eval_accuracy the reward accuracy (the
  fraction of pairs whose implicit reward margin is > 0); the train log's `accuracy` too.

`python -m wakea_jax.train --config=configs/dpo.py:test --workdir=...` calls `run`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wakea_jax import config_lib
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.data import preferences as pref_lib
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import lora as lora_lib
from wakea_jax.objectives import dpo
from wakea_jax.train import flops as flops_lib
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import optimizer as opt_lib
from wakea_jax.train import run as run_lib
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib


def preference_config_from(config: ml_collections.ConfigDict) -> dpo.PreferenceConfig:
  return dpo.PreferenceConfig(**config.preference.to_dict())


def _source_specs(sources: Iterable) -> list[str]:
  """config.data.sources entries: a path/task spec, or a (spec, weight) pair (weight unused:
  pairs from all sources are pooled)."""
  return [str(s[0]) if isinstance(s, (tuple, list)) else str(s) for s in sources]


def preference_accuracy(graphdef: nnx.GraphDef, params: nnx.State | tuple[nnx.State, ...],
                        batches: Iterable[Mapping[str, np.ndarray]]) -> float:
  """Fraction of pairs where the policy's summed log-prob of chosen exceeds rejected's.

  No reference; `params` is one state or a tuple (e.g. (params, frozen)) merged with
  `graphdef`. Padding rows (pair_mask 0) are not counted.
  """
  states = tuple(params) if isinstance(params, (tuple, list)) else (params,)

  @jax.jit
  def wins(states, batch):
    model = nnx.merge(graphdef, *states)
    model.eval()
    pc, pr, _, _ = dpo.pair_logps(model, batch)
    return pc > pr

  correct = total = 0.0
  for batch in batches:
    fields = {f: jnp.asarray(batch[f]) for f in dpo.PAIR_FIELDS}
    won = np.asarray(jax.device_get(wins(states, fields)), np.float32)
    mask = np.asarray(batch.get("pair_mask", np.ones_like(won)), np.float32)
    correct += float(np.sum(won * mask))
    total += float(np.sum(mask))
  return correct / total if total else float("nan")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the last logged metrics."""
  if not config.data.sources:
    raise ValueError("config.data.sources is empty: give preference pair files, e.g. "
                     "--config.data.sources='(\"pairs.jsonl\",)' (records with prompt/messages, "
                     "chosen and rejected; see wakea_jax/data/preferences.py)")
  pref_config = preference_config_from(config)
  if config.data.batch_size % config.grad_accum:
    raise ValueError(f"data.batch_size={config.data.batch_size} pairs must be divisible by "
                     f"grad_accum={config.grad_accum} (micro-batches split pairs, not rows)")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = config_lib.mesh_from(config)
  rules = config_lib.rules_from(config)
  tokenizer = (tokenizer_lib.load_tokenizer(config.tokenizer) if config.tokenizer
               else tokenizer_lib.default_tokenizer())

  model, lora_config = run_lib.build_model(config, mesh, rules, tokenizer=tokenizer)
  model_config = model.config
  trainable = lora_lib.trainable_filter(lora_config)

  loop_config = loop_lib.LoopConfig(**config.train.to_dict())
  optimizer_config = opt_lib.OptimizerConfig(**config.optimizer.to_dict())
  optimizer = opt_lib.make_optimizer(optimizer_config, loop_config.steps)
  schedule = opt_lib.learning_rate_schedule(optimizer_config, loop_config.steps)
  graphdef, state = state_lib.create_train_state(model, optimizer, trainable=trainable,
                                                 seed=config.seed)
  del model

  data = config.data
  train_set = pref_lib.load_dataset(_source_specs(data.sources), tokenizer,
                                    seq_len=data.seq_len, overlength=data.overlength)
  eval_set = (pref_lib.load_dataset(_source_specs(data.eval_sources), tokenizer,
                                    seq_len=data.seq_len, overlength=data.overlength)
              if data.eval_sources else None)
  logging.info("preference pairs: train %s%s", train_set.stats,
               f", eval {eval_set.stats}" if eval_set is not None else "")

  checkpoints = CheckpointManager(workdir / "checkpoints", keep=loop_config.keep_checkpoints,
                                  best_metric="eval_loss" if eval_set is not None else None,
                                  async_save=loop_config.async_checkpoint)
  latest = checkpoints.latest_step()
  finished = latest is not None and latest >= loop_config.steps
  if pref_config.needs_reference and not finished:
    # The reference is the initial model: computed before any step, also on resume (the
    # initial model is rebuilt from the same config and seed).
    reference = (state.params, state.frozen)
    for dataset in (train_set, eval_set):
      if dataset is not None:
        pref_lib.attach_reference(dataset, graphdef, reference, data.eval_batch_size)

  loss_fn = dpo.make_loss_fn(pref_config)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, optimizer, loss_fn, accum_steps=config.grad_accum,
                               schedule=schedule),
      state_lib.state_shardings(state))
  eval_step = step_lib.make_eval_step(graphdef, loss_fn)
  train_iter = pref_lib.PreferenceIterator(train_set, data.batch_size, seed=data.seed)
  eval_batches = (eval_set.batches(data.eval_batch_size, num_batches=data.eval_batches or None)
                  if eval_set is not None else [])

  # The loop counts the tokens of input_ids, which hold both sides of every pair.
  per_token = (flops_lib.lora_train_flops_per_token if lora_config
               else flops_lib.train_flops_per_token)(model_config, data.seq_len)
  state, last = run_lib.run_train_loop(
      config, workdir, model_config, checkpoints=checkpoints, state=state,
      train_step=train_step, eval_step=eval_step, train_iter=train_iter,
      eval_batches=eval_batches, config=loop_config, mesh=mesh, rules=rules,
      flops_per_token=per_token)
  logging.info("data: %s", train_iter.stats)

  run_lib.export_trained(config, graphdef, state, lora_config, workdir / "export")
  return last
