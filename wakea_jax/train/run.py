"""SFT run from a config: model (scratch or imported) -> LoRA -> data -> train loop -> export.

`run(config, workdir)` is what `python -m wakea_jax.train` calls; tests call it directly.
Running it again on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from wakea_jax import config_lib
from wakea_jax.checkpoints import export as export_lib
from wakea_jax.checkpoints import hf
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.data import pipeline as pipeline_lib
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import lora as lora_lib
from wakea_jax.models import transformer
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import flops as flops_lib
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import optimizer as opt_lib
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib


def load_pretrained(path: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
                    rules: mesh_lib.Rules | None = None, **hf_overrides: Any
                    ) -> transformer.Transformer:
  """A Hugging Face directory (config.json; `hf_overrides` go to hf.load_model) or a
  wakea_jax model directory (model_config.json)."""
  path = pathlib.Path(path)
  if (path / "config.json").exists():
    return hf.load_model(path, mesh=mesh, rules=rules, **hf_overrides)
  if (path / "model_config.json").exists():
    return export_lib.load_model_dir(path, mesh=mesh, rules=rules)
  raise FileNotFoundError(f"{path}: neither a Hugging Face directory (config.json) nor a "
                          "wakea_jax model directory (model_config.json)")


def load_or_create_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                          rules: mesh_lib.Rules) -> transformer.Transformer:
  model_config = config_lib.model_config_from(config.model)
  if not config.init_from:
    return transformer.create_model(model_config, seed=config.seed, mesh=mesh, rules=rules)
  try:
    model = load_pretrained(config.init_from, mesh=mesh, rules=rules,
                            dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                            remat_policy=model_config.remat_policy,
                            value_head=model_config.value_head)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.init_from: {e}") from None
  logging.info("initialised from %s", config.init_from)
  return model


def build_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                rules: mesh_lib.Rules, *, tokenizer: Any = None
                ) -> tuple[transformer.Transformer, lora_lib.LoRAConfig | None]:
  """The model to train (scratch or imported) with LoRA adapters when config.lora asks."""
  model = load_or_create_model(config, mesh, rules)
  if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                     f"is {model.config.vocab_size} (config.model.vocab_size)")
  lora_config = lora_config_from(config)
  if lora_config is not None:
    model = lora_lib.apply_lora(model, lora_config, rngs=nnx.Rngs(config.seed))
    # Adapters are created on the default device; lay them out on the mesh like the rest.
    nnx.update(model, mesh_lib.shard_state(nnx.state(model), mesh, rules))
  return model, lora_config


def start_run_files(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                    model_config: Any) -> tuple[metrics_lib.MetricWriter, dict[str, Any]]:
  """Writes workdir/config.json and returns (metric writer, checkpoint meta) for a run."""
  (workdir / "config.json").write_text(config.to_json(indent=2))
  meta = {"model_config": model_config.to_dict(), "config": json.loads(config.to_json())}
  return metrics_lib.create_writer(workdir), meta


def run_train_loop(run_config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   model_config: Any, *, checkpoints: CheckpointManager, **loop_args: Any
                   ) -> tuple[state_lib.TrainState, dict[str, float]]:
  """`loop.train_loop` with the run's files, closing the checkpoints and writer after."""
  writer, meta = start_run_files(run_config, workdir, model_config)
  try:
    return loop_lib.train_loop(checkpoints=checkpoints, writer=writer, meta=meta, **loop_args)
  finally:
    checkpoints.close()
    writer.close()


def export_trained(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                   state: state_lib.TrainState, lora_config: lora_lib.LoRAConfig | None,
                   directory: pathlib.Path) -> None:
  """Writes the trained model (LoRA merged) to directory/model and, with config.export.hf,
  an HF checkpoint to directory/hf; a previous export there is replaced."""
  if not config.export.enabled:
    return
  if jax.process_count() > 1:
    logging.warning("export after training is single-host only for now; skipped. Convert the "
                    "final checkpoint with python -m wakea_jax.convert on one host.")
    return
  model = nnx.merge(graphdef, state.params, state.frozen)
  if lora_config is not None:
    model = lora_lib.merge_lora(model)
  export_lib.save_model_dir(model, directory / "model")
  if config.export.get("hf", False):
    hf.save_model(model, directory / "hf")
  logging.info("exported to %s", directory)


