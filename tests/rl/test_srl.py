"""SRL (arXiv 2510.25992): step-wise prompts, the action parser, the similarity reward checked
against hand-computed 2M/T, dynamic sampling with a std threshold, and a tiny `srl` run."""

import json
import logging

import numpy as np
import pytest

from wakea_jax import config_lib, trainers
from wakea_jax.config_files import get_config
from wakea_jax.data import trajectories as traj_lib
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.rl import advantages, learner, rewards, srl
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl.samples import Sample

RECORDS = [
    {"problem": "Solve 3x + 1 = 10.",
     "steps": [{"action": "3x = 9", "reasoning": "Subtract 1."}, {"action": "x = 3"}],
     "answer": "3"},
    {"problem": "Solve x - 4 = 1.", "steps": [{"action": "x = 5"}], "answer": 5},
]


def _trajectories():
  return [traj_lib.to_trajectory(r, f"t.jsonl:{i + 1}") for i, r in enumerate(RECORDS)]


def test_each_trajectory_becomes_one_prompt_per_step_plus_the_answer():
  prompts = srl.step_prompts(_trajectories(), system="Be exact.")
  assert [(p.meta["trajectory"], p.meta["step"], p.meta["num_steps"]) for p in prompts] == [
      (0, 1, 2), (0, 2, 2), (0, 3, 2), (1, 1, 1), (1, 2, 1)]
  assert [p.answer for p in prompts] == ["3x = 9", "x = 3", "<answer>3</answer>",
                                         "x = 5", "<answer>5</answer>"]
  # Prompt 1 is the whole-problem prompt; later ones open the assistant turn with the
  # expert's earlier actions (no monologue) and continue it.
  assert prompts[0].messages == ({"role": "system", "content": "Be exact."},
                                 {"role": "user", "content": "Solve 3x + 1 = 10."})
  assert not prompts[0].continues
  assert prompts[2].messages[-1] == {"role": "assistant", "continue": True,
                                     "content": "Step 1: 3x = 9\nStep 2: x = 3\n"}
  assert prompts[0].messages == srl.problem_prompts(_trajectories(), system="Be exact.")[0].messages
  without = srl.step_prompts(_trajectories(), answer_step=False)
  assert [p.answer for p in without] == ["3x = 9", "x = 3", "x = 5"]


def test_prefix_reasoning_opens_each_step_prompt_with_the_solution_text_so_far():
  trajectories = _trajectories()
  prompts = srl.step_prompts(trajectories, prefix_reasoning=True)
  assert prompts[2].messages[-1]["content"] == (
      "<think>Subtract 1.</think>\nStep 1: 3x = 9\nStep 2: x = 3\n")
  # Each prefix is the whole solution's text up to the step it asks for, as SFT targets
  # (trajectories.solution_text) spell it.
  whole = traj_lib.solution_text(trajectories[0])
  rests = []
  for prompt in prompts[1:3]:
    prefix = prompt.messages[-1]["content"]
    assert whole.startswith(prefix)
    rests.append(whole[len(prefix):])
  assert rests == ["Step 2: x = 3\n<answer>3</answer>", "<answer>3</answer>"]
  # The first prompt (no prefix) and the answers do not change.
  plain = srl.step_prompts(trajectories)
  assert prompts[0].messages == plain[0].messages
  assert [p.answer for p in prompts] == [p.answer for p in plain]
  config = srl.SRLConfig(trajectories="x.jsonl")
  assert config.prefix_reasoning is False    # the paper's form by default
  assert srl.step_prefix(trajectories[0].steps) == "Step 1: 3x = 9\nStep 2: x = 3\n"


def test_a_step_prompt_renders_into_the_assistant_turn_and_survives_a_prompt_file(tmp_path,
                                                                                caplog):
  tok = default_tokenizer()
  prompt = srl.step_prompts(_trajectories(), system="Be exact.")[1]
  text = tok.decode(prompt.render(tok))
  assert text == ("<|im_start|>system\nBe exact.<|im_end|>\n"
                  "<|im_start|>user\nSolve 3x + 1 = 10.<|im_end|>\n"
                  "<|im_start|>assistant\nStep 1: 3x = 9\n")
  path = tmp_path / "t.jsonl"
  traj_lib.write_trajectories(RECORDS, path)
  config = srl.SRLConfig(trajectories=str(path), system="Be exact.")
  train, held_out = srl.write_step_prompts(config, tmp_path)
  assert held_out is None
  loaded = prompts_lib.load_prompts(str(train))
  expected = srl.step_prompts(traj_lib.load_trajectories(path), system="Be exact.")
  assert [(p.messages, p.answer, dict(p.meta)) for p in loaded] == [
      (p.messages, p.answer, dict(p.meta)) for p in expected]
  assert loaded[1].render(tok) == prompt.render(tok)
  # A restart with other step prompts (here another system prompt) says so.
  with caplog.at_level(logging.WARNING):
    srl.write_step_prompts(config, tmp_path)
    assert "changed since the last start" not in caplog.text
    srl.write_step_prompts(srl.SRLConfig(trajectories=str(path), system="Other."), tmp_path)
  assert "srl_step_prompts.jsonl changed since the last start" in caplog.text


