"""`python -m wakea_jax.train` for the two-process RL test, with one extra reward.

A from-scratch test model earns no math reward, so its advantages would all be zero and
the two runs would agree trivially. This reward (the vowel fraction of the final turn) is
different for every completion, so every step moves the parameters.
"""

import numpy as np
from absl import app

from wakea_jax.rl import rewards
from wakea_jax.train import __main__ as train_main


def vowel_reward():
  """Fraction of the final turn's characters that are vowels."""
  def reward(samples):
    return np.asarray([sum(c in "aeiou" for c in s.final) / max(len(s.final), 1)
                       for s in samples], np.float32)
  return reward


rewards.REWARDS["vowels"] = vowel_reward

if __name__ == "__main__":
  train_main._define_flags()
  app.run(train_main.main)
