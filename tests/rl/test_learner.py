"""The RL learner end to end on a tiny from-scratch model: GRPO variants, PPO, resume."""

import pathlib

import chex
import jax
import numpy as np
import pytest

from wakea_jax import trainers
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.config_files import get_config
from wakea_jax.rl import learner as learner_lib
from wakea_jax.train import metrics as metrics_lib


def _config(name, variant="test", **overrides):
  return get_config(f"{name}:{variant}", **overrides)


def _params(workdir):
  learner = trainers.make_learner(_config("grpo"), workdir)
  manager = CheckpointManager(pathlib.Path(workdir) / "checkpoints")
  state, _, _ = manager.restore(learner.state)
  manager.close()
  return jax.tree.leaves(state.params)


def test_grpo_runs_logs_and_checkpoints(tmp_path):
  last = trainers.run(_config("grpo"), tmp_path)
  for key in ("reward_mean", "reward_std", "reward/math_mean", "zero_variance_fraction",
              "clip_fraction", "approx_kl", "entropy", "response_length",
              "logprob_gap_mean", "time/rollout_s", "time/reward_s",
              "time/update_s", "eval_greedy_accuracy", "eval_pass@2"):
    assert key in last, key
  # Ratio 1 on-policy: the trainer reproduces the sampler's log-probs (measured by the single
  # update's own forward pass: rl.old_logprobs="auto" skips the re-scoring pass here).
  assert last["logprob_gap_mean"] < 1e-5
  assert np.isfinite(last["loss"])
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3, 4]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  # A finished run resumes to "nothing to do".
  again = trainers.run(_config("grpo"), tmp_path)
  assert again == {}


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
  overrides = {"train.checkpoint_every": 1, "train.eval_every": 100,
               "train.eval_at_start": False}
  trainers.run(_config("grpo", **overrides), tmp_path / "straight")

  original = learner_lib.Learner.step

  def crash_at_3(self, step):
    if step == 2:
      raise KeyboardInterrupt("simulated crash")
    return original(self, step)

  monkeypatch.setattr(learner_lib.Learner, "step", crash_at_3)
  with pytest.raises(KeyboardInterrupt):
    trainers.run(_config("grpo", **overrides), tmp_path / "resumed")
  monkeypatch.setattr(learner_lib.Learner, "step", original)
  trainers.run(_config("grpo", **overrides), tmp_path / "resumed")
  chex.assert_trees_all_equal(_params(tmp_path / "straight"), _params(tmp_path / "resumed"))


@pytest.mark.parametrize("variant_overrides", [
    {"rl.advantage": "dr_grpo", "loss.aggregation": "seq_sum_constant",
     "loss.loss_constant": 8.0},
    {"loss.eps_high": 0.28, "loss.aggregation": "token_mean", "rl.dynamic_sampling": True,
     "rl.overlong_filter": True},
    {"loss.ratio": "sequence", "loss.eps_low": 3e-4, "loss.eps_high": 4e-4,
     "rl.num_iterations": 2, "rl.minibatches": 2},
    {"loss.kl_beta": 0.05, "loss.kl_estimator": "k3", "rl.advantage": "rloo"},
])
def test_grpo_family_variants_run(tmp_path, variant_overrides):
  overrides = {"train.steps": 2, "train.eval_at_start": False, **variant_overrides}
  last = trainers.run(_config("grpo", **overrides), tmp_path)
  assert np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"])
  if "loss.kl_beta" in variant_overrides:
    assert "ref_kl" in last and last["ref_kl"] >= 0.0
  if variant_overrides.get("rl.dynamic_sampling"):
    assert last["sampling_rounds"] >= 1


def test_ppo_runs_with_a_value_head(tmp_path):
  config = _config("ppo", **{"train.steps": 2, "train.eval_at_start": False,
                             "rl.system_prompt": "Be exact."})
  learner = trainers.make_learner(config, tmp_path)
  assert learner.model_config.value_head
  # rl.system_prompt (e.g. APO's best prompt) replaces every train and eval prompt's own.
  for record in [*learner.prompts.records[0], *learner.eval_prompts]:
    assert [m["content"] for m in record.messages if m["role"] == "system"] == ["Be exact."]
  last = learner.train()
  assert np.isfinite(last["value_mse"]) and np.isfinite(last["loss"])
  assert last["logprob_gap_sampler_trainer"] < 1e-4   # PPO re-scores (it needs the values)


def test_bad_config_errors(tmp_path):
  with pytest.raises(ValueError, match="rl.prompts_per_step"):
    trainers.run(_config("grpo", **{"rl.prompts_per_step": 0}), tmp_path)
  with pytest.raises(ValueError, match="rl.advantage"):
    trainers.run(_config("grpo", **{"rl.advantage": "nope"}), tmp_path)


@pytest.mark.parametrize("slots", [0, 3])
def test_grpo_with_the_tool_loop_in_rollouts(tmp_path, slots):
  """The `tools` path: rollouts go through run_tool_loop, or with rollout.slots the continuous
  batcher's tool path (a random tiny model rarely calls a tool; the masking of tool tokens is
  tested in test_rollout.py and sampling/test_tool_loop, the batcher's equality with the tool
  loop in sampling/test_batching)."""
  config = _config("grpo", **{"train.steps": 1, "train.eval_at_start": False,
                              "rollout.tools": ("calculator",), "rollout.max_tool_calls": 1,
                              "rollout.max_tool_tokens": 32, "rollout.slots": slots})
  learner = trainers.make_learner(config, tmp_path)
  assert learner.router is not None and "calculator" in learner.router.tools
  last = learner.train()
  assert np.isfinite(last["loss"]) and "tool_calls" in last


