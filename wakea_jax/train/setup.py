"""The one run setup: typed run config -> mesh, tokenizer, model (+ LoRA, + value head),
optimizer, train state and the jitted train step; plus the run's files and its export.

Every runner (SFT `train/sft.py`, preference `train/preference.py`, RL `rl/learner.py`) is
a thin composition of `setup(...)`, its loss function and the shared loop
(`train/loop.py`); a new objective adds a loss and a config, not a copy of this sequence.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.experimental import multihost_utils

from wakea_jax.checkpoints import adapters as adapters_lib
from wakea_jax.checkpoints import export as export_lib
from wakea_jax.checkpoints import hf, loader
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data.config import DataConfig
from wakea_jax.models import lora as lora_lib
from wakea_jax.models import transformer
from wakea_jax.models.config import ModelConfig
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling.sampler import check_vocab
from wakea_jax.train import flops as flops_lib
from wakea_jax.train import hf_export
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import optimizer as opt_lib
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib
from wakea_jax.train.loop import TrainConfig

_EXPORT_TIMEOUT_S = 6 * 3600  # how long other processes wait for process 0's export


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """config.export: the final model goes to workdir/export/model (LoRA merged). With `hf`, a
  Hugging Face checkpoint goes to workdir/export/hf, with the run's tokenizer files, chat
  template and a generation_config.json (`train/hf_export.py`), loadable by transformers'
  Auto classes as it is. With `adapter` (LoRA / QLoRA runs), the adapters alone go to
  workdir/export/adapter in PEFT's layout (`checkpoints/adapters.py`), for
  `peft.PeftModel.from_pretrained` on the HF model the run imported. On several processes
  the parameters are gathered to every host and process 0 writes (`export_trained`)."""

  enabled: bool = True
  hf: bool = False
  adapter: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The sections every runner shares (see configs/common.py); objective-specific sections
  (preference, rl, rollout, loss, ppo, eval, reward) go to their runner beside it."""

  model: ModelConfig
  objective: str = "sft"
  seed: int = 0
  mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig()
  sharding_rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
  init_from: str = ""      # HF dir, wakea_jax model dir or run workdir; empty: from scratch
  tokenizer: str = ""      # .model / tokenizer.json / HF dir; empty: init_from's, else bundled
  grad_accum: int = 1
  data: DataConfig = DataConfig()
  optimizer: opt_lib.OptimizerConfig = opt_lib.OptimizerConfig()
  train: TrainConfig = TrainConfig()
  lora: lora_lib.LoRAConfig | None = None
  export: ExportConfig = ExportConfig()
  # The configuration as the user gave it (JSON), written to workdir/config.json and into
  # every checkpoint's metadata.
  record: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self) -> None:
    if self.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
    if self.export.adapter and self.lora is None:
      raise ValueError("config.export.adapter exports LoRA adapters: it needs "
                       "config.lora.enabled=True")


