"""The RL learner: prompts -> sampler (G completions, tool loop) -> rewards -> advantages ->
jitted updates -> metrics -> checkpoints; resumable like SFT.

    python -m wakea_jax.train --config=configs/grpo.py:arithmetic --workdir=/tmp/grpo
    python -m wakea_jax.train --config=configs/ppo.py:arithmetic --workdir=/tmp/ppo

One RL step:
  1. rollout   `rollout.prompts_per_step` prompts x `rollout.group_size` completions from
               the current policy (jitted prefill + while_loop decode; with tools, the tool
               loop runs each call and injects its result into that row's cache).
  2. reward    host-side rewards per completion (`rewards.build_reward(config.reward)`).
               DAPO dynamic sampling (arXiv 2503.14476 §3.2): groups whose rewards do not
               vary carry no GRPO signal; they are dropped and more prompts are sampled, up
               to `rl.max_sampling_rounds` rounds; groups still missing are filled with
               dropped ones whose loss mask is zeroed. DAPO overlong filtering masks
               truncated completions out of the loss.
  3. score     the trainer's log-probs of the sampled tokens under the current (behaviour)
               params -> `old_logprobs`; the reference model's when a KL term is on (the
               reference is the initial policy; with kl_beta = 0 none is kept).
  4. update    `rl.num_iterations` passes over the rollouts, each in `rl.minibatches`
               shuffled minibatches, one optimizer step each (the jitted, donated step of
               train/step.py with the GRPO or PPO loss).
Checkpoints hold the train state and the prompt iterator's position; the rollout RNG is
derived from (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wakea_jax import config_lib
from wakea_jax import toolbox
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.models import lora as lora_lib
from wakea_jax.models import transformer
from wakea_jax.objectives import grpo as grpo_lib
from wakea_jax.objectives import ppo as ppo_lib
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.rl import advantages as adv_lib
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl import update as update_lib
from wakea_jax.sampling.sampler import Sampler
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import optimizer as opt_lib
from wakea_jax.train import run as run_lib
from wakea_jax.train import state as state_lib
from wakea_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class RLConfig:
  steps: int = 100
  prompts_per_step: int = 16
  num_iterations: int = 1          # passes over each batch of rollouts (GRPO's mu)
  minibatches: int = 1             # optimizer steps per pass
  advantage: str = "grpo"          # rl/advantages.py: grpo | dr_grpo | rloo
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 3
  overlong_filter: bool = False
  log_every: int = 1
  eval_every: int = 25
  checkpoint_every: int = 25
  keep_checkpoints: int = 2
  async_checkpoint: bool = True

  def __post_init__(self) -> None:
    for name in ("steps", "prompts_per_step", "num_iterations", "minibatches",
                 "max_sampling_rounds", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
    if self.advantage not in adv_lib.ADVANTAGE_ESTIMATORS:
      raise ValueError(f"rl.advantage={self.advantage!r} is not one of "
                       f"{sorted(adv_lib.ADVANTAGE_ESTIMATORS)}")


def sampling_ids(tokenizer: tokenizer_lib.Tokenizer) -> tuple[tuple[int, ...], int]:
  """(stop ids: end of turn and eos, pad id) for chat rollouts."""
  stop_ids = tuple(i for i in (tokenizer.token_to_id(tokenizer_lib.IM_END), tokenizer.eos_id)
                   if i is not None and i >= 0)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
  return stop_ids, pad_id


def router_from(config: ml_collections.ConfigDict) -> toolbox.Router | None:
  """The tool router for `config.rollout.tools` (None: rollouts without tools)."""
  tools = tuple(config.rollout.tools)
  return toolbox.default_router(enabled=tools) if tools else None


def correctness_fn(config: ml_collections.ConfigDict) -> eval_lib.CorrectFn:
  """samples -> [n] raw values of the reward named by config.eval.correct_reward."""
  reward = rewards_lib.build_reward({config.eval.correct_reward: {"weight": 1.0}})
  return lambda samples: reward(samples)[0]


def eval_config_from(config: ml_collections.ConfigDict) -> eval_lib.EvalConfig:
  e = config.eval
  return eval_lib.EvalConfig(num_samples=e.num_samples, pass_k=tuple(e.pass_k),
                             temperature=e.temperature)


def rollout_config_from(config: ml_collections.ConfigDict) -> rollout_lib.RolloutConfig:
  names = {f.name for f in dataclasses.fields(rollout_lib.RolloutConfig)}
  return rollout_lib.RolloutConfig(
      **{k: v for k, v in config.rollout.to_dict().items() if k in names})


def add_value_head(model: transformer.Transformer, seed: int, mesh: jax.sharding.Mesh,
                   rules: mesh_lib.Rules) -> transformer.Transformer:
  """The same model with a freshly initialised value head (zero output at the start)."""
  config = dataclasses.replace(model.config, value_head=True)
  fresh = transformer.create_model(config, seed=seed, mesh=mesh, rules=rules)
  fresh.value_head[...] = jnp.zeros_like(fresh.value_head[...])
  nnx.update(fresh, nnx.state(model))
  return fresh


class Learner:
  """Holds everything one RL run needs; `run()` below drives it from a config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir
    self.objective = config.objective
    if self.objective not in ("grpo", "ppo"):
      raise ValueError(f"config.objective must be 'grpo' or 'ppo', got {self.objective!r}")
    self.mesh = config_lib.mesh_from(config)
    self.rules = config_lib.rules_from(config)
    self.rl = RLConfig(**config.rl.to_dict())
    self.rollout_config = rollout_config_from(config)
    self.loss_config = grpo_lib.PolicyLossConfig(**config.loss.to_dict())
    self.ppo_config = (ppo_lib.PPOConfig(**config.ppo.to_dict())
                       if self.objective == "ppo" else None)
    if self.ppo_config is not None:
      # The value loss is a token mean; the policy loss must share its denominator, and the
      # KL to the reference is a reward penalty in PPO (ppo.kl_beta), not a loss term.
      if self.loss_config.aggregation != "token_mean":
        raise ValueError("PPO needs loss.aggregation='token_mean', got "
                         f"{self.loss_config.aggregation!r}")
      if self.loss_config.kl_beta:
        raise ValueError("PPO puts the KL in the reward: set ppo.kl_beta, not loss.kl_beta")
    self.tokenizer = (tokenizer_lib.load_tokenizer(config.tokenizer) if config.tokenizer
                      else tokenizer_lib.default_tokenizer())
    self._build_model()
    self._build_sampling()
    self.reward = rewards_lib.build_reward(config.reward.to_dict())
    self.correct = correctness_fn(config)
    self.prompts = prompts_lib.PromptIterator(prompts_lib.load_prompts(config.data.prompts),
                                              self.rl.prompts_per_step, seed=config.seed)
    self.eval_prompts = (prompts_lib.load_prompts(config.data.eval_prompts)
                         if config.data.eval_prompts else [])

  # ------------------------------------------------------------------------------------
  # Construction
  # ------------------------------------------------------------------------------------

  def _build_model(self) -> None:
    config = self.config
    model, lora_config = run_lib.build_model(config, self.mesh, self.rules,
                                             tokenizer=self.tokenizer)
    if self.objective == "ppo" and not model.config.value_head:
      if lora_config is not None:
        raise ValueError("PPO with LoRA needs a model that already has a value head")
      model = add_value_head(model, config.seed, self.mesh, self.rules)
    self.model_config = model.config
    self.lora_config = lora_config
    rl = self.rl
    self.total_updates = rl.steps * rl.num_iterations * rl.minibatches
    optimizer_config = opt_lib.OptimizerConfig(**config.optimizer.to_dict())
    optimizer = opt_lib.make_optimizer(optimizer_config, self.total_updates)
    schedule = opt_lib.learning_rate_schedule(optimizer_config, self.total_updates)
    self.graphdef, self.state = state_lib.create_train_state(
        model, optimizer, trainable=lora_lib.trainable_filter(lora_config), seed=config.seed)
    del model
    # The reference policy is the initial one; kept only when a KL term needs it.
    kl_beta = self.ppo_config.kl_beta if self.ppo_config else self.loss_config.kl_beta
    self.reference = (jax.tree.map(jnp.copy, self.state.params) if kl_beta > 0 else None)
    if self.objective == "ppo":
      loss_fn = functools.partial(update_lib.ppo_loss_fn, loss_config=self.loss_config,
                                  ppo_config=self.ppo_config)
    else:
      loss_fn = functools.partial(update_lib.policy_loss_fn, loss_config=self.loss_config)
    self.train_step = step_lib.jit_train_step(
        step_lib.make_train_step(self.graphdef, optimizer, loss_fn,
                                 accum_steps=config.grad_accum, schedule=schedule),
        state_lib.state_shardings(self.state))
    self.score = update_lib.make_score_fn(self.graphdef)

  def _build_sampling(self) -> None:
    r = self.config.rollout
    self.stop_ids, self.pad_id = sampling_ids(self.tokenizer)
    self.sampler = Sampler(self.graphdef, self.model_config, temperature=r.temperature,
                           top_k=r.top_k, top_p=r.top_p, stop_ids=self.stop_ids,
                           pad_id=self.pad_id, chunk_steps=r.chunk_steps)
    self.router = router_from(self.config)

  def policy_params(self) -> nnx.State:
    """One state (trainable + frozen) for the sampler, which merges with the same graphdef."""
    return nnx.merge_state(self.state.params, self.state.frozen)

  # ------------------------------------------------------------------------------------
  # One step
  # ------------------------------------------------------------------------------------

  def collect(self, step: int) -> tuple[rollout_lib.Rollouts, np.ndarray, dict[str, np.ndarray],
                                        np.ndarray, dict[str, float]]:
    """Rollouts with rewards; (rollouts, total [n], components, group_keep [P], stats)."""
    rl, g = self.rl, self.rollout_config.group_size
    params = self.policy_params()
    key = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
    parts: list[rollout_lib.Rollouts] = []
    totals: list[np.ndarray] = []
    comps: list[dict[str, np.ndarray]] = []
    kept: list[int] = []       # group indices (over all parts) with varying rewards
    dropped: list[int] = []
    offset = 0
    rounds = 0
    need = rl.prompts_per_step
    zero_groups = 0
    reward_s = 0.0
    while True:
      prompts = self.prompts.take(need)
      rollouts = rollout_lib.generate_rollouts(
          self.sampler, params, prompts, tokenizer=self.tokenizer, config=self.rollout_config,
          rng=jax.random.fold_in(key, rounds), router=self.router)
      t_reward = time.perf_counter()
      total, components = self.reward(rollouts.samples(), step)
      reward_s += time.perf_counter() - t_reward
      parts.append(rollouts)
      totals.append(np.asarray(total, np.float32))
      comps.append(components)
      flat = np.asarray(adv_lib.zero_variance_groups(
          jnp.asarray(total, jnp.float32).reshape(-1, g)))
      zero_groups += int(flat.sum())
      for i, zero in enumerate(flat):
        (dropped if zero and rl.dynamic_sampling else kept).append(offset + i)
      offset += len(flat)
      rounds += 1
      if not rl.dynamic_sampling or len(kept) >= rl.prompts_per_step:
        break
      if rounds >= rl.max_sampling_rounds:
        break
      need = rl.prompts_per_step - len(kept)
    groups = kept[:rl.prompts_per_step]
    filler = dropped[:rl.prompts_per_step - len(groups)]
    order = groups + filler
    merged = rollout_lib.Rollouts.concat(parts).select(order)
    all_total = np.concatenate(totals).reshape(-1, g)[order].reshape(-1)
    all_comps = {k: np.concatenate([c[k] for c in comps]).reshape(-1, g)[order].reshape(-1)
                 for k in comps[0]}
    keep = np.array([True] * len(groups) + [False] * len(filler))
    stats = {"zero_variance_fraction": zero_groups / max(offset, 1),
             "sampling_rounds": float(rounds), "time/reward_s": reward_s}
    return merged, all_total, all_comps, keep, stats

  def step(self, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    rollouts, total, components, keep, stats = self.collect(step)
    t1 = time.perf_counter()
    g = self.rollout_config.group_size
    batch = rollout_lib.to_batch(rollouts, pad_id=self.pad_id, width_multiple=32)
    mask = batch["loss_mask"]
    mask *= np.repeat(keep, g)[:, None]
    truncated = np.array([r in ("length", "capacity") for r in rollouts.stop_reason])
    if self.rl.overlong_filter:
      mask *= ~truncated[:, None]
    sampler_logprobs = batch.pop("sampler_logprobs")
    device_batch = mesh_lib.shard_batch(batch, self.mesh, self.rules)
    with mesh_lib.logical_rules(self.mesh, self.rules):
      old_logprobs, old_values = self.score(self.state.params, self.state.frozen, device_batch)
      ref_logprobs = (self.score(self.reference, self.state.frozen, device_batch)[0]
                      if self.reference is not None else None)
    old_lp = np.asarray(old_logprobs)
    gap = float(np.max(np.abs(old_lp - sampler_logprobs * mask) * mask)) if mask.any() else 0.0
    batch["old_logprobs"] = old_lp
    if ref_logprobs is not None:
      batch["ref_logprobs"] = np.asarray(ref_logprobs)
    if self.objective == "ppo":
      p = self.ppo_config
      ref = batch.get("ref_logprobs", old_lp)
      adv, returns, _ = update_lib.ppo_targets(
          jnp.asarray(total), jnp.asarray(old_lp), jnp.asarray(ref), old_values,
          jnp.asarray(mask), gamma=p.gamma, lam=p.lam, kl_beta=p.kl_beta,
          kl_estimator=p.kl_estimator, whiten=p.whiten_advantages)
      batch.update(advantages=np.asarray(adv), returns=np.asarray(returns),
                   old_values=np.asarray(old_values))
      batch.pop("ref_logprobs", None)   # the KL is in the rewards, not the loss
    else:
      adv = adv_lib.group_advantages(jnp.asarray(total).reshape(-1, g), self.rl.advantage)
      batch["advantages"] = np.asarray(adv).reshape(-1)
    t2 = time.perf_counter()
    sums = self._update(batch, step)
    t3 = time.perf_counter()

    n_tokens = max(sums.get("tokens", 0.0), 1.0)
    lengths = np.array([len(c) - m.sum() for c, m in zip(rollouts.completion_ids,
                                                         rollouts.tool_mask)], np.float32)
    metrics = {
        "reward_mean": float(total.mean()), "reward_std": float(total.std()),
        **{f"reward/{k}_mean": float(v.mean()) for k, v in components.items()},
        **{f"reward/{k}_std": float(v.std()) for k, v in components.items()},
        **stats,
        "loss": sums["loss_sum"] / max(sums["weight"], 1.0),
        "clip_fraction": sums.get("clipped", 0.0) / n_tokens,
        "approx_kl": sums.get("approx_kl", 0.0) / n_tokens,
        "entropy": sums.get("entropy", 0.0) / n_tokens,
        "response_length": float(lengths.mean()),
        "truncated_fraction": float(truncated.mean()),
        "tool_calls": float(np.mean(rollouts.num_tool_calls)),
        "logprob_gap_sampler_trainer": gap,
        "grad_norm": sums["grad_norm"],
        "time/rollout_s": t1 - t0 - stats["time/reward_s"],
        "time/score_s": t2 - t1, "time/update_s": t3 - t2, "time/step_s": t3 - t0,
    }
    if "ref_kl" in sums:
      metrics["ref_kl"] = sums["ref_kl"] / n_tokens
    if "value_error" in sums:
      metrics["value_mse"] = sums["value_error"] / n_tokens
    if "learning_rate" in sums:
      metrics["learning_rate"] = sums["learning_rate"]
    return metrics

  def _update(self, batch: dict[str, np.ndarray], step: int) -> dict[str, float]:
    rl = self.rl
    n = batch["input_ids"].shape[0]
    if n % rl.minibatches:
      raise ValueError(f"{n} rollout rows cannot be split into rl.minibatches="
                       f"{rl.minibatches}")
    size = n // rl.minibatches
    rng = np.random.default_rng([self.config.seed, step])
    totals: dict[str, float] = {}
    for _ in range(rl.num_iterations):
      order = rng.permutation(n) if rl.minibatches > 1 else np.arange(n)
      for m in range(rl.minibatches):
        rows = order[m * size:(m + 1) * size]
        mb = {k: v[rows] for k, v in batch.items()}
        with mesh_lib.logical_rules(self.mesh, self.rules):
          self.state, out = self.train_step(self.state,
                                            mesh_lib.shard_batch(mb, self.mesh, self.rules))
        host = {k: float(v) for k, v in jax.device_get(out).items()}
        if not host.pop("finite", 1.0):
          raise loop_lib.NonFiniteLossError(
              f"non-finite RL loss or gradient at step {step + 1}; the update was not "
              f"applied. Last good checkpoint: {self.checkpoints.latest_step()} in "
              f"{self.checkpoints.directory}")
        for k, v in host.items():
          totals[k] = totals.get(k, 0.0) + v
    updates = rl.num_iterations * rl.minibatches
    for k in ("grad_norm", "learning_rate"):
      if k in totals:
        totals[k] /= updates
    return totals

  # ------------------------------------------------------------------------------------
  # Evaluation, checkpoints, the loop
  # ------------------------------------------------------------------------------------

  def evaluate(self) -> dict[str, Any]:
    result = eval_lib.evaluate_policy(
        self.graphdef, self.policy_params(), self.eval_prompts, tokenizer=self.tokenizer,
        rollout=self.rollout_config, correct=self.correct,
        config=eval_config_from(self.config),
        router=self.router, stop_ids=self.stop_ids, pad_id=self.pad_id, seed=self.config.seed,
        model_config=self.model_config)
    return result

  def train(self) -> dict[str, float]:
    rl = self.rl
    self.checkpoints = CheckpointManager(
        self.workdir / "checkpoints", keep=rl.keep_checkpoints,
        best_metric="eval_greedy_accuracy" if self.eval_prompts else None, best_mode="max",
        async_save=rl.async_checkpoint)
    writer, meta = run_lib.start_run_files(self.config, self.workdir, self.model_config)
    start = self.checkpoints.latest_step() or 0
    if start:
      self.state, data_state, _ = self.checkpoints.restore(self.state)
      self.prompts.set_state(data_state["prompts"])
      logging.info("resumed from RL step %d in %s", start, self.checkpoints.directory)
    last: dict[str, float] = {}
    try:
      if start == 0 and self.eval_prompts and self.config.eval.at_start:
        last.update(self._eval_scalars(writer, 0))
      for step in range(start, rl.steps):
        metrics = self.step(step)
        done = step + 1
        scalars = metrics if done % rl.log_every == 0 or done == rl.steps else {}
        eval_scalars: dict[str, float] = {}
        if self.eval_prompts and (done % rl.eval_every == 0 or done == rl.steps):
          eval_scalars = self._eval_scalars(writer, done)
        if scalars:
          writer.write_scalars(done, scalars)
        last.update(metrics)
        last.update(eval_scalars)
        if done % rl.checkpoint_every == 0 or done == rl.steps:
          self.checkpoints.save(done, self.state, data_state={"prompts": self.prompts.get_state()},
                                meta=meta, metrics=eval_scalars)
    finally:
      self.checkpoints.close()
      writer.close()
    run_lib.export_trained(self.config, self.graphdef, self.state, self.lora_config,
                           self.workdir / "export")
    return last

  def _eval_scalars(self, writer: metrics_lib.MetricWriter, step: int) -> dict[str, float]:
    result = self.evaluate()
    scalars = {f"eval_{k}": float(v) for k, v in result.items() if k != "examples"}
    writer.write_scalars(step, scalars)
    writer.write_texts(step, {"eval_example": "\n\n".join(f"{p}\n=> {c}"
                                                          for p, c in result["examples"])})
    return scalars


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains (or resumes) a GRPO-family or PPO run per `config` in `workdir`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return Learner(config, workdir).train()
