"""GRPO on image prompts: rollouts prefilled with the images, scored and trained with them
(also with a bfloat16 / int8 rollout decoder, and on a tensor-parallel rollout mesh)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.test_multimodal_run import _records
from wakea_jax.checkpoints.llava import load_llava
from wakea_jax.config_files import get_config
from wakea_jax.data import sources
from wakea_jax.data.tasks import shapes
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.trainers import make_learner, run


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("media_rl")
  data = root / "data"
  records = _records(data, 16, 0)
  sources.write_jsonl(records, data / "train.jsonl")
  for r in records:
    r["answer"] = r["messages"][-1]["content"]
  sources.write_jsonl(shapes.prompts(records), data / "prompts.jsonl")
  config = get_config("multimodal:test")
  config.data.sources = str(data / "train.jsonl")
  config.data.eval_sources = ""
  run(config, root / "sft")
  return root


def _grpo(root):
  config = get_config("multimodal:test_grpo")
  config.data.sources = str(root / "data" / "prompts.jsonl")
  config.data.eval_sources = str(root / "data" / "prompts.jsonl")
  config.init_from = str(root / "sft")
  return config


def test_rollouts_carry_the_images_and_the_sampler_scores_like_the_trainer(sft_dir):
  learner = make_learner(_grpo(sft_dir), sft_dir / "probe")
  prompts = learner.prompts.take(4)
  rollouts = rollout_lib.generate_rollouts(
      learner.sampler, learner.rollout_params(), prompts, tokenizer=learner.tokenizer,
      config=learner.rollout, rng=jax.random.key(0), media=learner.media)
  assert rollouts.media["pixel_values"].shape == (16, 1, 3, 16, 16)
  # Every row's prompt has the image's 4 placeholders; rows of a group share the image.
  assert all(ids.count(1024) == 4 for ids in rollouts.prompt_ids)
  np.testing.assert_array_equal(rollouts.media["pixel_values"][0],
                                rollouts.media["pixel_values"][3])
  batch = rollout_lib.to_batch(rollouts, pad_id=learner.pad_id)
  logprobs, _ = learner.score(learner.state.params, learner.state.frozen, batch)
  mask = batch["loss_mask"] > 0
  np.testing.assert_allclose(np.asarray(logprobs)[mask], batch["sampler_logprobs"][mask],
                             atol=2e-5)
  # Without the images the trainer scores the same tokens differently: the image is used.
  blind = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_mask")}
  blind["input_ids"] = np.where(blind["input_ids"] == 1024, 0, blind["input_ids"])
  other, _ = learner.score(learner.state.params, learner.state.frozen, blind)
  assert np.abs(np.asarray(other)[mask] - batch["sampler_logprobs"][mask]).max() > 1e-3


def test_tool_loop_rollouts_take_the_images_too(sft_dir):
  """With the calculator on, rows that call it get a text tool turn; the model's own tokens
  still score as the sampler drew them, image included (tool tokens are masked out). On
  continuous batching (`rollout.slots`: 3 slots for 8 rows, so requests start in whichever
  slot frees) every rollout is the one static batching draws: the same tokens, log-probs
  within 1e-5. (This tiny SFT model seldom calls the tool; pauses and resumes with images
  are tested on a rigged model in tests/sampling/test_media_prompts.py.)"""
  config = _grpo(sft_dir)
  config.rollout.tools = ("calculator",)
  config.rollout.max_tool_calls = 1
  config.rollout.max_tool_tokens = 32
  learner = make_learner(config, sft_dir / "probe_tools")
  prompts = learner.prompts.take(4)

  def rollouts(slots):
    return rollout_lib.generate_rollouts(
        learner.sampler, learner.rollout_params(), prompts, tokenizer=learner.tokenizer,
        config=dataclasses.replace(learner.rollout, slots=slots), rng=jax.random.key(1),
        router=learner.router, media=learner.media)

  static = rollouts(0)
  batch = rollout_lib.to_batch(static, pad_id=learner.pad_id)
  logprobs, _ = learner.score(learner.state.params, learner.state.frozen, batch)
  mask = batch["loss_mask"] > 0
  np.testing.assert_allclose(np.asarray(logprobs)[mask], batch["sampler_logprobs"][mask],
                             atol=2e-5)
  continuous = rollouts(3)
  assert continuous.completion_ids == static.completion_ids
  assert [m.tolist() for m in continuous.tool_mask] == [m.tolist() for m in static.tool_mask]
  for ours, theirs in zip(continuous.sampler_logprobs, static.sampler_logprobs):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
  for key, value in static.media.items():
    np.testing.assert_array_equal(continuous.media[key], value)


def test_search_protocol_rollouts_take_the_images_too(sft_dir, tmp_path):
  """rollout.protocol="search_r1" on image prompts: the rows are prefilled with their images
  and score as the sampler drew them (searches that happen are masked out; this tiny SFT
  model seldom searches: a resumed row's images are tested on a rigged protocol in
  tests/sampling/test_media_prompts.py)."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"id": "shapes", "text": "A square has four sides."}\n')
  config = _grpo(sft_dir)
  config.rollout.protocol = "search_r1"
  config.rollout.index = str(corpus)
  config.rollout.update(max_searches=1, search_tokens=48)   # the tiny model: 128 positions
  learner = make_learner(config, sft_dir / "probe_search")
  rollouts = rollout_lib.generate_rollouts(
      learner.sampler, learner.rollout_params(), learner.prompts.take(2),
      tokenizer=learner.tokenizer, config=learner.rollout, rng=jax.random.key(2),
      media=learner.media)
  assert rollouts.media["pixel_values"].shape[0] == len(rollouts.completion_ids) == 8
  batch = rollout_lib.to_batch(rollouts, pad_id=learner.pad_id)
  logprobs, _ = learner.score(learner.state.params, learner.state.frozen, batch)
  mask = batch["loss_mask"] > 0
  np.testing.assert_allclose(np.asarray(logprobs)[mask], batch["sampler_logprobs"][mask],
                             atol=2e-5)


