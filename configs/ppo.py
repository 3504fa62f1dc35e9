"""PPO for RL with verifiable rewards: value head, GAE, KL-shaped rewards, value clipping.

Variants:
  arithmetic  PPO on bundled arithmetic prompts from an SFT'd model (set
              --config.init_from=WORKDIR/export/model of an SFT run). A value head is added
              (zero-initialised) when the model has none.
  test        a tiny from-scratch run for the test suite.

  python -m wakea_jax.train --config=configs/ppo.py:arithmetic --workdir=/tmp/ppo \
      --config.init_from=/tmp/sft/export/model
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variant = arg or "arithmetic"
  config = common.rl_config("ppo")
  config.variant = variant
  # The critic is the baseline, so fewer completions per prompt than GRPO.
  config.rollout.group_size = 4
  config.rl.minibatches = 2
  config.rl.num_iterations = 1
  config.loss.aggregation = "token_mean"
  config.ppo = ml_collections.ConfigDict(dict(
      gamma=1.0, lam=1.0, vf_coef=0.1, value_clip=0.2, kl_beta=0.02, kl_estimator="k1",
      whiten_advantages=True, value_trunk_gradient=False))
  if variant == "arithmetic":
    pass
  elif variant == "test":
    common.shrink_rl_for_tests(config)
  else:
    raise ValueError(f"unknown ppo variant {variant!r}; use arithmetic or test")
  return config
