"""The ConfigDict boundary: every config section becomes its frozen dataclass here, and only here.

Binaries (and the tests and notebooks that stand in for them) call these; the library
below takes the dataclasses. A section and its dataclass share a name:

  config.model       models.config.ModelConfig        config.rl       rl.learner.RLConfig
  config.mesh        parallel.mesh.MeshConfig         config.rollout  rl.rollout.RolloutConfig
  config.data        data.config.DataConfig           config.loss     objectives.grpo.LossConfig
  config.optimizer   train.optimizer.OptimizerConfig  config.ppo      objectives.ppo.PPOConfig
  config.train       train.loop.TrainConfig           config.eval     rl.evaluation.EvalConfig
  config.lora        models.lora.LoRAConfig           config.reward   rewards.build_reward spec
  config.export      train.setup.ExportConfig
  config.preference  objectives.dpo.PreferenceConfig
  config.srl         rl.srl.SRLConfig
  config.offpolicy   rl.offpolicy.OffPolicyConfig (LUFFY)
  config.apo         rl.apo.APOConfig (configs/apo.py, with config.seed)
  config.experience  rl.experience.ExperienceConfig (ExGRPO)

An unknown field is an error naming `config.<section>.<field>`, and so is a value the
dataclass rejects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections

from wakea_jax.data.config import DataConfig
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.lora import LoRAConfig
from wakea_jax.objectives.dpo import PreferenceConfig
from wakea_jax.objectives.grpo import LossConfig
from wakea_jax.objectives.ppo import PPOConfig
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.rl.apo import APOConfig
from wakea_jax.rl.collaboration import CollaborationConfig
from wakea_jax.rl.evaluation import EvalConfig
from wakea_jax.rl.experience import ExperienceConfig
from wakea_jax.rl.judge import JudgeConfig
from wakea_jax.rl.learner import RLConfig, RLRunConfig
from wakea_jax.rl.offpolicy import OffPolicyConfig
from wakea_jax.rl.rollout import RolloutConfig
from wakea_jax.rl.srl import SRLConfig
from wakea_jax.train.loop import TrainConfig
from wakea_jax.train.multimodal import MediaModelConfig
from wakea_jax.train.optimizer import OptimizerConfig
from wakea_jax.train.setup import ExportConfig, RunConfig

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": mesh_lib.MeshConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "lora": LoRAConfig,
    "export": ExportConfig,
    "preference": PreferenceConfig,
    "rl": RLConfig,
    "rollout": RolloutConfig,
    "loss": LossConfig,
    "ppo": PPOConfig,
    "eval": EvalConfig,
    "srl": SRLConfig,
    "offpolicy": OffPolicyConfig,
    "experience": ExperienceConfig,
}

T = TypeVar("T")
Config = ml_collections.ConfigDict | Mapping[str, Any]


def _plain(value: Any) -> Any:
  """ConfigDict / lists -> dicts / tuples (frozen dataclasses want hashable tuples)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def typed(cls: type[T], values: Config, where: str) -> T:
  """`cls(**values)` with errors that name `config.<where>.<field>`."""
  values = _plain(values)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"config.{where}: unknown field {unknown[0]!r} ({cls.__name__} has "
                     f"{', '.join(sorted(names))})")
  try:
    return cls(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.{where}: {e}") from e


def section(config: Config, name: str) -> Any:
  """The dataclass of `config.<name>` (see SECTIONS)."""
  if name not in SECTIONS:
    raise KeyError(f"no dataclass for config section {name!r}; known: {sorted(SECTIONS)}")
  if name not in config:
    raise ValueError(f"the config has no '{name}' section")
  if name == "model":
    return model_config_from(config["model"])
  if name == "lora":
    return lora_config_from(config["lora"])
  return typed(SECTIONS[name], config[name], name)


def model_config_from(values: Config) -> ModelConfig:
  """config.model -> ModelConfig (with its own field validation)."""
  try:
    return ModelConfig.from_dict(dict(_plain(values)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from e


def lora_config_from(values: Config) -> LoRAConfig | None:
  """config.lora -> LoRAConfig, or None unless `enabled`."""
  values = dict(_plain(values))
  if not values.pop("enabled", False):
    return None
  values["quantize_base"] = values.get("quantize_base") or None
  return typed(LoRAConfig, values, "lora")


def mesh_from(config: Config) -> Any:
  """The device mesh of config.mesh (over its `devices`: all, or the first N)."""
  return section(config, "mesh").create()


def rules_from(config: Config) -> mesh_lib.Rules:
  """config.sharding_rules as a validated rules tuple."""
  return mesh_lib.normalize_rules([tuple(rule) for rule in config["sharding_rules"]])


def _record(config: Config) -> dict[str, Any]:
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(_plain(config), default=str))


def run_config(config: Config) -> RunConfig:
  """The sections every runner shares (train/setup.py RunConfig)."""
  get = config.get
  sections = {name: section(config, name)
              for name in ("data", "optimizer", "train", "export") if name in config}
  return RunConfig(
      model=section(config, "model"),
      objective=get("objective", "sft"),
      seed=int(get("seed", 0)),
      mesh=section(config, "mesh") if "mesh" in config else mesh_lib.MeshConfig(),
      sharding_rules=rules_from(config) if "sharding_rules" in config else mesh_lib.DEFAULT_RULES,
      init_from=get("init_from", "") or "",
      tokenizer=get("tokenizer", "") or "",
      grad_accum=int(get("grad_accum", 1)),
      lora=section(config, "lora") if "lora" in config else None,
      record=_record(config),
      **sections)


def media_config(config: Config) -> MediaModelConfig:
  """config.media (train/multimodal.py); a config without the section is a text run."""
  if "media" not in config:
    return MediaModelConfig()
  return typed(MediaModelConfig, config["media"], "media")


def rl_run_config(config: Config) -> RLRunConfig:
  """The RL sections (rl, rollout, loss, ppo, eval, reward, offpolicy, experience) of an RL
  config."""
  return RLRunConfig(
      rl=section(config, "rl"),
      rollout=section(config, "rollout"),
      loss=section(config, "loss"),
      ppo=section(config, "ppo") if "ppo" in config else None,
      eval=section(config, "eval"),
      reward=_plain(config["reward"]),
      offpolicy=section(config, "offpolicy") if "offpolicy" in config else OffPolicyConfig(),
      experience=(section(config, "experience") if "experience" in config
                  else ExperienceConfig()),
      media=media_config(config))


def preference_config(config: Config) -> PreferenceConfig:
  """config.preference."""
  return section(config, "preference")


def collaboration_config(config: Config) -> CollaborationConfig:
  """config.collaboration (and config.seed) of configs/collaborate.py as the library's
  frozen dataclass."""
  values = {**config.collaboration.to_dict(), "seed": config.seed}
  return typed(CollaborationConfig, values, "collaboration")


def judge_config(config: Config) -> JudgeConfig | None:
  """config.judge of configs/collaborate.py, or None when its url is empty (no judge)."""
  values = config.judge.to_dict()
  if not values.get("url"):
    return None
  values["api_key_env"] = values.get("api_key_env") or None
  return typed(JudgeConfig, values, "judge")


def apo_config(config: Config) -> APOConfig:
  """config.apo (and config.seed) of configs/apo.py as the library's frozen dataclass."""
  values = {**_plain(config["apo"]), "seed": int(config.get("seed", 0))}
  return typed(APOConfig, values, "apo")