@pytest.mark.parametrize("text, action", [
    ("<think>subtract 1</think>\nStep 2: x = 3", "x = 3"),
    ("Step 2: x = 3", "x = 3"),                     # the monologue is optional
    ("<answer>3</answer>\n", "<answer>3</answer>"),  # as SFT'd solutions end
    ("  <think>a\nb</think> x = 3 \n<think>next</think>\nStep 3: y", "x = 3"),  # first line only
    ("<think></think>\n\n  step 7 :  <answer>3</answer>", "<answer>3</answer>"),
    ("<think>t</think>Step 2: x = 3<|im_end|>", "x = 3<|im_end|>"),   # Sample.final strips it
    ("<think>x = 3", None),                         # not closed
    ("I think <think>t</think>\nStep 2: x = 3", None),   # text before the monologue
    ("<think>t</think>\n   \n", None),              # no action
    ("<think>t</think>\nStep 2:   ", None),         # an empty action after the label
    ("<think>t</think><think>u</think>x", None),    # think markup in the action line
])
def test_parse_action(text, action):
  assert srl.parse_action(text) == action
  # The paper's strict form: no monologue, no action.
  strict = srl.parse_action(text, require_think=True)
  assert strict == (action if text.lstrip().startswith("<think>") else None)


@pytest.mark.parametrize("text, first", [
    ("<think>a\nb</think>\nStep 2: x = 3\n<think>c</think>\nStep 3: x = 1\n",
     "<think>a\nb</think>\nStep 2: x = 3\n"),
    ("\n<answer>3</answer>\n<|im_end|>", "\n<answer>3</answer>\n"),
    ("<think>a</think>\nStep 2: x = 3<|im_end|>", None),    # the line never ends: keep all
    ("<think>never closed\nStep 2: x = 3\n", None),         # does not parse: keep all
])
def test_first_step_tokens_cover_exactly_the_scored_step(text, first):
  tok = default_tokenizer()
  ids = tok.encode(text)
  count = srl.first_step_tokens(ids, tok)
  assert (None if count is None else tok.decode(ids[:count])) == first


@pytest.mark.parametrize("text, first", [
    ("<think>a\nb</think>\nStep 2: x = 3\n<think>c</think>\nStep 3: x = 1\n",
     "<think>a\nb</think>\nStep 2: x = 3\n"),
    ("\n \n<answer>3</answer>\nmore", "\n \n<answer>3</answer>\n"),
    ("Step 2: x = 3\nStep 3: y = 1\n", "Step 2: x = 3\n"),
    ("I think <think>t</think>\nStep 2", "I think <think>t</think>\n"),  # -1 either way
    ("<think>a</think>\nStep 2: x = 3<|im_end|>", None),    # the line never ends
    ("<think>never closed\nStep 2: x = 3\n", None),
])
def test_step_complete_first_holds_at_the_end_of_the_scored_line(text, first):
  """The rollouts' stop (`step_complete`): false on every prefix shorter than the first
  step's line and its "\\n", true on every longer one (a sampler stop must stay true)."""
  holds = [srl.step_complete(text[:i]) for i in range(len(text) + 1)]
  if first is None:
    assert not any(holds)
  else:
    assert holds == [i >= len(first) for i in range(len(text) + 1)]


