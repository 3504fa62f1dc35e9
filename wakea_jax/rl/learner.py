"""The RL learner: prompts -> sampler (G completions, tool loop) -> rewards -> advantages ->
jitted updates, driven by the shared training loop (checkpoints, evaluation, metrics, NaN
guard, progress) and built by the shared run setup.

    python -m wakea_jax.train --config=configs/grpo.py:arithmetic --workdir=/tmp/grpo
    python -m wakea_jax.train --config=configs/ppo.py:arithmetic --workdir=/tmp/ppo

One RL step:
  1. rollout   `rl.prompts_per_step` prompts x `rollout.group_size` completions from the
               current policy (jitted prefill + while_loop decode; with tools, the tool
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
               With `rollout.dtype` ("bfloat16", "int8") the sampler decodes a lower-
               precision copy of the policy, rebuilt from the trainer's params before every
               step's rollouts (sampling/precision.py, jitted); the old log-probs are then
               always the trainer's, and the sampler-trainer gap is logged every step
               (`logprob_gap_mean`, and its max over tokens `logprob_gap_sampler_trainer`).
  4. update    `rl.num_iterations` passes over the rollouts, each in `rl.minibatches`
               shuffled minibatches, one optimizer step each (the jitted, donated step of
               train/step.py with the GRPO or PPO loss).
LUFFY (arXiv 2504.14945, `config.offpolicy`, rl/offpolicy.py): after sampling, up to
`offpolicy.per_group` members of each group whose prompt has traces are replaced by traces
(tokenised as that prompt's rollout would be), rewarded with the others, so the advantages
are over the mixed group; the trainer re-scores every row (for the importance-weight
metrics), a trace's old log-probs are its file's (else 0: pi_phi = 1), and the loss is
objectives/offpolicy.py's. Metrics: offpolicy_fraction, importance_weight_mean/max/min.
ExGRPO (arXiv 2510.02245, `config.experience`, rl/experience.py and rl/replay.py): every
step's sampled rows feed an experience buffer of successful trajectories per prompt; once
replay has started, floor(groups * rho) of the step's groups are replayed prompts (in place
of fresh ones: the rollout count is plain GRPO's), each rolled out on-policy with one member
replaced by its stored trajectory of lowest entropy (under the current policy, one forward
pass: `experience.entropy`), an off-policy row with the stored behaviour log-probs as old
log-probs and LUFFY's shaped loss (`offpolicy.gamma`). With traces too (hybrid), the traces
take their `per_group` members and the replay the last one left. The buffer rides in the
checkpoint with the prompt position (experience.WithExperience). Metrics: experience/*.
Checkpoints hold the train state and the prompt iterator's position; the rollout RNG is
derived from (seed, step), so a resumed run continues exactly. `config.train` sets the
cadence (steps are RL steps), as for every other objective.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.config import pooled_specs
from wakea_jax.data.tokenizer import chat_pad_id
from wakea_jax.objectives import grpo as grpo_lib
from wakea_jax.objectives import offpolicy as offpolicy_loss_lib
from wakea_jax.objectives import ppo as ppo_lib
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.parallel import multihost
from wakea_jax.rl import advantages as adv_lib
from wakea_jax.rl import evaluation as eval_lib
from wakea_jax.rl import experience as experience_lib
from wakea_jax.rl import media_prompts
from wakea_jax.rl import offpolicy as offpolicy_lib
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import replay as replay_lib
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl import srl as srl_lib
from wakea_jax.rl import update as update_lib
from wakea_jax.sampling import precision as precision_lib
from wakea_jax.sampling.sampler import chat_sampler
from wakea_jax.train import loop as loop_lib
from wakea_jax.train import multimodal
from wakea_jax.train import setup as setup_lib
from wakea_jax.train.state import TrainState

# "srl" is the GRPO-family update over SRL's step-wise prompts (rl/srl.py; trainers.py
# writes them as the run's prompt files).
OBJECTIVES = ("grpo", "ppo", "srl")
OLD_LOGPROBS = ("auto", "trainer", "sampler")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """config.rl: what one RL step does (the cadence is config.train's)."""

  prompts_per_step: int = 16
  num_iterations: int = 1          # passes over each batch of rollouts (GRPO's mu)
  minibatches: int = 1             # optimizer steps per pass
  advantage: str = "grpo"          # rl/advantages.py: grpo | dr_grpo | rloo
  dynamic_sampling: bool = False
  # Dynamic sampling drops groups whose reward std (ddof=0) is below this (SRL, arXiv
  # 2510.25992); 0 drops the groups whose rewards are all equal (within 1e-6), as DAPO does.
  # Either way the dropped share is logged as zero_variance_fraction.
  dynamic_sampling_min_std: float = 0.0
  max_sampling_rounds: int = 3
  overlong_filter: bool = False
  # Where the update's old (behaviour) log-probs come from: "trainer" re-scores the rollouts
  # with the trainer's forward pass; "sampler" takes the sampler's own (the same numbers up
  # to the gap, without a second pass); "auto" takes the sampler's when the rollouts feed one
  # update (num_iterations = minibatches = 1) of a GRPO-family objective, where that update's
  # forward pass is exactly the re-scoring pass and measures the gap itself. With a
  # rollout.dtype the sampler runs other numbers than the trainer: "auto" re-scores, and
  # "sampler" is an error (the importance ratio must be against the trainer's scoring).
  old_logprobs: str = "auto"
  # One system prompt for every train and eval prompt, replacing each record's own system
  # message (prompts.with_system_prompt); "" keeps the records' own. APO's best prompt goes
  # here: `python -m wakea_jax.apo` prints the override.
  system_prompt: str = ""

  def __post_init__(self) -> None:
    for name in ("prompts_per_step", "num_iterations", "minibatches", "max_sampling_rounds"):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.dynamic_sampling_min_std < float("inf"):
      raise ValueError(f"rl.dynamic_sampling_min_std must be a finite number >= 0, got "
                       f"{self.dynamic_sampling_min_std}")
    if self.dynamic_sampling_min_std and not self.dynamic_sampling:
      raise ValueError(f"rl.dynamic_sampling_min_std={self.dynamic_sampling_min_std} has no "
                       "effect without rl.dynamic_sampling=True")
    if self.old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"rl.old_logprobs={self.old_logprobs!r} is not one of {OLD_LOGPROBS}")
    if self.advantage not in adv_lib.ADVANTAGE_ESTIMATORS:
      raise ValueError(f"rl.advantage={self.advantage!r} is not one of "
                       f"{sorted(adv_lib.ADVANTAGE_ESTIMATORS)}")


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
  """The RL-specific sections beside the shared RunConfig."""

  rl: RLConfig = RLConfig()
  rollout: rollout_lib.RolloutConfig = rollout_lib.RolloutConfig()
  loss: grpo_lib.LossConfig = grpo_lib.LossConfig()
  ppo: ppo_lib.PPOConfig | None = None           # PPO runs only
  eval: eval_lib.EvalConfig = eval_lib.EvalConfig()
  reward: Mapping[str, Any] = dataclasses.field(
      default_factory=lambda: {"math": {"weight": 1.0}})   # rewards.build_reward spec
  offpolicy: offpolicy_lib.OffPolicyConfig = offpolicy_lib.OffPolicyConfig()   # LUFFY
  experience: experience_lib.ExperienceConfig = experience_lib.ExperienceConfig()   # ExGRPO
  # A vision- or audio-language policy (train/multimodal.py); prompts carry images / audios.
  media: multimodal.MediaModelConfig = multimodal.MediaModelConfig()


