"""The APO learning demonstration: SFT a small target that follows a few instructions, then
APO from a generic prompt (2 seeds), start and best prompts scored on dev and held-out prompts.

  python -m wakea_jax.apo_demo --config=configs/apo_demo.py --workdir=/tmp/wakea_apo

The stages are the ordinary configs nested here (config.sft from configs/sft.py:arithmetic,
config.apo from configs/apo.py), so any field can be overridden
(`--config.sft.train.steps=1000`, `--config.apo.apo.rounds=4`).
"""

import ml_collections

from wakea_jax import config_files


def _load(name: str, variant: str) -> ml_collections.ConfigDict:
  return config_files.sibling(__file__, name).get_config(variant)


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.objective = "apo_demo"
  config.seeds = (0, 1)
  # The target's SFT dialogues (apo_demo.dialogues): each instruction in half the system
  # prompts; operands up to 99.
  config.data = ml_collections.ConfigDict(dict(
      train_examples=20000, eval_examples=64, max_operand=99, instructed=0.5))
  sft = _load("sft", "arithmetic")
  sft.train.steps = 600
  sft.train.eval_every = 600
  sft.train.checkpoint_every = 600
  sft.train.log_every = 50
  config.sft = sft
  # The search: the rule-based proposer, dev 64 / held-out 256 arithmetic prompts (disjoint
  # seeds; the SFT dialogues use their own generator), the tagged exact answer as reward.
  search = _load("apo", "")
  search.apo.start_prompt = "You are a helpful assistant."
  search.apo.rounds = 3
  config.apo = search
  return config
