"""ExGRPO replay in the learner (rl/replay.py): mixing a stored trajectory into its prompt's
group, a learner step with a filled buffer, exact resume with a non-empty buffer, and the
hybrid (LUFFY traces + replay) run."""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import numpy as np
import pytest

from wakea_jax import trainers
from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.config_files import get_config
from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.rl import experience as ex
from wakea_jax.rl import learner as learner_lib
from wakea_jax.rl import offpolicy as op
from wakea_jax.rl import replay
from wakea_jax.rl import rewards as rewards_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl.prompts import load_prompts, to_prompt_record
from wakea_jax.train import metrics as metrics_lib


def _rollouts(prompts, tokenizer, g=3):
  rows = [p for p in prompts for _ in range(g)]
  n = len(rows)
  return rollout_lib.Rollouts(
      prompts=rows, prompt_ids=[p.render(tokenizer) for p in rows],
      completion_ids=[[5, 6]] * n, sampler_logprobs=[np.full(2, -1.0, np.float32)] * n,
      tool_mask=[np.zeros(2, np.int32)] * n, num_tool_calls=[0] * n, stop_reason=["stop"] * n,
      texts=["x"] * n, finals=["x"] * n, tool_errors=[0] * n, group_size=g)


def _stored(tokens, logprob=-0.5, mask=None):
  n = len(tokens)
  return ex.Trajectory(completion_ids=np.array(tokens), completion_mask=(
      np.ones(n) if mask is None else np.array(mask)), behaviour_logprobs=np.full(n, logprob),
      reward=1.0, entropy=0.5)