@dataclasses.dataclass
class Setup:
  """What `setup` built. `state` is the (initial, or to-be-restored) train state."""

  run: RunConfig
  mesh: jax.sharding.Mesh
  rules: mesh_lib.Rules
  tokenizer: tokenizer_lib.Tokenizer
  model_config: ModelConfig
  graphdef: nnx.GraphDef
  state: state_lib.TrainState
  optimizer: optax.GradientTransformation
  train_step: Any            # jitted, donated: (state, batch) -> (state, metric sums)
  loss_fn: step_lib.LossFn
  total_updates: int         # optimizer steps over the whole run (the schedule's length)

  def eval_step(self) -> Any:
    """Jitted (params, frozen, batch) -> metric sums of `loss_fn` (no dropout)."""
    return step_lib.make_eval_step(self.graphdef, self.loss_fn)

  def policy_params(self, state: state_lib.TrainState | None = None) -> nnx.State:
    """One state (trainable + frozen) that merges with `graphdef` into the model."""
    state = self.state if state is None else state
    return nnx.merge_state(state.params, state.frozen)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the model (LoRA-aware) at `seq_len`."""
    per_token = (flops_lib.lora_train_flops_per_token if self.run.lora
                 else flops_lib.train_flops_per_token)
    return per_token(self.model_config, seq_len)


def add_value_head(model: transformer.Transformer, seed: int, mesh: jax.sharding.Mesh,
                   rules: mesh_lib.Rules) -> transformer.Transformer:
  """The same model with a freshly initialised value head (zero output at the start)."""
  config = dataclasses.replace(model.config, value_head=True)
  fresh = transformer.create_model(config, seed=seed, mesh=mesh, rules=rules)
  fresh.value_head[...] = jnp.zeros_like(fresh.value_head[...])
  nnx.update(fresh, nnx.state(model))
  return fresh


def build_model(run: RunConfig, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules, *,
                tokenizer: tokenizer_lib.Tokenizer | None = None, value_head: bool = False
                ) -> transformer.Transformer:
  """The model to train: from `run.init_from` (any checkpoint kind) or from scratch, with a
  value head when asked (added zero-initialised if missing) and LoRA adapters per run.lora."""
  model_config = run.model
  if not run.init_from:
    model = transformer.create_model(model_config, seed=run.seed, mesh=mesh, rules=rules)
  else:
    try:
      model = loader.load_model(run.init_from, mesh=mesh, rules=rules,
                                dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                                remat_policy=model_config.remat_policy,
                                value_head=model_config.value_head,
                                scan_layers=model_config.scan_layers)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.init_from: {e}") from None
    logging.info("initialised from %s", run.init_from)
  if tokenizer is not None:
    check_vocab(tokenizer, model.config,
                model_source=(f"config.init_from {run.init_from}" if run.init_from
                              else "config.model"))
  if value_head and not model.config.value_head:
    if run.lora is not None:
      raise ValueError("a value head cannot be added under LoRA: start from a model that "
                       "already has one")
    model = add_value_head(model, run.seed, mesh, rules)
  if run.lora is not None:
    model = lora_lib.apply_lora(model, run.lora, rngs=nnx.Rngs(run.seed))
    # Adapters are created on the default device; lay them out on the mesh like the rest.
    nnx.update(model, mesh_lib.shard_state(nnx.state(model), mesh, rules))
  return model


ModelBuilder = Callable[[RunConfig, jax.sharding.Mesh, mesh_lib.Rules, tokenizer_lib.Tokenizer],
                       tuple[nnx.Module, Any]]


def setup(run: RunConfig, loss_fn: step_lib.LossFn, *, total_updates: int | None = None,
          value_head: bool = False, build: ModelBuilder | None = None) -> Setup:
  """Builds everything a run needs up to (and including) the jitted train step.

  `total_updates` is the number of optimizer steps (default `run.train.steps`), which sets
  the learning-rate schedule's length. `build(run, mesh, rules, tokenizer) -> (model, what
  it trains)` replaces `build_model` and its trainable filter: a multimodal run
  (train/multimodal.py) builds its vision- or audio-language model there; `model_config`
  is then the text decoder's.
  """
  mesh = run.mesh.create()
  rules = mesh_lib.normalize_rules(run.sharding_rules)
  # An imported model brings its own tokenizer (and chat template) unless one is named.
  tokenizer = tokenizer_lib.tokenizer_from(run.tokenizer or loader.tokenizer_path(run.init_from))
  if build is None:
    model = build_model(run, mesh, rules, tokenizer=tokenizer, value_head=value_head)
    trainable = lora_lib.trainable_filter(run.lora)
    model_config = model.config
  else:
    model, trainable = build(run, mesh, rules, tokenizer)
    model_config = getattr(model.config, "text", model.config)
  total_updates = total_updates or run.train.steps
  optimizer = opt_lib.make_optimizer(run.optimizer, total_updates)
  schedule = opt_lib.learning_rate_schedule(run.optimizer, total_updates)
  graphdef, state = state_lib.create_train_state(model, optimizer, trainable=trainable,
                                                 seed=run.seed)
  del model
  _log_parameters(state)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, optimizer, loss_fn, accum_steps=run.grad_accum,
                               schedule=schedule),
      state_lib.state_shardings(state))
  return Setup(run=run, mesh=mesh, rules=rules, tokenizer=tokenizer, model_config=model_config,
               graphdef=graphdef, state=state, optimizer=optimizer, train_step=train_step,
               loss_fn=loss_fn, total_updates=total_updates)


def _log_parameters(state: state_lib.TrainState) -> None:
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  n_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
  logging.info("trainable parameters %.3fM, frozen %.3fM", n_trainable / 1e6, n_frozen / 1e6)
  if jax.process_index() == 0:
    table = parameter_overview.get_parameter_overview(nnx.to_pure_dict(state.params),
                                                      include_stats=False)
    logging.info("trainable parameters:\n%s", table)


def checkpoint_manager(run: RunConfig, workdir: pathlib.Path, *, best_metric: str | None,
                       best_mode: str = "min") -> CheckpointManager:
  """The run's orbax manager under workdir/checkpoints, with run.train's retention."""
  return CheckpointManager(workdir / "checkpoints", keep=run.train.keep_checkpoints,
                           best_metric=best_metric, best_mode=best_mode,
                           async_save=run.train.async_checkpoint)


def start_run_files(run: RunConfig, workdir: pathlib.Path, model_config: ModelConfig
                    ) -> tuple[metrics_lib.MetricWriter, dict[str, Any]]:
  """Writes workdir/config.json (process 0: the workdir is shared); returns (metric writer,
  checkpoint metadata)."""
  record = dict(run.record)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
  meta = {"model_config": model_config.to_dict(), "config": record}
  return metrics_lib.create_writer(workdir), meta


def export_trained(built: Setup, state: state_lib.TrainState, directory: pathlib.Path) -> None:
  """Writes the trained model (LoRA merged) to directory/model; with run.export.hf, an HF
  checkpoint with the run's tokenizer to directory/hf; with run.export.adapter, the LoRA
  adapters in PEFT's layout to directory/adapter. A previous export there is replaced.

  On several processes (a collective: every process calls it) the sharded parameters are
  gathered to every host; process 0 writes from its copy, laid on one local device so that
  LoRA merging runs there alone, while the others wait for it at a barrier.
  """
  if not built.run.export.enabled:
    return
  write_on_process0(state, lambda params, frozen: _export(built, params, frozen, directory))


def write_on_process0(state: state_lib.TrainState,
                      write: Callable[[nnx.State, nnx.State], Any]) -> Any:
  """Calls `write(params, frozen)` with the whole, unsharded model and returns its result on
  process 0 (None elsewhere). On several processes (a collective: every process calls it) the
  sharded parameters are gathered to every host; process 0 writes from its copy, laid on one
  local device so that LoRA merging runs there alone, while the others wait for it at a
  barrier, which releases them also when writing fails (the error is raised on process 0)."""
  params, frozen = state.params, state.frozen
  if jax.process_count() == 1:
    return write(params, frozen)
  params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
  if jax.process_index() != 0:
    _export_barrier()
    return None
  try:
    return write(*jax.device_put((params, frozen), jax.local_devices()[0]))
  finally:
    _export_barrier()


def _export_barrier() -> None:
  # The coordination service's barrier, not a device collective: writing a large HF export
  # can take far longer than a collective's timeout.
  ocp.multihost.sync_global_processes("wakea_export", timeout=_EXPORT_TIMEOUT_S)


def _export(built: Setup, params: nnx.State, frozen: nnx.State, directory: pathlib.Path
            ) -> None:
  run = built.run
  model = nnx.merge(built.graphdef, params, frozen)
  if run.lora is not None and run.export.adapter:
    base = hf_export.hf_base_model(run.init_from)
    if base is None:
      logging.warning("config.init_from %r is not an HF directory: the PEFT adapters' base is "
                      "its conversion (python -m wakea_jax.convert --to_hf)", run.init_from)
    adapters_lib.save_peft_adapter(model, run.lora, directory / "adapter",
                                   base_model_name_or_path=base)
  if run.lora is not None:
    model = lora_lib.merge_lora(model)
  export_lib.save_model_dir(model, directory / "model")
  if run.export.hf:
    hf.save_model(model, directory / "hf",
                  files=hf_export.side_files(built.tokenizer, model.config,
                                             init_from=run.init_from))
  logging.info("exported to %s", directory)
