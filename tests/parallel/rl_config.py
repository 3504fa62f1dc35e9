"""configs/grpo.py:test with the vowel reward of rl_child.py (the two-process RL test)."""

from configs import grpo


def get_config(arg=None):
  """The test GRPO run, rewarded by `vowels`."""
  config = grpo.get_config("test")
  config.reward = {"vowels": {"weight": 1.0}}
  return config
