"""RL with a model whose embedding has more rows than the tokenizer has ids (as Qwen pads
151,665 ids to 151,936): rollouts never produce a padded id (which the tokenizer could not
decode) and the trainer's log-probs equal the sampler's, both over the valid ids."""

import numpy as np
import pytest

from wakea_jax import trainers
from wakea_jax.config_files import get_config


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_step_with_a_padded_embedding(tmp_path, objective):
  # 1024 ids, 1024 + 128 rows: at a random init about a tenth of the mass is on padded ids,
  # so unmasked sampling would draw one within a few tokens.
  config = get_config(f"{objective}:test", **{"model.vocab_size": 1024 + 128,
                                              "train.steps": 1, "train.eval_every": 1})
  last = trainers.run(config, tmp_path)
  assert np.isfinite(last["loss"])
  assert last["response_length"] > 0
  # The trainer scores over the same 1024 ids as the sampler (unmasked it would be off by
  # about log(1152 / 1024)).
  assert last["logprob_gap_mean"] < 1e-5
  assert "eval_greedy_accuracy" in last