def test_grpo_run_on_image_prompts_trains_evaluates_and_exports(sft_dir):
  last = run(_grpo(sft_dir), sft_dir / "grpo")
  records = metrics_lib.read_jsonl(sft_dir / "grpo" / "metrics.jsonl")
  steps = [r for r in records if "reward_mean" in r]
  assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
  # The update's old log-probs are the sampler's: the gap it measures is float noise.
  assert max(r["logprob_gap_mean"] for r in steps) < 1e-4
  assert "eval_greedy_accuracy" in last
  load_llava(sft_dir / "grpo" / "export" / "hf")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_rollout_dtype_on_image_prompts_converts_the_decoder_and_reports_the_gap(
    sft_dir, monkeypatch, dtype):
  """rollout.dtype with image prompts: the sampler runs a LLaVA model whose decoder is the
  bfloat16 / int8 copy and whose tower and projector are the trainer's own params (float32);
  its greedy rollouts see the images (they are the float32 policy's, or nearly); a GRPO
  step re-scores with the trainer and logs a small, non-zero sampler-trainer gap."""
  from tests.parallel.rl_child import vowel_reward
  from wakea_jax.rl import rewards as rewards_lib

  monkeypatch.setitem(rewards_lib.REWARDS, "vowels", vowel_reward)   # varies per completion
  config = _grpo(sft_dir)
  config.train.update(steps=1, eval_every=100, eval_at_start=False)
  config.reward = {"vowels": {"weight": 1.0}}
  config.rollout.dtype = dtype
  learner = make_learner(config, sft_dir / f"rollout_{dtype}")
  assert learner.rescore                 # "auto" with a rollout dtype re-scores
  assert learner.sampler.config.dtype == ("bfloat16" if dtype == "bfloat16" else "float32")
  rollout = nnx.merge(learner.rollout_model.graphdef, learner.rollout_params())
  trainer = nnx.merge(learner.built.graphdef, learner.policy_params())
  assert type(rollout) is type(trainer)
  for part in ("vision_tower", "projector"):        # the trainer's, unconverted
    for ours, theirs in zip(jax.tree.leaves(nnx.state(getattr(rollout, part))),
                            jax.tree.leaves(nnx.state(getattr(trainer, part))), strict=True):
      assert ours.dtype == np.float32
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  kinds = {str(x.dtype) for x in jax.tree.leaves(nnx.state(rollout.language_model))}
  assert kinds == ({"bfloat16"} if dtype == "bfloat16" else {"int8", "float32"})
  # Greedy rollouts of the rollout copy and of the trainer's float32 policy, same prompts.
  prompts = learner.prompts.take(4)
  greedy = dataclasses.replace(learner.sampler, temperature=0.0)
  reference = dataclasses.replace(greedy, graphdef=learner.built.graphdef,
                                  config=trainer.config.text)

  def rollouts(sampler, params):
    return rollout_lib.generate_rollouts(
        sampler, params, prompts, tokenizer=learner.tokenizer, config=learner.rollout,
        rng=jax.random.key(3), media=learner.media)

  ours = rollouts(greedy, learner.rollout_params())
  theirs = rollouts(reference, learner.policy_params())
  same = np.mean([a == b for a, b in zip(ours.completion_ids, theirs.completion_ids)])
  print(f"rollout.dtype={dtype}: {same:.0%} of greedy media rollouts equal float32's")
  assert same >= 0.75
  last = learner.train()
  assert np.isfinite(last["loss"]) and last["grad_norm"] > 0
  gap_max, gap_mean = last["logprob_gap_sampler_trainer"], last["logprob_gap_mean"]
  print(f"rollout.dtype={dtype}: logprob gap mean {gap_mean:.2e}, max {gap_max:.2e}")
  assert 0 < gap_mean <= gap_max < 0.5, (gap_mean, gap_max)


