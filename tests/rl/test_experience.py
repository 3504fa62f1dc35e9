"""ExGRPO's experience buffer (arXiv 2510.02245 §3): buckets, the Gaussian priority against a
hand transcription of the paper's formula, lowest-entropy choice, retirement, determinism, an
exact state round trip through JSON and through a checkpoint, and feeding it from rollouts."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from wakea_jax.checkpoints.manager import CheckpointManager
from wakea_jax.rl.experience import (
  ExperienceBuffer,
  ExperienceConfig,
  Trajectory,
  WithExperience,
  bucket_of,
  groups_from_rollouts,
  mix,
  priority_weights,
  prompt_key,
  sampled_entropy,
)
from wakea_jax.rl.prompts import PromptIterator, PromptRecord
from wakea_jax.rl.rollout import Rollouts


def _traj(tokens: list[int], entropy: float, reward: float = 1.0, step: int = 0) -> Trajectory:
  n = len(tokens)
  return Trajectory(completion_ids=np.array(tokens), completion_mask=np.ones(n),
                    behaviour_logprobs=-np.linspace(0.1, 1.0, n), reward=reward,
                    entropy=entropy, step=step)


def _group(key: int, correct: list[bool], entropies: list[float] | None = None,
           step: int = 0) -> list[Trajectory]:
  entropies = entropies or [0.5 + 0.1 * i for i in range(len(correct))]
  return [_traj([key, step, i, 7], h, float(c), step) for i, (c, h)
          in enumerate(zip(correct, entropies))]


def _buffer(seed: int = 0, **overrides) -> ExperienceBuffer:
  """Eight prompts with rates 1/4 .. 3/4 visited once (K = 4), replay started."""
  config = ExperienceConfig(start_accuracy=0.0, **overrides)
  buf = ExperienceBuffer(config, seed=seed)
  keys, groups, correct = [], [], []
  for p in range(8):
    right = [i < 1 + p % 3 for i in range(4)]       # 1, 2 or 3 of 4 correct
    keys.append(f"p{p}")
    groups.append(_group(p, right))
    correct.append(right)
  buf.observe(keys, groups, correct)
  return buf


def test_config_is_validated():
  with pytest.raises(ValueError, match="replay_ratio"):
    ExperienceConfig(replay_ratio=1.5)
  with pytest.raises(ValueError, match="low_max"):
    ExperienceConfig(low_max=0.8, medium_max=0.5)
  with pytest.raises(ValueError, match="priority_sigma"):
    ExperienceConfig(priority_sigma=0.0)
  with pytest.raises(ValueError, match="retire_after"):
    ExperienceConfig(retire_after=0)


def test_buckets_use_the_papers_thresholds():
  c = ExperienceConfig()
  # Low (0, 25%], medium (25%, 75%], high (75%, 100%): K = 8 success counts 0..8.
  assert [bucket_of(k / 8, c) for k in range(9)] == (
      ["low"] * 3 + ["medium"] * 4 + ["high"] * 2)
  buf = _buffer()
  assert {k: bucket_of(buf.rate(k), c) for k in ("p0", "p1", "p2")} == {
      "p0": "low", "p1": "medium", "p2": "medium"}
  metrics = buf.metrics()
  assert (metrics["experience/prompts_low"], metrics["experience/prompts_medium"],
          metrics["experience/prompts_high"]) == (3.0, 5.0, 0.0)


def test_rate_is_the_latest_visits():
  buf = ExperienceBuffer(ExperienceConfig(rate_window=2, start_accuracy=0.0))
  buf.observe(["q"], [_group(0, [True, False, False, False])], [[True, False, False, False]])
  buf.observe(["q"], [_group(0, [True] * 3 + [False], step=1)], [[True] * 3 + [False]])
  assert buf.rate("q") == 4 / 8
  buf.observe(["q"], [_group(0, [False] * 4, step=2)], [[False] * 4])
  assert buf.rate("q") == 3 / 8                       # the first visit left the window


def test_priority_weights_are_the_papers_gaussian():
  rates = np.array([0.0, 0.125, 0.25, 0.5, 0.75, 1.0])
  for sigma in (1.0, 0.125):
    # N(Acc; mu = 0.5, sigma), arXiv 2510.02245 §3.1, written out by hand.
    hand = [1 / math.sqrt(2 * math.pi * sigma ** 2) * math.exp(-(a - 0.5) ** 2 / (2 * sigma ** 2))
            for a in rates]
    np.testing.assert_allclose(priority_weights(rates, sigma), hand, rtol=1e-12)
  # The medium bucket is preferred, symmetrically.
  w = priority_weights(rates, 0.125)
  assert w[3] > w[2] > w[1] > w[0]
  np.testing.assert_allclose(w[[2, 0]], w[[4, 5]], rtol=1e-12)


def test_draw_probabilities_weight_rate_groups_then_prompts():
  buf = _buffer(priority_sigma=0.25)
  probs = buf.draw_probabilities()
  # Rates: p0, p3, p6 at 1/4; p1, p4, p7 at 2/4; p2, p5 at 3/4.
  g = {a: math.exp(-(a - 0.5) ** 2 / (2 * 0.25 ** 2)) for a in (0.25, 0.5, 0.75)}
  total = sum(g.values())
  assert probs["p0"] == pytest.approx(g[0.25] / total / 3)
  assert probs["p1"] == pytest.approx(g[0.5] / total / 3)
  assert probs["p2"] == pytest.approx(g[0.75] / total / 2)
  assert sum(probs.values()) == pytest.approx(1.0)
  # The sampler follows them: first draws over many seeds.
  counts = dict.fromkeys(probs, 0)
  for seed in range(600):
    counts[_buffer(seed, priority_sigma=0.25).sample(1)[0].key] += 1
  medium = sum(counts[k] for k in ("p1", "p4", "p7")) / 600
  assert medium == pytest.approx(3 * probs["p1"], abs=0.06)


def test_lowest_entropy_trajectory_is_chosen():
  buf = ExperienceBuffer(ExperienceConfig(start_accuracy=0.0))
  right = [True, True, True, False]
  buf.observe(["q"], [_group(0, right, entropies=[0.9, 0.2, 0.5, 0.0])], [right])
  (replay,) = buf.sample(4)
  assert replay.trajectory.entropy == 0.2             # the wrong rollout (0.0) is not stored
  assert replay.bucket == "medium" and replay.rate == 0.75   # (25%, 75%] is medium
  # A current-policy scoring overrides the stored entropies (the paper's choice).
  (replay,) = buf.sample(1, entropy_fn=lambda key, ts: [0.1, 0.3, 0.2])
  assert replay.trajectory.entropy == 0.9
  assert buf.metrics()["experience/replay_entropy"] == 0.9


def test_capacity_keeps_the_newest_and_skips_duplicates():
  buf = ExperienceBuffer(ExperienceConfig(max_per_prompt=3, start_accuracy=0.0))
  for step in range(3):
    right = [True, True, False, False]
    buf.observe(["q"], [_group(0, right, step=step)], [right])
  buf.observe(["q"], [_group(0, [True, False], step=2)], [[True, False]])   # a duplicate
  assert [(t.step, int(t.completion_ids[2])) for t in buf.trajectories("q")] == [
      (1, 1), (2, 0), (2, 1)]


def test_always_solved_prompts_retire():
  buf = ExperienceBuffer(ExperienceConfig(retire_after=2, start_accuracy=0.0))
  buf.observe(["q", "r"], [_group(0, [True] * 4), _group(1, [True, False] * 2)],
              [[True] * 4, [True, False] * 2])
  assert not buf.retired("q") and buf.replayable() == ["q", "r"]
  buf.observe(["q"], [_group(0, [True] * 4, step=1)], [[True] * 4])
  assert buf.retired("q") and buf.trajectories("q") == [] and buf.replayable() == ["r"]
  buf.observe(["q"], [_group(0, [True, False] * 2, step=2)], [[True, False] * 2])
  assert buf.retired("q") and buf.replayable() == ["r"]      # never comes back
  assert {r.key for r in buf.sample(5)} == {"r"}
  assert buf.metrics()["experience/retired"] == 1.0


def test_replay_waits_for_the_delayed_start_and_min_prompts():
  buf = ExperienceBuffer(ExperienceConfig(start_accuracy=0.35, min_prompts=2))
  low = [True, False, False, False]
  buf.observe(["a", "b"], [_group(0, low), _group(1, low)], [low, low])   # accuracy 0.25
  assert not buf.ready() and buf.sample(4) == [] and buf.replay_groups(8) == 0
  half = [True, True, False, False]
  buf.observe(["c"], [_group(2, half)], [half])                          # accuracy 0.5
  assert buf.ready() and buf.replay_groups(8) == 3    # floor(8 * 0.5) = 4, 3 replayable
  assert buf.metrics()["experience/replay_ratio"] == 3 / 8


def test_mix():
  assert mix(16, 0.5) == (8, 8)
  assert mix(100, 0.29) == (71, 29)
  assert mix(7, 0.5) == (4, 3)
  assert mix(16, 0.5, available=2) == (14, 2)
  assert mix(16, 0.0) == (16, 0)
  with pytest.raises(ValueError, match="replay_ratio"):
    mix(4, 2.0)


def test_sampling_is_deterministic_given_the_seed():
  draws = [[(r.key, r.trajectory.entropy) for r in _buffer(seed=s).sample(5)]
           for s in (3, 3, 4)]
  assert draws[0] == draws[1]
  assert len({k for k, _ in draws[0]}) == 5          # without replacement
  assert draws[0] != draws[2]


def test_state_round_trips_exactly_through_json():
  straight, resumed = _buffer(seed=11), _buffer(seed=11)
  first = straight.sample(3)
  assert [r.key for r in resumed.sample(3)] == [r.key for r in first]
  text = json.dumps(resumed.state_dict())            # what the checkpoint's JSON item holds
  restored = ExperienceBuffer(resumed.config, seed=999)
  restored.load_state_dict(json.loads(text))
  assert restored.state_dict() == resumed.state_dict()
  for buf in (straight, restored):                   # the same future: observations, draws
    right = [True, True, True, False]
    buf.observe(["p9"], [_group(9, right, step=5)], [right])
  again, after = straight.sample(4), restored.sample(4)
  assert [r.key for r in again] == [r.key for r in after]
  for a, b in zip(again, after):
    for field in ("completion_ids", "completion_mask", "behaviour_logprobs"):
      x, y = getattr(a.trajectory, field), getattr(b.trajectory, field)
      assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (a.trajectory.reward, a.trajectory.entropy, a.trajectory.step) == (
        b.trajectory.reward, b.trajectory.entropy, b.trajectory.step)
  assert straight.metrics() == restored.metrics()


def test_prompt_key_and_sampled_entropy():
  messages = ({"role": "user", "content": "2+2?"},)
  assert prompt_key(messages) == prompt_key([{"content": "2+2?", "role": "user"}])
  assert prompt_key(messages) != prompt_key([{"role": "user", "content": "2+3?"}])
  assert sampled_entropy(np.array([-1.0, -3.0, -9.0]), np.array([1, 1, 0])) == 2.0
  assert sampled_entropy(np.zeros(2), np.zeros(2)) == 0.0
  with pytest.raises(ValueError, match="finite"):
    _traj([1, 2], float("nan"))


def test_groups_from_rollouts_feed_observe():
  records = [PromptRecord(messages=({"role": "user", "content": q},)) for q in ("1+1", "2+2")]
  completions = [[5, 6, 2], [5, 7, 2], [8, 2], [9, 9, 9, 2]]
  logprobs = [np.array([-0.5, -1.0, -1.5]), np.array([-0.1, -0.2, -0.3]),
              np.array([-2.0, -4.0]), np.array([-1.0, 0.0, -3.0, -1.0])]
  tool_mask = [np.zeros(3, np.int32), np.zeros(3, np.int32), np.zeros(2, np.int32),
               np.array([0, 1, 0, 0], np.int32)]
  rollouts = Rollouts(prompts=[records[0]] * 2 + [records[1]] * 2, prompt_ids=[[1]] * 4,
                      completion_ids=completions, sampler_logprobs=logprobs,
                      tool_mask=tool_mask, num_tool_calls=[0, 0, 0, 1],
                      stop_reason=["stop"] * 4, texts=[""] * 4, finals=[""] * 4,
                      tool_errors=[0] * 4, group_size=2)
  rewards, correct = np.array([1.0, 0.0, 0.0, 1.0]), np.array([True, False, False, True])
  keys, groups, flags = groups_from_rollouts(rollouts, rewards, correct, step=3)
  assert keys == [prompt_key(records[0]), prompt_key(records[1])]
  assert flags == [[True, False], [False, True]]
  tool_row = groups[1][1]
  assert tool_row.completion_mask.tolist() == [1, 0, 1, 1] and tool_row.step == 3
  assert tool_row.entropy == pytest.approx(5.0 / 3)          # -(-1 - 3 - 1) / 3 model tokens
  assert tool_row.behaviour_logprobs.tolist() == [-1.0, 0.0, -3.0, -1.0]
  buf = ExperienceBuffer(ExperienceConfig(start_accuracy=0.0))
  buf.observe(keys, groups, flags)
  assert [len(buf.trajectories(k)) for k in keys] == [1, 1]


def test_buffer_resumes_exactly_from_a_checkpoint(tmp_path):
  """The buffer rides in the checkpoint's JSON data item with the prompt position."""
  records = [PromptRecord(messages=({"role": "user", "content": str(i)},)) for i in range(6)]
  straight = WithExperience(PromptIterator(records, 2, seed=1), _buffer(seed=5))
  straight.buffer.sample(2)
  next(straight.data)
  manager = CheckpointManager(tmp_path, keep=1)
  manager.save(1, {"w": jnp.zeros(2)}, data_state=straight.get_state())
  manager.wait_until_finished()
  _, data_state, _ = manager.restore({"w": jnp.zeros(2)})
  manager.close()
  resumed = WithExperience(PromptIterator(records, 2, seed=1), ExperienceBuffer(
      straight.buffer.config, seed=0))
  resumed.set_state(data_state)
  assert resumed.buffer.state_dict() == straight.buffer.state_dict()
  assert [r.key for r in resumed.buffer.sample(4)] == [r.key for r in straight.buffer.sample(4)]
  assert next(resumed.data) == next(straight.data)
  # A checkpoint from before the buffer: its bare prompt position, an empty buffer.
  legacy = WithExperience(PromptIterator(records, 2, seed=1), ExperienceBuffer())
  legacy.set_state(straight.data.get_state())
  assert legacy.buffer.replayable() == [] and next(legacy.data) == next(straight.data)
