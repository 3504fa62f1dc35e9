"""SRL: Supervised Reinforcement Learning from expert trajectories (arXiv 2510.25992).

Every expert trajectory (wakea_jax/data/trajectories.py) of N steps becomes N + 1 step-wise
prompts (the problem and the expert's previous steps; the last asks for the <answer> line),
written to WORKDIR/srl_step_prompts.jsonl; the RL learner trains on them with the GRPO-family
update, the `srl_similarity` reward (difflib ratio of the model's action to the expert's, -1
when its output does not parse), dynamic sampling that drops groups whose reward std is below
`rl.dynamic_sampling_min_std`, and an optional KL to the initial policy (`loss.kl_beta`).
The periodic evaluation is the greedy mean similarity over the held-out trajectories' step
prompts (`eval_greedy_accuracy`; pass@k means nothing for a similarity, so it is off).

Variants:
  equations  the bundled equation-solving expert (wakea_jax/data/tasks/equations.py), with
             its system prompt, so step prompt 1 is exactly the task's RL prompt; set
             --config.init_from (an SFT'd model: from scratch almost no output parses).
  test       a tiny from-scratch run for the test suite.
Any trajectory file works in place of the task: --config.srl.trajectories=FILE.jsonl.

  python -m wakea_jax.train --config=configs/srl.py:equations --workdir=/tmp/srl \
      --config.init_from=/tmp/sft/export/model
"""

import ml_collections

from wakea_jax import config_files
from wakea_jax.data.tasks import equations

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variant = arg or "equations"
  config = common.rl_config("srl")
  config.variant = variant
  # The prompts are the step prompts of config.srl (the trainer writes them and points the
  # learner at them); data.sources stays empty.
  config.data.sources = ""
  config.data.eval_sources = ""
  config.srl = ml_collections.ConfigDict(dict(
      trajectories="task:equations?n=4000&seed=0&split=0",
      eval_trajectories="task:equations?n=64&seed=7&split=1",
      system=equations.SYSTEM, answer_step=True, prefix_reasoning=False))
  config.reward = ml_collections.ConfigDict({"srl_similarity": {"weight": 1.0}})
  config.rl.dynamic_sampling = True
  # Our choice of the paper's epsilon: similarities lie in [0, 1] (-1 unparsed), and a
  # group spread under 0.05 is mostly sampling noise once divided by its std.
  config.rl.dynamic_sampling_min_std = 0.05
  config.rollout.max_new_tokens = 64      # one step: a short monologue and one action line
  config.eval.correct_reward = "srl_similarity"
  config.eval.num_samples = 0
  config.eval.pass_k = ()
  if variant == "equations":
    pass
  elif variant == "test":
    common.shrink_rl_for_tests(config)
    config.data.sources = ""
    config.data.eval_sources = ""
    config.srl.trajectories = "task:equations?n=16&seed=0&max_level=2"
    config.srl.eval_trajectories = "task:equations?n=4&seed=7&split=1&max_level=2"
    config.eval.num_samples = 0
    config.eval.pass_k = ()
    config.rl.max_sampling_rounds = 1
    config.train.update(steps=2, eval_every=2, checkpoint_every=2, eval_at_start=False)
  else:
    raise ValueError(f"unknown srl variant {variant!r}; use equations or test")
  return config