def test_tensor_parallel_rollouts_on_image_prompts_equal_the_trainer_meshs(sft_dir):
  """rollout.tensor=2 with image prompts: the tower, projector and decoder are resharded onto
  the (data, tensor=2) mesh by their logical axes (the tower's heads split there), and the
  rollouts are those sampled on the trainer's mesh: the same tokens, log-probs within 1e-5."""
  config = _grpo(sft_dir)
  single = make_learner(config, sft_dir / "tensor0")
  config.rollout.tensor = 2
  split = make_learner(config, sft_dir / "tensor2")
  params = split.rollout_params()
  assert {dict(x.sharding.mesh.shape)["tensor"] for x in jax.tree.leaves(params)} == {2}
  tower = nnx.state(nnx.merge(split.rollout_model.graphdef, params).vision_tower)
  assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(tower))
  prompts = single.prompts.take(4)

  def rollouts(learner):
    return rollout_lib.generate_rollouts(
        learner.sampler, learner.rollout_params(), prompts, tokenizer=learner.tokenizer,
        config=learner.rollout, rng=jax.random.key(4), media=learner.media)

  want, got = rollouts(single), rollouts(split)
  assert got.completion_ids == want.completion_ids
  for ours, theirs in zip(got.sampler_logprobs, want.sampler_logprobs):
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_media_runs_refuse_what_is_not_wired(sft_dir):
  config = _grpo(sft_dir)
  config.experience.enabled = True
  with pytest.raises(ValueError, match=r"experience.enabled is not supported with media"):
    make_learner(config, sft_dir / "bad")


def test_dpo_on_image_pairs_starts_at_log2_and_prefers_the_chosen_answer(sft_dir, tmp_path):
  """DPO through the same media binding: at step 0 the policy is the reference, so the loss
  is exactly log 2 (the reference log-probs were computed with the images); a few steps raise
  the reward accuracy on the pairs; the export is a LLaVA directory."""
  data = sft_dir / "data"
  pairs = []
  for r in [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()][:8]:
    right = r["messages"][-1]["content"]
    wrong = next(c for c in ("red", "green", "blue") if c != right)
    pairs.append({"prompt": r["messages"][:1], "chosen": right, "rejected": wrong,
                  "images": r["images"]})
  sources.write_jsonl(pairs, data / "pairs.jsonl")
  config = get_config("multimodal:test_dpo")
  config.data.sources = (str(data / "pairs.jsonl"),)
  config.data.eval_sources = (str(data / "pairs.jsonl"),)
  config.init_from = str(sft_dir / "sft")
  config.train.eval_at_start = True
  last = run(config, tmp_path / "dpo")
  records = metrics_lib.read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
  assert records[0]["step"] == 0
  assert records[0]["eval_loss"] == pytest.approx(np.log(2.0), abs=1e-5)
  assert last["eval_accuracy"] > 0.5 and np.isfinite(last["loss"])
  load_llava(tmp_path / "dpo" / "export" / "hf")
