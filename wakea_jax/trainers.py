"""config.objective -> the trainer that runs it, from a ConfigDict.

`run(config, workdir)` is the one importable entry of `python -m wakea_jax.train`: it turns
the ConfigDict into typed sections (config_lib) and calls the objective's runner. Tests,
notebooks and the learning demonstration call it the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections

from wakea_jax import config_lib
from wakea_jax.data.config import pooled_specs
from wakea_jax.rl import evaluation, learner
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import srl as srl_lib
from wakea_jax.train import multimodal, preference, sft

Trainer = Callable[[ml_collections.ConfigDict, str | pathlib.Path], dict[str, Any]]


def train_sft(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
              ) -> dict[str, Any]:
  """Supervised fine-tuning (train/sft.py); with config.media.kind set, of a vision- or
  audio-language model (train/multimodal.py)."""
  media = config_lib.media_config(config)
  if media.enabled:
    return multimodal.run_sft(config_lib.run_config(config), media, workdir)
  return sft.run(config_lib.run_config(config), workdir)


def train_preference(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                     ) -> dict[str, Any]:
  """DPO / IPO / SimPO / ORPO (train/preference.py)."""
  return preference.run(config_lib.run_config(config), config_lib.preference_config(config),
                        workdir, media=config_lib.media_config(config))


def train_rl(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
             ) -> dict[str, Any]:
  """GRPO family or PPO (rl/learner.py)."""
  return learner.run(config_lib.run_config(config), config_lib.rl_run_config(config), workdir)


def train_srl(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
              ) -> dict[str, Any]:
  """SRL (rl/srl.py): config.srl's expert trajectories become step-wise prompt files in the
  workdir, which the RL learner trains on as any prompt set (same resume, same prompt
  pipeline), with the reward, dynamic sampling and KL that configs/srl.py sets."""
  data = config_lib.section(config, "data")
  if data.sources or data.eval_sources:
    raise ValueError("config.objective='srl' takes its prompts from config.srl.trajectories and "
                     "config.srl.eval_trajectories; leave config.data.sources and "
                     "config.data.eval_sources empty")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train, held_out = srl_lib.write_step_prompts(config_lib.section(config, "srl"), workdir,
                                               on_error=data.on_error)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.sources = str(train)
    config.data.eval_sources = str(held_out) if held_out else ""
  return train_rl(config, workdir)


def make_learner(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                 ) -> learner.Learner:
  """The RL learner of a GRPO / PPO config, built but not run."""
  return learner.Learner(config_lib.run_config(config), config_lib.rl_run_config(config),
                         pathlib.Path(workdir))


TRAINERS: dict[str, Trainer] = {
    "sft": train_sft,
    "dpo": train_preference,
    "grpo": train_rl,
    "ppo": train_rl,
    "srl": train_srl,
}


def trainer_for(objective: str) -> Trainer:
  """The trainer of `objective`; a clear error for an unknown one."""
  if objective not in TRAINERS:
    raise ValueError(f"config.objective={objective!r} is not one of {sorted(TRAINERS)}")
  return TRAINERS[objective]


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str | pathlib.Path
                        ) -> dict[str, Any]:
  """Held-out greedy accuracy and pass@k of the model at `checkpoint`, on the eval prompts,
  rollout settings and correctness reward of the GRPO / PPO config `config`: the numbers
  its run's periodic evaluation reports."""
  data = config_lib.section(config, "data")
  if not data.eval_sources:
    raise ValueError("config.data.eval_sources is empty: nothing to evaluate on")
  prompts = prompts_lib.load_prompts(pooled_specs(data.eval_sources, "eval_sources"))
  system = config.rl.get("system_prompt", "") if "rl" in config else ""
  if system:   # as the run's periodic evaluation sees them (rl.system_prompt)
    prompts = [prompts_lib.with_system_prompt(p, system) for p in prompts]
  # The model is restored straight onto the run's mesh and sampled there (on several
  # processes each evaluates its share of the prompts).
  mesh = config_lib.mesh_from(config) if "mesh" in config else None
  rules = config_lib.rules_from(config) if "sharding_rules" in config else None
  result = evaluation.evaluate_checkpoint(
      checkpoint, prompts, rollout=config_lib.section(config, "rollout"),
      config=config_lib.section(config, "eval"), tokenizer_path=config.get("tokenizer", ""),
      seed=config.get("seed", 0), mesh=mesh, rules=rules)
  return {**result, "checkpoint": str(checkpoint),
          "prompts": [spec for spec, _ in data.eval_sources]}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes) the run `config` describes in `workdir`; the last logged metrics."""
  return trainer_for(config.get("objective", "sft"))(config, workdir)