def test_the_learner_mask_trains_exactly_the_first_step_tokens():
  """The mask cut lands on rl/rollout.py's layout (position t predicts token t + 1): the
  targets left in the loss spell the first step; an output the reward (with its own
  require_think) scores -1 keeps its whole mask."""
  tok = default_tokenizer()
  prompt = tok.encode("<|im_start|>assistant\nStep 1: 3x = 9\n")
  texts = ["<think>a</think>\nStep 2: x = 3\nStep 3: y\n<|im_end|>",
           "Step 2: x = 3\nStep 3: y\n<|im_end|>",
           "<think>never closed\nStep 2: x = 3\n"]
  rows = [tok.encode(t) for t in texts]
  rollouts = rollout_lib.Rollouts(
      prompts=[None] * 3, prompt_ids=[prompt] * 3, completion_ids=rows,
      sampler_logprobs=[np.zeros(len(c), np.float32) for c in rows],
      tool_mask=[np.zeros(len(c), np.int32) for c in rows], num_tool_calls=[0] * 3,
      stop_reason=["stop"] * 3, texts=texts, finals=texts, tool_errors=[0] * 3, group_size=3)
  for require_think, kept in ((False, ["<think>a</think>\nStep 2: x = 3\n",
                                       "Step 2: x = 3\n", texts[2]]),
                              (True, ["<think>a</think>\nStep 2: x = 3\n", texts[1],
                                      texts[2]])):
    batch = rollout_lib.to_batch(rollouts)
    srl.mask_after_first_step(batch["loss_mask"], rollouts.prompt_ids,
                              rollouts.completion_ids, tok, require_think=require_think)
    assert [tok.decode(t[m > 0].tolist()) for t, m in zip(batch["targets"],
                                                          batch["loss_mask"])] == kept
  spec = {"srl_similarity": {"weight": 1.0}, "strict": {"type": "srl_similarity",
                                                       "require_think": True}}
  assert srl.reward_requires_think(spec) and not srl.reward_requires_think({"math": {}})


def _reward(finals, answers, **options):
  fn = rewards.build_reward({"srl_similarity": {"weight": 1.0, **options}})
  samples = [Sample(prompt="q", completion=f, answer=a) for f, a in zip(finals, answers)]
  return fn(samples)[0]


# (predicted, expert, M, T) with M counted by hand: difflib takes the longest common block,
# then recurses on the text left and right of it.
HAND = [
    ("x = 3", "x = 3", 5, 10),
    ("2x = 4", "2x = 8", 5, 12),          # "2x = "; then "4" vs "8": nothing
    ("abcd", "bcde", 3, 8),               # "bcd"
    ("x = 3", "y = 3", 4, 10),            # " = 3"; then "x" vs "y": nothing
    ("x + 1 = 5", "x = 5 - 1", 5, 18),    # " = 5", then "x" in "x + 1" vs "x"
    ("ab", "cd", 0, 4),
]


def test_similarity_is_2m_over_t_computed_by_hand():
  finals = [f"<think>reasoning</think>\nStep 2: {p}" for p, _, _, _ in HAND]
  got = _reward(finals, [e for _, e, _, _ in HAND])
  np.testing.assert_allclose(got, [2 * m / t for _, _, m, t in HAND], rtol=1e-6)


def test_the_answer_step_compares_the_answers_not_the_tags():
  """Whole lines would score a wrong answer 2*17/36 = 0.94 against a right one's 1.0, a
  spread the dynamic-sampling threshold drops; inside the tags it is 0 vs 1."""
  finals = ["<answer>3</answer>", "<answer>5</answer>", "<think>t</think>\n<answer> 3 </answer>",
            "so <answer>-13</answer>", "x = 3"]
  got = _reward(finals, ["<answer>3</answer>"] * 5)
  # "x = 3" has no answer block: the lines whole, M = 1 ("3"), T = 5 + 18.
  # "-13" vs "3": M = 1, T = 4.
  np.testing.assert_allclose(got, [1.0, 0.0, 1.0, 2 * 1 / 4, 2 * 1 / 23], rtol=1e-6)
  assert np.std(got[:2]) >= 0.05   # a right and a wrong answer survive dynamic sampling
  # Ordinary steps are compared whole, tags or not.
  np.testing.assert_allclose(_reward(["<answer>3</answer>"], ["x = 3"]), [2 * 1 / 23],
                             rtol=1e-6)


def test_unparsed_output_scores_minus_one_and_a_failure_never_raises(monkeypatch):
  got = _reward(["<think>never closed", "<think>t</think>", "", "x <think>"], ["x = 3"] * 4)
  np.testing.assert_array_equal(got, [-1.0] * 4)
  np.testing.assert_array_equal(_reward(["x = 3"], ["x = 3"], require_think=True), [-1.0])
  # A numeric expert action is compared as its text: "5" vs "5", and "x = 5" (M 1, T 6).
  np.testing.assert_allclose(_reward(["<think>t</think>\n5", "<think>t</think>\nx = 5"],
                                     [5, 5]), [1.0, 2 / 6], rtol=1e-6)
  monkeypatch.setattr(srl, "similarity", lambda a, b: 1 / 0)
  assert _reward(["<think>t</think>\nx"], ["x"])[0] == -1.0
  assert srl.FAILURES["srl_similarity"] >= 1
  with pytest.raises(ValueError, match="sample 0: the 'srl_similarity' reward needs"):
    _reward(["<think>t</think>\nx"], [None])