def test_sampler_logprobs_skip_the_scoring_pass_and_train_the_same(tmp_path, monkeypatch):
  """rl.old_logprobs="sampler" (what "auto" picks for a single update) makes no second
  forward pass over the rollouts, and trains what re-scoring ("trainer") trains."""
  from tests.parallel.rl_child import vowel_reward
  from wakea_jax.rl import rewards as rewards_lib

  monkeypatch.setitem(rewards_lib.REWARDS, "vowels", vowel_reward)   # varies per completion
  runs = {}
  for mode in ("trainer", "sampler"):
    config = _config("grpo", **{"train.steps": 2, "train.eval_at_start": False,
                                "train.eval_every": 100, "rl.old_logprobs": mode})
    config.reward = {"vowels": {"weight": 1.0}}
    learner = trainers.make_learner(config, tmp_path / mode)
    calls = []
    score = learner.score
    learner.score = lambda *args, calls=calls, score=score: calls.append(1) or score(*args)
    last = learner.train()
    runs[mode] = (last, len(calls), jax.tree.leaves(learner.state.params))
  (trainer, trainer_calls, trainer_params), (sampler, sampler_calls, sampler_params) = (
      runs["trainer"], runs["sampler"])
  assert trainer_calls == 2 and sampler_calls == 0
  assert "logprob_gap_sampler_trainer" in trainer and "logprob_gap_sampler_trainer" not in sampler
  assert sampler["logprob_gap_mean"] < 1e-5 and trainer["logprob_gap_mean"] < 1e-5
  assert trainer["grad_norm"] > 1e-4                           # the updates are real
  assert trainer["reward_mean"] == sampler["reward_mean"]      # the same rollouts
  for a, b in zip(trainer_params, sampler_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_ppo_refuses_sampler_logprobs(tmp_path):
  with pytest.raises(ValueError, match="rl.old_logprobs"):
    trainers.make_learner(_config("ppo", **{"rl.old_logprobs": "sampler"}), tmp_path)


def test_continuous_batching_rollouts_train_what_static_ones_do(tmp_path, monkeypatch):
  """rollout.slots > 0 samples through the continuous batcher: with per-request keys the
  rollouts, rewards, evaluation and updates equal static batching's."""
  from tests.parallel.rl_child import vowel_reward
  from wakea_jax.rl import rewards as rewards_lib

  monkeypatch.setitem(rewards_lib.REWARDS, "vowels", vowel_reward)
  runs = {}
  for slots in (0, 3):
    config = _config("grpo", **{"train.steps": 1, "train.eval_at_start": False,
                                "rollout.slots": slots})
    config.reward = {"vowels": {"weight": 1.0}}
    learner = trainers.make_learner(config, tmp_path / str(slots))
    last = learner.train()
    runs[slots] = (last, jax.tree.leaves(learner.state.params))
  (static, static_params), (continuous, continuous_params) = runs[0], runs[3]
  for key in ("reward_mean", "reward_std", "response_length", "eval_sample_accuracy"):
    assert continuous[key] == pytest.approx(static[key], abs=1e-6), key
  for a, b in zip(static_params, continuous_params):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_tensor_parallel_rollouts_train_what_the_trainer_mesh_does(tmp_path, monkeypatch):
  """rollout.tensor=2 samples on a (data, tensor=2) mesh of its own, its params resharded from
  the trainer's each update: the same rollouts, rewards and updates as sampling on the
  trainer's mesh, and the sampler's log-probs are the trainer's (the gap is logged). With
  mesh.devices=1 the trainer keeps to the first device while the rollouts span all."""
  from tests.parallel.rl_child import vowel_reward
  from wakea_jax.rl import rewards as rewards_lib

  monkeypatch.setitem(rewards_lib.REWARDS, "vowels", vowel_reward)
  runs = {}
  for tensor, devices in ((0, 0), (2, 0), (2, 1)):
    # Two steps: the second step's rollouts sample the first update's params, resharded.
    config = _config("grpo", **{"train.steps": 2, "train.eval_at_start": False,
                                "train.eval_every": 100, "rollout.tensor": tensor,
                                "mesh.devices": devices,
                                # large enough that stale sampler params would show
                                "optimizer.learning_rate": 1e-2,
                                "optimizer.warmup_steps": 0})
    config.reward = {"vowels": {"weight": 1.0}}
    learner = trainers.make_learner(config, tmp_path / f"{tensor}_{devices}")
    meshes = {dict(leaf.sharding.mesh.shape)["tensor"]
              for leaf in jax.tree.leaves(learner.rollout_params())}
    assert meshes == {max(tensor, 1)}
    assert learner.rollout_mesh.devices.size == jax.device_count()
    trainer_devices = {d for leaf in jax.tree.leaves(learner.state.params)
                       for d in leaf.sharding.device_set}
    assert len(trainer_devices) == (devices or jax.device_count())
    last = learner.train()
    runs[tensor, devices] = (last, jax.tree.leaves(learner.state.params))
  single, single_params = runs[0, 0]
  for split, split_params in (runs[2, 0], runs[2, 1]):
    assert split["logprob_gap_mean"] < 1e-5
    for key in ("reward_mean", "reward_std", "response_length", "grad_norm"):
      assert split[key] == pytest.approx(single[key], abs=1e-5), key
    # At this learning rate Adam turns the float-order differences of the split matmuls
    # (~1e-7 in the log-probs) into a few parameters 2e-5 apart after two steps.
    for a, b in zip(single_params, split_params):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