def _check(objective: str, rl_run: RLRunConfig) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f"config.objective must be one of {OBJECTIVES}, got {objective!r}")
  if rl_run.offpolicy.enabled and objective != "grpo":
    raise ValueError(f"offpolicy.traces (LUFFY) mixes traces into GRPO groups: it needs "
                     f"objective 'grpo', got {objective!r}")
  if rl_run.experience.enabled:
    g = rl_run.rollout.group_size
    if objective != "grpo":
      raise ValueError(f"experience.enabled (ExGRPO) replays trajectories into GRPO groups: it "
                       f"needs objective 'grpo', got {objective!r}")
    # A replayed group keeps at least one sampled member: the prompt's correctness rate is
    # measured on them, and a group of one off-policy row has no advantage.
    traces = rl_run.offpolicy.per_group if rl_run.offpolicy.enabled else 0
    if traces + 1 >= g:
      raise ValueError(
          f"experience.enabled: rollout.group_size={g} leaves no sampled member beside the "
          f"replayed trajectory{f' and offpolicy.per_group={traces} traces' if traces else ''}"
          f"; use rollout.group_size > {traces + 1}")
  if objective == "ppo":
    if rl_run.ppo is None:
      raise ValueError("objective 'ppo' needs the config.ppo section")
    # The value loss is a token mean; the policy loss must share its denominator, and the
    # KL to the reference is a reward penalty in PPO (ppo.kl_beta), not a loss term.
    if rl_run.loss.aggregation != "token_mean":
      raise ValueError(f"PPO needs loss.aggregation='token_mean', got "
                       f"{rl_run.loss.aggregation!r}")
    if rl_run.loss.kl_beta:
      raise ValueError("PPO puts the KL in the reward: set ppo.kl_beta, not loss.kl_beta")
    if rl_run.rl.old_logprobs == "sampler":
      raise ValueError("PPO scores the rollouts for its values anyway: rl.old_logprobs must be "
                       "'auto' or 'trainer', not 'sampler'")
  if rl_run.media.enabled:
    unsupported = {"offpolicy.traces": rl_run.offpolicy.enabled,
                   "experience.enabled": rl_run.experience.enabled,
                   "objective 'ppo'": objective == "ppo"}
    used = [name for name, on in unsupported.items() if on]
    if used:
      raise ValueError(f"media.kind={rl_run.media.kind!r}: {', '.join(used)} is not supported "
                       "with media prompts yet (GRPO-family objectives, static or continuous "
                       "batching, tools and search protocols, rollout.dtype and rollout.tensor "
                       "allowed)")
  if rl_run.rollout.dtype and rl_run.rl.old_logprobs == "sampler":
    # The bf16 / int8 sampler is not the policy being trained: its log-probs as the old
    # ones would make the ratio (and the clip) measure the precision gap, not the update.
    raise ValueError(f"rl.old_logprobs='sampler' cannot be combined with rollout.dtype="
                     f"{rl_run.rollout.dtype!r}: the importance ratio must be against the "
                     "trainer's own log-probs; use rl.old_logprobs='auto' (which re-scores) or "
                     "'trainer', or rollout.dtype=''")


