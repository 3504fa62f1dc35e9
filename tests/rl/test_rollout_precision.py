"""The learner with a bfloat16 / int8 rollout sampler: the rollout params are rebuilt from
the trainer's every step, the trainer re-scores (the ratio is against its own log-probs) and
the sampler-trainer gap is logged; "sampler" old log-probs with a rollout dtype are refused."""

import dataclasses

import numpy as np
import pytest

from wakea_jax import trainers
from wakea_jax.config_files import get_config


def _config(**overrides):
  return get_config("grpo:test", **{"train.steps": 1, "train.eval_at_start": False,
                                    "train.eval_every": 100, **overrides})


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_rollout_dtype_rescores_and_reports_the_gap(tmp_path, monkeypatch, dtype):
  from tests.parallel.rl_child import vowel_reward
  from wakea_jax.rl import rewards as rewards_lib

  monkeypatch.setitem(rewards_lib.REWARDS, "vowels", vowel_reward)   # varies per completion
  config = _config(**{"rollout.dtype": dtype})
  config.reward = {"vowels": {"weight": 1.0}}
  learner = trainers.make_learner(config, tmp_path)
  assert learner.rescore                 # "auto" with a rollout dtype re-scores
  assert learner.sampler.config.dtype == ("bfloat16" if dtype == "bfloat16" else "float32")
  calls = []
  score, convert = learner.score, learner.rollout_model.convert
  learner.score = lambda *args: calls.append("score") or score(*args)
  learner.rollout_model = dataclasses.replace(
      learner.rollout_model, convert=lambda p: calls.append("convert") or convert(p))
  last = learner.train()
  assert calls == ["convert", "score"]   # one conversion per update, then the trainer scores
  assert np.isfinite(last["loss"]) and last["grad_norm"] > 0
  gap_max, gap_mean = last["logprob_gap_sampler_trainer"], last["logprob_gap_mean"]
  print(f"rollout.dtype={dtype}: logprob gap mean {gap_mean:.2e}, max {gap_max:.2e}")
  # The tiny test model is near its init (near-uniform logits), so the gaps are small but
  # real: other numerics than the float32 trainer's.
  assert 0 < gap_mean <= gap_max < 0.5, (gap_mean, gap_max)


def test_rollout_dtype_config_errors(tmp_path):
  with pytest.raises(ValueError, match=r"rl.old_logprobs='sampler'.*rollout.dtype='int8'"):
    trainers.make_learner(_config(**{"rollout.dtype": "int8", "rl.old_logprobs": "sampler"}),
                          tmp_path)
  with pytest.raises(ValueError, match="rollout.dtype='float16' is not one of"):
    trainers.make_learner(_config(**{"rollout.dtype": "float16"}), tmp_path)
