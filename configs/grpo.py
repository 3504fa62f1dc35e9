"""GRPO-family RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO, RLOO).

Variants:
  arithmetic  GRPO on bundled arithmetic prompts from an SFT'd model (set
              --config.init_from=WORKDIR/export/model of a configs/sft.py:arithmetic run);
              exact-answer reward.
  dr_grpo     the same with Dr. GRPO (arXiv 2503.20783): mean-only advantages, token sums
              over a constant.
  dapo        the same with DAPO (arXiv 2503.14476): clip-higher, token-mean, dynamic
              sampling, overlong filtering and the soft overlong penalty.
  gspo        the same with GSPO (arXiv 2507.18071): sequence-level ratios and clipping.
  tools       calculator tool loop on during rollouts (the arithmetic SFT data teaches the
              calling protocol); tool-output tokens are masked out of the loss.
  test        a tiny from-scratch run for the test suite.

  python -m wakea_jax.train --config=configs/grpo.py:arithmetic --workdir=/tmp/grpo \
      --config.init_from=/tmp/sft/export/model
"""

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variant = arg or "arithmetic"
  config = common.rl_config("grpo")
  config.variant = variant
  if variant == "arithmetic":
    pass
  elif variant == "dr_grpo":
    config.rl.advantage = "dr_grpo"
    config.loss.aggregation = "seq_sum_constant"
    config.loss.loss_constant = float(config.rollout.max_new_tokens)
  elif variant == "dapo":
    config.loss.eps_high = 0.28
    config.loss.aggregation = "token_mean"
    config.rl.dynamic_sampling = True
    config.rl.overlong_filter = True
    config.reward.overlong = {"weight": 1.0, "max_len": config.rollout.max_new_tokens,
                              "cache": 16}
  elif variant == "gspo":
    config.loss.ratio = "sequence"
    config.loss.eps_low = 3e-4
    config.loss.eps_high = 4e-4
  elif variant == "tools":
    config.data.sources = "task:arithmetic?n=4000&seed=100&max_operand=999"
    config.data.eval_sources = "task:arithmetic?n=128&seed=777&max_operand=999"
    config.rollout.tools = ("calculator",)
    config.rollout.max_new_tokens = 96
  elif variant == "test":
    common.shrink_rl_for_tests(config)
  else:
    raise ValueError(f"unknown grpo variant {variant!r}; use arithmetic, dr_grpo, dapo, gspo, "
                     "tools or test")
  return config