def test_mix_replays_replaces_one_member_after_the_traces() -> None:
  tokenizer = default_tokenizer()
  prompts = [to_prompt_record({"prompt": q, "answer": "1"}, f"run:{i}")
             for i, q in enumerate(("a", "b", "c"))]
  rollouts = _rollouts(prompts, tokenizer)
  rollouts.stop_reason[8] = op.TRACE_STOP_REASON      # prompt c's last member is a trace
  stored = [_stored([7, 8, 9], -0.25), _stored([11, 12, 13, 14], -0.75, [1, 0, 0, 1])]
  replays = [ex.Replay(key=ex.prompt_key(p), trajectory=t, rate=0.5, bucket="medium")
             for p, t in zip(prompts[1:], stored)]
  mixed = replay.mix_replays(rollouts, replays, 1, tokenizer=tokenizer,
                             stop_ids=chat_stop_ids(tokenizer), max_new_tokens=64)
  # Group a is fresh; b's last member is the replay; c's trace keeps its row, the replay
  # takes the one before it: no row is replaced twice.
  np.testing.assert_array_equal(replay.is_replay_row(mixed), [0, 0, 0, 0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(replay.is_offpolicy_row(mixed), [0, 0, 0, 0, 0, 1, 0, 1, 1])
  assert mixed.completion_ids[5] == [7, 8, 9] and mixed.completion_ids[4] == [5, 6]
  np.testing.assert_array_equal(mixed.sampler_logprobs[7], np.full(4, -0.75))
  np.testing.assert_array_equal(mixed.tool_mask[7], [0, 1, 1, 0])
  assert mixed.num_tool_calls[7] == 1 and rollouts.stop_reason[5] == "stop"   # a copy
  cut = replay.mix_replays(rollouts, replays[:1], 1, tokenizer=tokenizer,
                           stop_ids=chat_stop_ids(tokenizer), max_new_tokens=2)
  assert cut.completion_ids[5] == [7, 8] and len(cut.sampler_logprobs[5]) == 2
  with pytest.raises(ValueError, match="not the replayed prompt"):
    replay.mix_replays(rollouts, replays, 0, tokenizer=tokenizer, stop_ids=[], max_new_tokens=8)
  # The buffer observes the sampled rows only: a's 3, b's 2, c's 1 (a replay and a trace,
  # both correct, are neither counted nor stored).
  buf = ex.ExperienceBuffer(ex.ExperienceConfig(start_accuracy=0.0))
  correct = np.array([1, 0, 0, 1, 1, 0, 0, 1, 1], bool)
  replay.observe(buf, mixed, correct.astype(np.float32), correct,
                 replay.is_offpolicy_row(mixed), step=1)
  a, b, c = (ex.prompt_key(p) for p in prompts)
  assert [buf.rate(a), buf.rate(c)] == [1 / 3, 0.0] and buf.retired(b)   # b: all right
  assert [t.completion_ids.tolist() for t in buf.trajectories(a)] == [[5, 6]]
  assert buf.trajectories(c) == []


@pytest.fixture
def parity_reward(monkeypatch):
  """A reward a from-scratch model earns about half the time, deterministically: the
  completion's characters' code points sum to an even number."""
  def parity():
    return lambda samples: np.array([float(sum(map(ord, s.completion)) % 2 == 0)
                                     for s in samples], np.float32)
  monkeypatch.setitem(rewards_lib.REWARDS, "parity", parity)


def _config(**overrides):
  """grpo:test with ExGRPO from the first step on, rewarded by parity: 2 groups of 8."""
  config = get_config("grpo:test", **{"data.eval_sources": "", "train.eval_at_start": False,
                                      "rollout.group_size": 8, "rl.prompts_per_step": 2})
  config.reward = {"parity": {"weight": 1.0}}
  config.eval.correct_reward = "parity"
  config.experience.update(enabled=True, start_accuracy=0.0)
  config.update_from_flattened_dict(overrides)
  return config


def _fill(learner):
  """Every prompt of the run gets two stored trajectories (a visit of 4, 2 right: medium)."""
  records = list(learner.prompt_index.values())
  keys = [ex.prompt_key(r) for r in records]
  groups = [[_stored([40 + i, 41, 42], -0.5 - 0.01 * i), _stored([40 + i, 43], -0.25)]
            + [_stored([3, 3])] * 2 for i in range(len(records))]
  learner.buffer.observe(keys, groups, [[True, True, False, False]] * len(records))
  return {k: g[:2] for k, g in zip(keys, groups)}


def _capture(learner):
  batches = []
  update = learner._update
  learner._update = lambda batch, step: batches.append(batch) or update(batch, step)
  return batches


def test_learner_replays_stored_trajectories_into_groups(tmp_path,
                                                        parity_reward) -> None:
  learner = trainers.make_learner(_config(), tmp_path)
  stored = _fill(learner)
  batches = _capture(learner)
  scored = []
  entropy = learner.entropy
  learner.entropy = lambda *args: scored.append(np.asarray(entropy(*args))) or scored[-1]
  metrics = learner.step(0)
  batch = batches[0]
  assert batch["input_ids"].shape[0] == 16      # plain GRPO's rollout count: 2 groups of 8
  off = batch["off_policy"].reshape(2, 8) > 0
  # floor(2 * 0.5) = 1 replayed group (the last) with exactly one off-policy row, its last
  # member, whose tokens and old log-probs are one stored trajectory's.
  np.testing.assert_array_equal(off, [[0] * 8, [0] * 7 + [1]])
  trained = batch["loss_mask"][15] > 0
  candidates = next(c for c in stored.values()
                    if any(np.array_equal(batch["targets"][15][trained], t.completion_ids)
                           for t in c))
  # The choice is the lowest entropy under the current policy (one pass over the 8 rows of
  # the prompt's candidates: its 2 stored trajectories, padded), not the stored entropies.
  (entropies,) = scored
  assert entropies.shape == (8,) and np.all(entropies[:2] > 0)
  traj = candidates[int(np.argmin(entropies[:2]))]
  np.testing.assert_array_equal(batch["targets"][15][trained], traj.completion_ids)
  np.testing.assert_allclose(batch["old_logprobs"][15][trained], traj.behaviour_logprobs)
  assert metrics["experience/replay_entropy"] == pytest.approx(entropies[:2].min())
  assert metrics["experience/replay_ratio"] == 0.5 and metrics["offpolicy_fraction"] == 1 / 16
  assert metrics["experience/offpolicy_fraction"] == 1 / 16
  w = [metrics[f"experience/importance_weight_{k}"] for k in ("min", "mean", "max")]
  assert 0 < w[0] <= w[1] <= w[2] < 1 and np.isfinite(metrics["loss"])
  assert metrics["logprob_gap_mean"] < 1e-4          # over the sampled rows only
  assert metrics["experience/prompts_medium"] >= 62       # the 64 filled, 2 visited again


TIMING = ("steps_per_s", "tokens_per_s", "eta_s", "tflops_per_s", "mfu")


def _records(workdir):
  return {r["step"]: {k: v for k, v in r.items()
                      if not k.startswith("time/") and k not in TIMING}
          for r in metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if "loss" in r}


def _restored(workdir, target):
  manager = CheckpointManager(pathlib.Path(workdir) / "checkpoints")
  state, data_state, _ = manager.restore(target)
  manager.close()
  return jax.tree.leaves(state.params), data_state


def test_resume_with_a_non_empty_buffer_is_exact(tmp_path, monkeypatch,
                                                 parity_reward) -> None:
  overrides = {"train.steps": 2, "train.checkpoint_every": 1, "train.eval_every": 100}
  trainers.run(_config(**overrides), tmp_path / "straight")
  original = learner_lib.Learner.step

  learners = []

  def crash_at_2(self, step):   # the loop's steps count from 0: the run's second step
    learners.append(self)
    if step == 1:
      raise KeyboardInterrupt("simulated crash")
    return original(self, step)

  monkeypatch.setattr(learner_lib.Learner, "step", crash_at_2)
  with pytest.raises(KeyboardInterrupt):
    trainers.run(_config(**overrides), tmp_path / "resumed")
  target = learners[0].state
  _, data_state = _restored(tmp_path / "resumed", target)   # the checkpoint of step 1
  assert data_state["experience"][0]["prompts"] and data_state["experience"][0]["started"]
  monkeypatch.setattr(learner_lib.Learner, "step", original)
  trainers.run(_config(**overrides), tmp_path / "resumed")
  (params, state), (params2, state2) = (_restored(tmp_path / d, target)
                                        for d in ("straight", "resumed"))
  assert json.dumps(state, sort_keys=True) == json.dumps(state2, sort_keys=True)
  chex.assert_trees_all_equal(params, params2)
  straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
  assert straight[2]["experience/replay_ratio"] == 0.5   # step 2 replayed from the buffer
  assert straight == resumed


def test_hybrid_traces_and_replay_two_steps(tmp_path, parity_reward) -> None:
  config = _config()
  records = [{"messages": [dict(m) for m in p.messages],       # two traces per prompt
              "trace": f"{lead}<answer>{p.answer}</answer>"}
             for p in load_prompts(config.data.sources) for lead in ("", "So ")]
  path = tmp_path / "traces.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  config.offpolicy.update(traces=str(path), per_group=2)
  learner = trainers.make_learner(config, tmp_path / "run")
  _fill(learner)
  batches = _capture(learner)
  last = [learner.step(step) for step in (0, 1)][-1]
  for batch in batches:
    # Two groups of 8: the traces take the last two members of both, the replay (group 1,
    # floor(2 * 0.5)) the member before them.
    off = batch["off_policy"].reshape(2, 8) > 0
    np.testing.assert_array_equal(off, [[0] * 6 + [1] * 2, [0] * 5 + [1] * 3])
  assert last["offpolicy_fraction"] == 5 / 16 and last["experience/replay_ratio"] == 0.5
  assert last["experience/offpolicy_fraction"] == 1 / 16
  assert np.isfinite(last["loss"]) and 0 < last["importance_weight_mean"] < 1


def test_experience_config_errors(tmp_path, parity_reward) -> None:
  with pytest.raises(ValueError, match=r"group_size > 8"):
    trainers.make_learner(_config(**{"offpolicy.traces": "x.jsonl", "offpolicy.per_group": 7}),
                          tmp_path)
  with pytest.raises(ValueError, match="needs objective 'grpo'"):
    config = get_config("ppo:test")
    config.experience.enabled = True
    trainers.make_learner(config, tmp_path)
  with pytest.raises(ValueError, match=r"config\.experience: experience\.replay_ratio"):
    trainers.make_learner(_config(**{"experience.replay_ratio": 1.5}), tmp_path)
  with pytest.raises(ValueError, match=r"experience\.entropy='stored' is not one of"):
    trainers.make_learner(_config(**{"experience.entropy": "stored"}), tmp_path)