class Learner:
  """Holds everything one RL run needs; `train()` runs it through the shared loop."""

  def __init__(self, run: setup_lib.RunConfig, rl_run: RLRunConfig, workdir: pathlib.Path):
    _check(run.objective, rl_run)
    self.run = run
    self.workdir = pathlib.Path(workdir)
    self.objective = run.objective
    self.rl = rl_run.rl
    self.rollout = rl_run.rollout
    self.eval_config = rl_run.eval
    self.ppo_config = rl_run.ppo if self.objective == "ppo" else None
    if self.ppo_config is not None:
      self.loss_fn = functools.partial(update_lib.ppo_loss_fn, loss_config=rl_run.loss,
                                       ppo_config=self.ppo_config)
    elif rl_run.offpolicy.enabled or rl_run.experience.enabled:
      # Traces and replayed trajectories share LUFFY's shaping f(x) = x / (x + gamma).
      self.loss_fn = functools.partial(
          update_lib.mixed_policy_loss_fn, loss_config=rl_run.loss,
          offpolicy_config=offpolicy_loss_lib.OffPolicyLossConfig(rl_run.offpolicy.gamma))
    else:
      self.loss_fn = functools.partial(update_lib.policy_loss_fn, loss_config=rl_run.loss)
    # Scores and losses are over the tokenizer's ids, the distribution the sampler draws
    # from (a padded embedding's extra rows are masked there). Setup builds the tokenizer;
    # the loss reads the limit when the train step is first traced, after that.
    self.vocab_limit: int | None = None
    rl = self.rl
    self.media_config = rl_run.media
    self.built = setup_lib.setup(
        run, self._loss, total_updates=run.train.steps * rl.num_iterations * rl.minibatches,
        value_head=self.ppo_config is not None,
        build=multimodal.builder(rl_run.media) if rl_run.media.enabled else None)
    self.state = self.built.state
    self.tokenizer = self.built.tokenizer
    self.media: media_prompts.PromptMedia | None = None
    self.media_inputs = None
    if rl_run.media.enabled:
      model = nnx.merge(self.built.graphdef, self.state.params, self.state.frozen)
      self.media_inputs = multimodal.media_config(model, rl_run.media)
      self.media = media_prompts.PromptMedia(self.tokenizer, self.media_inputs,
                                             rl_run.media.max_media)
      del model
    self.vocab_limit = self.tokenizer.vocab_size
    self.model_config = self.built.model_config
    # The reference policy is the initial one; kept only when a KL term needs it.
    kl_beta = self.ppo_config.kl_beta if self.ppo_config else rl_run.loss.kl_beta
    self.reference = jax.tree.map(jnp.copy, self.state.params) if kl_beta > 0 else None
    self.score = update_lib.make_score_fn(self.built.graphdef, vocab_limit=self.vocab_limit)
    r = self.rollout
    # The sampler's graph, config and per-step params: the trainer's own (rollout.dtype ""),
    # or a bfloat16 / int8 copy rebuilt from them before each step's rollouts.
    self.rollout_model = precision_lib.rollout_model_for(
        self.built.graphdef, self.policy_params(), r.dtype, mesh=self.built.mesh,
        rules=self.built.rules)
    # Without a rollout dtype the sampler runs the trainer's params in the trainer's dtype,
    # so its log-probs are the behaviour policy's; re-scoring only buys the exact trainer
    # numbers (and PPO's values). With one, the trainer always re-scores.
    single_update = rl.num_iterations == 1 and rl.minibatches == 1
    # LUFFY's traces and ExGRPO's replays were not sampled by this policy: the trainer scores
    # them (for the importance-weight statistics; their old log-probs are their own).
    self.offpolicy = rl_run.offpolicy
    self.experience = rl_run.experience
    self.mixed = self.offpolicy.enabled or self.experience.enabled
    self.rescore = (self.ppo_config is not None or rl.old_logprobs == "trainer"
                    or bool(r.dtype) or (rl.old_logprobs == "auto" and not single_update)
                    or self.mixed)
    self.stop_ids, self.pad_id = chat_stop_ids(self.tokenizer), chat_pad_id(self.tokenizer)
    # Rollouts sample on the trainer's mesh, or (rollout.tensor) on a tensor-parallel one.
    self.rollout_mesh = self.built.mesh
    if r.tensor:
      self.rollout_mesh = mesh_lib.create_mesh({"data": -1, "fsdp": 1, "tensor": r.tensor})
    self.sampler = chat_sampler(self.rollout_model.graphdef, self.rollout_model.config,
                                self.tokenizer,
                                temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                stop_ids=self.stop_ids, pad_id=self.pad_id,
                                chunk_steps=r.chunk_steps, mesh=self.rollout_mesh,
                                rules=self.built.rules)
    self.router = rollout_lib.router_for(r)
    if r.slots and jax.process_count() > 1:
      logging.warning("rollout.slots=%d: continuous batching runs on one process; this run's "
                      "rollouts on %d processes batch statically", r.slots, jax.process_count())
    self.reward = rewards_lib.build_reward(rl_run.reward)
    # SRL trains each row up to the end of the step the reward parsed, with its parser.
    self.srl_require_think = srl_lib.reward_requires_think(rl_run.reward)
    self.correct = rewards_lib.correctness_reward(self.eval_config.correct_reward)
    data = run.data
    # Logical prompt shards, as for SFT data: process p owns [p*k, (p+1)*k); a fixed
    # data.shards makes the prompts of every step independent of the process count.
    processes, shards = jax.process_count(), data.shards or jax.process_count()
    if shards % processes:
      raise ValueError(f"data.shards={data.shards} prompt shards cannot be split evenly over "
                       f"{processes} processes: use a multiple of the process count (or 0)")
    if rl.prompts_per_step % shards:
      raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step} must be divisible by the "
                       f"{shards} prompt shards (data.shards={data.shards}"
                       f"{', i.e. the process count' if not data.shards else ''})")
    k = shards // processes
    records = prompts_lib.load_prompts(pooled_specs(data.sources), on_error=data.on_error)
    if rl.system_prompt:
      records = [prompts_lib.with_system_prompt(r, rl.system_prompt) for r in records]
    self.prompts = prompts_lib.PromptIterator(
        records, rl.prompts_per_step, seed=run.seed, shards=shards,
        owned=range(jax.process_index() * k, (jax.process_index() + 1) * k))
    self.traces: offpolicy_lib.TraceIndex | None = None
    if self.offpolicy.enabled:
      self.traces, counts = offpolicy_lib.select_traces(
          offpolicy_lib.load_traces(self.offpolicy.specs, on_error=data.on_error),
          min_trace_reward=self.offpolicy.min_trace_reward, reward=self.reward,
          prompts=records)
      logging.info("offpolicy traces: %s, for %d prompts", counts, self.traces.num_prompts)
      if not counts["kept"]:
        raise ValueError(f"offpolicy.traces={self.offpolicy.traces!r}: no trace is left "
                         f"({counts}); lower offpolicy.min_trace_reward or check the file")
      shortfall = offpolicy_lib.per_group_shortfall(self.traces, self.offpolicy.per_group)
      if shortfall:
        logging.warning(shortfall)
    self.buffer: experience_lib.ExperienceBuffer | None = None
    self.prompt_index: dict[str, prompts_lib.PromptRecord] = {}   # the replays' prompts
    if self.experience.enabled:   # one buffer per process, of the prompts it draws
      self.buffer = experience_lib.ExperienceBuffer(
          self.experience, seed=run.seed * 1_000_003 + jax.process_index())
      self.prompt_index = replay_lib.prompt_index(records)
      if self.experience.entropy == "current":
        self.entropy = update_lib.make_entropy_fn(self.built.graphdef,
                                                  vocab_limit=self.vocab_limit)
    self.replay_entropy = 0.0   # the last replayed trajectories' mean entropy
    self.eval_prompts = (prompts_lib.load_prompts(pooled_specs(data.eval_sources, "eval_sources"),
                                                  on_error=data.on_error)
                         if data.eval_sources else [])
    if rl.system_prompt:
      self.eval_prompts = [prompts_lib.with_system_prompt(r, rl.system_prompt)
                           for r in self.eval_prompts]

  def _loss(self, model: Any, batch: dict[str, Any], rng: jax.Array) -> Any:
    """The train step's loss: the objective's, over the tokenizer's ids (`vocab_limit`)."""
    return self.loss_fn(model, batch, rng, vocab_limit=self.vocab_limit)

  def policy_params(self) -> Any:
    """One state (trainable + frozen) for the sampler, which merges with the same graphdef."""
    return self.built.policy_params(self.state)

  def rollout_params(self) -> Any:
    """The sampler's params for this step: the policy's, at the rollout precision, laid out
    on the rollout mesh (a copy resharded by their logical axes when it is not the trainer's)."""
    params = self.rollout_model.convert(self.policy_params())
    if self.rollout_mesh is not self.built.mesh:
      params = mesh_lib.shard_state(params, self.rollout_mesh, self.built.rules)
    return params

  def collect(self, step: int, on_rollouts: Callable[[rollout_lib.Rollouts], None] | None = None
              ) -> tuple[rollout_lib.Rollouts, np.ndarray, dict[str, np.ndarray], np.ndarray,
                         dict[str, float]]:
    """Rollouts with rewards; (rollouts, total [n], components, group_keep [P], stats).

    Without dynamic sampling there is one round, whose rollouts are the step's as they are:
    `on_rollouts` gets them before they are rewarded, so that the device can start scoring
    them while the host computes the rewards (and runs a judge, or code).
    """
    rl, g = self.rl, self.rollout.group_size
    params = self.rollout_params()     # once per policy update, shared by every round
    key = jax.random.fold_in(jax.random.key(self.run.seed + 1), step)
    parts: list[rollout_lib.Rollouts] = []
    totals: list[np.ndarray] = []
    comps: list[dict[str, np.ndarray]] = []
    kept: list[int] = []       # group indices (over all parts) with varying rewards
    dropped: list[int] = []
    offset = 0
    rounds = 0
    # Every process draws its shards' share of the step's prompts and samples, rewards and
    # runs tools for those rows only.
    processes, shards = jax.process_count(), self.prompts.shards
    quota = rl.prompts_per_step // processes       # groups this process contributes
    need = rl.prompts_per_step
    zero_groups = 0
    reward_s = 0.0
    while True:
      replays: list[experience_lib.Replay] = []
      if self.buffer is not None and rounds == 0:
        # ExGRPO: replayed prompts take the place of fresh ones (the same rollout count).
        self.replay_entropy = 0.0
        count = replay_lib.replay_count(self.buffer, quota, shards // processes)
        replays = self.buffer.sample(count)
        need -= len(replays) * processes
      fresh = self.prompts.take(need)
      prompts = fresh + replay_lib.replay_prompts(replays, self.prompt_index)
      rollouts = rollout_lib.generate_rollouts(
          self.sampler, params, prompts, tokenizer=self.tokenizer, config=self.rollout,
          rng=jax.random.fold_in(key, rounds), router=self.router, media=self.media,
          stop=(srl_lib.step_complete,) if self.objective == "srl" else ())
      if self.traces is not None:   # LUFFY: traces replace members before the rewards
        rollouts = offpolicy_lib.mix_traces(
            rollouts, self.traces, per_group=self.offpolicy.per_group,
            rng=np.random.default_rng([self.run.seed, step, rounds, jax.process_index()]),
            tokenizer=self.tokenizer, stop_ids=self.stop_ids,
            max_new_tokens=self.rollout.max_new_tokens)
      if replays and self.experience.entropy == "current":
        replays = self._lowest_current_entropy(rollouts, replays, len(fresh))
      if replays:   # after the traces: the replay takes the last member they left
        rollouts = replay_lib.mix_replays(
            rollouts, replays, len(fresh), tokenizer=self.tokenizer, stop_ids=self.stop_ids,
            max_new_tokens=self.rollout.max_new_tokens)
      if on_rollouts is not None and not rl.dynamic_sampling:
        on_rollouts(rollouts)
      t_reward = time.perf_counter()
      total, components = self.reward(rollouts.samples(), step)
      if self.buffer is not None:   # every round's sampled rows, dropped groups included
        correct = np.asarray(self.correct(rollouts.samples())) >= 0.5
        replay_lib.observe(self.buffer, rollouts, total, correct,
                           replay_lib.is_offpolicy_row(rollouts), step=step)
      reward_s += time.perf_counter() - t_reward
      parts.append(rollouts)
      totals.append(np.asarray(total, np.float32))
      comps.append(components)
      grouped = jnp.asarray(total, jnp.float32).reshape(-1, g)
      flat = np.asarray(adv_lib.low_spread_groups(grouped, rl.dynamic_sampling_min_std)
                        if rl.dynamic_sampling_min_std else
                        adv_lib.zero_variance_groups(grouped))
      zero_groups += int(flat.sum())
      for i, zero in enumerate(flat):
        (dropped if zero and rl.dynamic_sampling else kept).append(offset + i)
      offset += len(flat)
      rounds += 1
      if not rl.dynamic_sampling or multihost.all_true(len(kept) >= quota):
        break
      if rounds >= rl.max_sampling_rounds:
        break
      # The same number of new prompts for every process (the largest shortfall), drawn
      # evenly from the shards.
      short = int(multihost.global_max(max(quota - len(kept), 0))) * processes
      need = -(-short // shards) * shards
    groups = kept[:quota]
    filler = dropped[:quota - len(groups)]
    order = groups + filler
    merged = rollout_lib.Rollouts.concat(parts).select(order)
    all_total = np.concatenate(totals).reshape(-1, g)[order].reshape(-1)
    all_comps = {k: np.concatenate([c[k] for c in comps]).reshape(-1, g)[order].reshape(-1)
                 for k in comps[0]}
    keep = np.array([True] * len(groups) + [False] * len(filler))
    stats = {"zero_variance_fraction": (multihost.global_sum(zero_groups)
                                        / max(multihost.global_sum(offset), 1)),
             "sampling_rounds": float(rounds), "time/reward_s": reward_s}
    return merged, all_total, all_comps, keep, stats

  def step(self, step: int) -> dict[str, float]:
    """One RL step (rollout, reward, score, update) on `self.state`; host metrics."""
    t0 = time.perf_counter()
    dispatched: list[tuple] = []
    rollouts, total, components, keep, stats = self.collect(
        step, on_rollouts=lambda r: dispatched.append(self._dispatch_scoring(r)))
    t1 = time.perf_counter()
    g = self.rollout.group_size
    batch, sampler_logprobs, old_logprobs, old_values, ref_logprobs = (
        dispatched[0] if dispatched else self._dispatch_scoring(rollouts))
    mask = batch["loss_mask"]
    mask *= np.repeat(keep, g)[:, None]
    truncated = np.array([r in ("length", "capacity") for r in rollouts.stop_reason])
    if self.rl.overlong_filter:
      mask *= ~truncated[:, None]
    if self.objective == "srl":   # only the first step is scored, so only it is trained
      srl_lib.mask_after_first_step(mask, rollouts.prompt_ids, rollouts.completion_ids,
                                    self.tokenizer, require_think=self.srl_require_think)
    gaps: dict[str, float] = {}
    off = replay_lib.is_offpolicy_row(rollouts)       # LUFFY's traces and ExGRPO's replays
    if self.rescore:
      old_lp = multihost.to_host(old_logprobs)       # this process's rows
      sampled = mask * ~off[:, None]                 # a trace's log-probs are another model's
      diff = np.abs(old_lp - sampler_logprobs * sampled) * sampled
      gaps["logprob_gap_sampler_trainer"] = float(multihost.global_max(
          float(diff.max()) if sampled.any() else 0.0))
      gaps["logprob_gap_mean"] = (float(multihost.global_sum(float(diff.sum())))
                                  / max(float(multihost.global_sum(float(sampled.sum()))), 1.0))
      if self.mixed:
        gaps.update(self._offpolicy_metrics(old_lp, sampler_logprobs, mask, off))
        if self.buffer is not None:
          gaps.update(self._offpolicy_metrics(old_lp, sampler_logprobs, mask,
                                              replay_lib.is_replay_row(rollouts),
                                              prefix="experience/"))
        # LUFFY: a trace token's "old" log-prob is log pi_phi, the trace model's (0 = log 1
        # where the file has none, the paper's pi_phi = 1); a replayed token's is the stored
        # behaviour log-prob.
        old_lp = np.where(off[:, None], sampler_logprobs * mask, old_lp).astype(np.float32)
    else:
      # The update's own forward pass (with the behaviour params) measures the gap.
      old_lp = (sampler_logprobs * mask).astype(np.float32)
    batch["old_logprobs"] = old_lp
    if self.mixed:
      batch["off_policy"] = off.astype(np.float32)
    if ref_logprobs is not None:
      batch["ref_logprobs"] = multihost.to_host(ref_logprobs)
    if self.objective == "ppo":
      p = self.ppo_config
      ref = batch.get("ref_logprobs", old_lp)
      adv, returns, _ = update_lib.ppo_targets(
          jnp.asarray(total), jnp.asarray(old_lp), jnp.asarray(ref),
          jnp.asarray(multihost.to_host(old_values)),
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
    # The clip and the KL to pi_old concern sampled tokens only (LUFFY's traces have neither).
    n_sampled = max(sums.get("tokens", 0.0) - sums.get("off_tokens", 0.0), 1.0)
    lengths = np.array([len(c) - m.sum() for c, m in zip(rollouts.completion_ids,
                                                         rollouts.tool_mask)], np.float32)
    # Logged over the global batch: every process's rows.
    total, lengths, truncated = (multihost.gather_rows(x) for x in (total, lengths, truncated))
    components = {k: multihost.gather_rows(v) for k, v in components.items()}
    tool_calls = multihost.gather_rows(np.asarray(rollouts.num_tool_calls, np.float32))
    metrics = {
        "finite": sums.pop("finite", 1.0),
        "generated_tokens": float(lengths.sum()),
        "reward_mean": float(total.mean()), "reward_std": float(total.std()),
        **{f"reward/{k}_mean": float(v.mean()) for k, v in components.items()},
        **{f"reward/{k}_std": float(v.std()) for k, v in components.items()},
        **stats,
        "loss": sums["loss_sum"] / max(sums["weight"], 1.0),
        "clip_fraction": sums.get("clipped", 0.0) / n_sampled,
        "approx_kl": sums.get("approx_kl", 0.0) / n_sampled,
        "entropy": sums.get("entropy", 0.0) / n_tokens,
        "response_length": float(lengths.mean()),
        "truncated_fraction": float(truncated.mean()),
        "tool_calls": float(np.mean(tool_calls)),
        **gaps,
        "grad_norm": sums["grad_norm"],
        # Scoring is dispatched before the rewards are computed (collect's on_rollouts), so
        # score_s is only what the host still waited for once the rewards were done.
        "time/rollout_s": t1 - t0 - stats["time/reward_s"],
        "time/score_s": t2 - t1, "time/update_s": t3 - t2, "time/step_s": t3 - t0,
    }
    if not self.rescore:
      metrics["logprob_gap_mean"] = sums.get("logprob_gap", 0.0) / n_tokens
    if "ref_kl" in sums:
      metrics["ref_kl"] = sums["ref_kl"] / n_tokens
    if "value_error" in sums:
      metrics["value_mse"] = sums["value_error"] / n_tokens
    if "learning_rate" in sums:
      metrics["learning_rate"] = sums["learning_rate"]
    if self.buffer is not None:
      metrics.update(replay_lib.metrics(self.buffer, rollouts))
      if self.experience.entropy == "current":
        metrics["experience/replay_entropy"] = self.replay_entropy
    return metrics

  def _lowest_current_entropy(self, rollouts: rollout_lib.Rollouts,
                              replays: list[experience_lib.Replay], first_group: int
                              ) -> list[experience_lib.Replay]:
    """ExGRPO's trajectory choice (arXiv 2510.02245 §3.1): every stored trajectory of the
    replayed prompts scored in one forward pass of the current policy, the lowest mean token
    entropy chosen. Every process scores the same number of rows (its replay count is
    everyone's)."""
    candidates = replay_lib.candidate_rollouts(
        rollouts, self.buffer, replays, first_group, max_new_tokens=self.rollout.max_new_tokens,
        rows_multiple=jax.local_device_count())
    width = int(multihost.global_max(rollout_lib.batch_width(candidates, 32)))
    batch = rollout_lib.to_batch(candidates, width=width, pad_id=self.pad_id)
    batch.pop("sampler_logprobs")
    mesh, rules = self.built.mesh, self.built.rules
    with mesh_lib.logical_rules(mesh, rules):
      entropies = self.entropy(self.state.params, self.state.frozen,
                               mesh_lib.shard_batch(batch, mesh, rules))
    replays, chosen = replay_lib.lowest_entropy(self.buffer, replays,
                                                multihost.to_host(entropies))
    self.replay_entropy = float(np.mean(chosen))
    return replays

  def _offpolicy_metrics(self, policy_lp: np.ndarray, behaviour_lp: np.ndarray,
                         mask: np.ndarray, off: np.ndarray, prefix: str = ""
                         ) -> dict[str, float]:
    """The off-policy mix over the global batch: the `off` rows' share of the rows, and the
    shaped importance weights f(pi_theta / pi_phi) of their tokens at the step's params
    (every off-policy row, or with `prefix` "experience/" the replayed ones)."""
    weights = offpolicy_lib.shaped_weights(policy_lp, behaviour_lp, mask * off[:, None],
                                           self.offpolicy.gamma)
    n = float(multihost.global_sum(float(weights.size)))
    out = {f"{prefix}offpolicy_fraction": (float(multihost.global_sum(float(off.sum())))
                                  / max(float(multihost.global_sum(float(off.size))), 1.0))}
    if n:
      out.update({
          f"{prefix}importance_weight_mean": float(multihost.global_sum(float(weights.sum()))) / n,
          f"{prefix}importance_weight_max": float(multihost.global_max(
              float(weights.max()) if weights.size else 0.0)),
          f"{prefix}importance_weight_min": -float(multihost.global_max(
              -float(weights.min()) if weights.size else -1.0))})
    return out

  def _dispatch_scoring(self, rollouts: rollout_lib.Rollouts) -> tuple:
    """The train batch of `rollouts` and the trainer's (and reference's) scoring of it,
    dispatched to the device without waiting -> (batch, sampler log-probs, old log-probs,
    old values, reference log-probs); the device arrays are None when not needed."""
    # One width for every process's rows (they form one global batch).
    width = int(multihost.global_max(rollout_lib.batch_width(rollouts, 32)))
    batch = rollout_lib.to_batch(rollouts, width=width, pad_id=self.pad_id)
    sampler_logprobs = batch.pop("sampler_logprobs")
    device_batch = mesh_lib.shard_batch(batch, self.built.mesh, self.built.rules)
    with mesh_lib.logical_rules(self.built.mesh, self.built.rules):
      old_logprobs, old_values = (self.score(self.state.params, self.state.frozen, device_batch)
                                  if self.rescore else (None, None))
      ref_logprobs = (self.score(self.reference, self.state.frozen, device_batch)[0]
                      if self.reference is not None else None)
    return batch, sampler_logprobs, old_logprobs, old_values, ref_logprobs

  def _update(self, batch: dict[str, np.ndarray], step: int) -> dict[str, float]:
    rl = self.rl
    n = batch["input_ids"].shape[0]
    if n % rl.minibatches:
      raise ValueError(f"{n} rollout rows cannot be split into rl.minibatches="
                       f"{rl.minibatches}")
    size = n // rl.minibatches
    rng = np.random.default_rng([self.run.seed, step])
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(rl.num_iterations):
      order = rng.permutation(n) if rl.minibatches > 1 else np.arange(n)
      for m in range(rl.minibatches):
        rows = order[m * size:(m + 1) * size]
        mb = {k: v[rows] for k, v in batch.items()}
        mesh, rules = self.built.mesh, self.built.rules
        with mesh_lib.logical_rules(mesh, rules):
          self.state, out = self.built.train_step(self.state,
                                                  mesh_lib.shard_batch(mb, mesh, rules))
        host = {k: float(v) for k, v in jax.device_get(out).items()}
        finite = host.pop("finite", 1.0)
        for k, v in host.items():
          totals[k] = totals.get(k, 0.0) + v
        updates += 1
        if not finite:  # not applied; the loop stops the run, naming the last checkpoint
          totals["finite"] = 0.0
          return self._averaged(totals, updates)
    return self._averaged(totals, updates)

  @staticmethod
  def _averaged(totals: dict[str, float], updates: int) -> dict[str, float]:
    for k in ("grad_norm", "learning_rate"):
      if k in totals:
        totals[k] /= max(updates, 1)
    return totals

  # ------------------------------------------------------------------------------------
  # Evaluation and the loop
  # ------------------------------------------------------------------------------------

  def evaluate(self) -> dict[str, Any]:
    """Greedy accuracy and pass@k of the current policy on the held-out prompts."""
    return eval_lib.evaluate_policy(
        self.built.graphdef, self.policy_params(), self.eval_prompts, tokenizer=self.tokenizer,
        rollout=self.rollout, correct=self.correct, config=self.eval_config,
        router=self.router, stop_ids=self.stop_ids, pad_id=self.pad_id, seed=self.run.seed,
        model_config=self.model_config, mesh=self.built.mesh, rules=self.built.rules,
        media=self.media)

  def train(self) -> dict[str, float]:
    """Runs (or resumes) the run to config.train.steps, exports, returns the last scalars."""
    checkpoints = setup_lib.checkpoint_manager(
        self.run, self.workdir,
        best_metric="eval_greedy_accuracy" if self.eval_prompts else None, best_mode="max")
    writer, meta = setup_lib.start_run_files(self.run, self.workdir, self.model_config)

    def step_fn(state: TrainState, step: int) -> tuple[TrainState, dict[str, float], float]:
      self.state = state
      metrics = self.step(step)
      return self.state, metrics, metrics.pop("generated_tokens", 0.0)

    def evaluate(state: TrainState, step: int) -> dict[str, float]:
      self.state = state
      result = self.evaluate()
      writer.write_texts(step, {"eval_example": "\n\n".join(f"{p}\n=> {c}"
                                                            for p, c in result["examples"])})
      return {f"eval_{k}": float(v) for k, v in result.items() if k != "examples"}

    try:
      # ExGRPO's buffer is saved with the prompt position (one state per process).
      data = (self.prompts if self.buffer is None
              else experience_lib.WithExperience(self.prompts, self.buffer))
      self.state, last = loop_lib.train_loop(
          state=self.state, step_fn=step_fn, data=data,
          summarize=loop_lib.mean_summary, evaluate=evaluate if self.eval_prompts else None,
          config=self.run.train, checkpoints=checkpoints, writer=writer, meta=meta)
    finally:
      checkpoints.close()
      writer.close()
    if self.media_inputs is not None:
      multimodal.export(self.built, self.state, self.media_inputs, self.workdir / "export")
    else:
      setup_lib.export_trained(self.built, self.state, self.workdir / "export")
    return last


def run(run_config: setup_lib.RunConfig, rl_run: RLRunConfig, workdir: str | pathlib.Path
        ) -> dict[str, float]:
  """Trains (or resumes) a GRPO-family or PPO run in `workdir`."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return Learner(run_config, rl_run, workdir).train()