def lora_config_from(config: ml_collections.ConfigDict) -> lora_lib.LoRAConfig | None:
  if not config.lora.enabled:
    return None
  values = config.lora.to_dict()
  values.pop("enabled")
  values["targets"] = tuple(values["targets"])
  values["quantize_base"] = values.get("quantize_base") or None
  return lora_lib.LoRAConfig(**values)


def pipeline_config_from(config: ml_collections.ConfigDict, *, eval_split: bool = False
                         ) -> pipeline_lib.PipelineConfig:
  data = config.data
  sources = data.eval_sources if eval_split else data.sources
  return pipeline_lib.PipelineConfig(
      sources=tuple(pipeline_lib.SourceSpec(str(s), float(w)) for s, w in sources),
      seq_len=data.seq_len,
      batch_size=data.eval_batch_size if eval_split else data.batch_size,
      seed=data.seed + (1 if eval_split else 0),
      packing=data.packing,
      overlength=data.overlength,
  )


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains (or resumes) per `config` in `workdir`; returns the last logged metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = config_lib.mesh_from(config)
  rules = config_lib.rules_from(config)
  tokenizer = (tokenizer_lib.load_tokenizer(config.tokenizer) if config.tokenizer
               else tokenizer_lib.default_tokenizer())

  model, lora_config = build_model(config, mesh, rules, tokenizer=tokenizer)
  model_config = model.config
  trainable = lora_lib.trainable_filter(lora_config)

  loop_config = loop_lib.LoopConfig(**config.train.to_dict())
  optimizer_config = opt_lib.OptimizerConfig(**config.optimizer.to_dict())
  optimizer = opt_lib.make_optimizer(optimizer_config, loop_config.steps)
  schedule = opt_lib.learning_rate_schedule(optimizer_config, loop_config.steps)
  graphdef, state = state_lib.create_train_state(model, optimizer, trainable=trainable,
                                                 seed=config.seed)
  del model
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
  logging.info("trainable parameters %.3fM, frozen %.3fM", n_trainable / 1e6, n_frozen / 1e6)

  loss_fn = step_lib.sft_loss_fn
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, optimizer, loss_fn, accum_steps=config.grad_accum,
                               schedule=schedule),
      state_lib.state_shardings(state))
  eval_step = step_lib.make_eval_step(graphdef, loss_fn)

  train_iter = pipeline_lib.build_pipeline(pipeline_config_from(config), tokenizer)
  eval_batches = (pipeline_lib.make_eval_batches(pipeline_config_from(config, eval_split=True),
                                                 tokenizer, num_batches=config.data.eval_batches)
                  if config.data.eval_sources else [])

  per_token = (flops_lib.lora_train_flops_per_token if lora_config
               else flops_lib.train_flops_per_token)(model_config, config.data.seq_len)
  checkpoints = CheckpointManager(workdir / "checkpoints", keep=loop_config.keep_checkpoints,
                                  best_metric="eval_loss" if eval_batches else None,
                                  async_save=loop_config.async_checkpoint)
  state, last = run_train_loop(
      config, workdir, model_config, checkpoints=checkpoints, state=state,
      train_step=train_step, eval_step=eval_step, train_iter=train_iter,
      eval_batches=eval_batches, config=loop_config, mesh=mesh, rules=rules,
      flops_per_token=per_token)
  stats = getattr(train_iter, "stats", None)
  if stats is not None:
    logging.info("data: %s", stats)

  export_trained(config, graphdef, state, lora_config, workdir / "export")
  return last