def test_dynamic_sampling_threshold_drops_groups_below_min_std():
  rewards_ = np.array([[0.50, 0.52, 0.50, 0.52],     # std 0.01: noise
                       [0.0, 1.0, 0.0, 1.0],         # std 0.5
                       [0.3, 0.3, 0.3, 0.3]], np.float32)
  np.testing.assert_array_equal(advantages.low_spread_groups(rewards_, 0.05),
                                [True, False, True])
  # The default (min_std 0) keeps DAPO's rule: only groups of equal rewards.
  np.testing.assert_array_equal(advantages.zero_variance_groups(rewards_), [False, False, True])
  with pytest.raises(ValueError, match="rl.dynamic_sampling_min_std must be a finite number"):
    learner.RLConfig(dynamic_sampling=True, dynamic_sampling_min_std=-0.1)
  with pytest.raises(ValueError, match="config.rl: rl.dynamic_sampling_min_std=0.1 has no "
                                       "effect without rl.dynamic_sampling=True"):
    config_lib.section({"rl": {"dynamic_sampling_min_std": 0.1}}, "rl")


def _tiny_spread():
  """Rewards 0, 1e-3, 2e-3, ... within each group: varying, but far below min_std."""
  def reward(samples):
    return (np.arange(len(samples)) % 4 * 1e-3).astype(np.float32)
  return reward


def test_srl_objective_runs_end_to_end(tmp_path, monkeypatch):
  """`python -m wakea_jax.train --config=configs/srl.py:test`, as `trainers.run`: step prompts
  of the bundled equations expert written to the workdir, the learner trains on them with the
  SRL reward, dynamic sampling drops groups under the std threshold, and the evaluation
  reports the held-out mean similarity."""
  monkeypatch.setitem(rewards.REWARDS, "tiny_spread", _tiny_spread)
  cuts = []   # the learner trains each row only up to the end of its first step
  first_step_tokens = srl.first_step_tokens
  monkeypatch.setattr(srl, "first_step_tokens",
                      lambda *a, **k: cuts.append(first_step_tokens(*a, **k)) or cuts[-1])
  stops = []  # and its rollouts stop there (tests/rl/test_rollout.py: where they stop)
  generate = rollout_lib.generate_rollouts
  monkeypatch.setattr(rollout_lib, "generate_rollouts",
                      lambda *a, **k: stops.append(k.get("stop")) or generate(*a, **k))
  config = get_config("srl:test")
  # The SRL reward of an untrained model is noise; it is logged but weighted 0 here, and a
  # component that varies by less than min_std inside every group shows that the threshold
  # (not DAPO's "all equal", which would keep every group) drops them.
  config.reward = {"srl_similarity": {"weight": 0.0}, "tiny_spread": {"weight": 1.0}}
  workdir = tmp_path / "run"
  last = trainers.run(config, workdir)
  assert -1.0 <= last["reward/srl_similarity_mean"] <= 1.0
  assert last["zero_variance_fraction"] == 1.0
  assert "eval_greedy_accuracy" in last and "eval_pass@1" not in last
  assert len(cuts) == 2 * 4 * 4        # steps x prompts_per_step x group_size
  assert stops and all(stop == (srl.step_complete,) for stop in stops)
  lines = (workdir / srl.STEP_PROMPTS_FILE).read_text().splitlines()
  expected = srl.step_prompts(traj_lib.load_trajectories(config.srl.trajectories),
                              system=config.srl.system)
  assert [srl.prompt_json(p) for p in expected] == [json.loads(line) for line in lines]
  assert any(p.continues for p in expected)
  assert (workdir / srl.EVAL_STEP_PROMPTS_FILE).exists()
  # A resumed run rewrites the same prompt file (the learner resumes its position in it).
  srl.write_step_prompts(config_lib.section(config, "srl"), tmp_path)
  assert (tmp_path / srl.STEP_PROMPTS_FILE).read_text() == "\n".join(lines) + "\n"
  with pytest.raises(ValueError, match="leave config.data.sources and"):
    trainers.run(get_config("srl:test", **{"data.sources": "prompts.jsonl"}), tmp_path / "x")
