"""Preference optimisation: DPO, IPO, SimPO or ORPO on chosen/rejected pairs.

Variants:
  default   your pairs and (usually) an SFT'd model: set --config.data.sources and
            --config.init_from; the loss with --config.preference.loss=dpo|ipo|simpo|orpo.
  lora      the same with LoRA adapters (the reference is then the frozen base).
  test      a tiny model from scratch on bundled generated arithmetic pairs
            (chosen = right answer, rejected = wrong one), for the test suite.

  python -m wakea_jax.train --config=configs/dpo.py --workdir=/tmp/wakea_dpo \
      --config.init_from=/tmp/wakea_quickstart/export/model \
      --config.data.sources='("pairs.jsonl",)' --config.preference.loss=dpo

Records: {"prompt" | "messages", "chosen", "rejected"} (see wakea_jax/data/preferences.py);
sources may also name a bundled generator, e.g. "task:arithmetic?n=500&seed=0".
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variant = arg or "default"
  config = common.run_config("dpo")
  config.variant = variant
  # Mirrors wakea_jax.objectives.dpo.PreferenceConfig.
  config.preference = ml_collections.ConfigDict(dict(
      loss="dpo", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1,
      ipo_length_normalize=True))
  # grad_accum must divide data.batch_size (micro-batches split pairs).
  # Preference files (.jsonl/.json/.parquet) or task specs; pooled. Required (run() says so).
  config.data.sources = ()
  config.data.eval_sources = ()
  config.data.seq_len = 512
  config.data.batch_size = 16          # pairs per step, global (2x rows: chosen and rejected)
  config.data.eval_batch_size = 16     # also the batch for precomputing reference log-probs
  config.data.eval_batches = 0         # 0: all eval pairs
  config.data.overlength = "truncate"  # or "drop"; either way counted and reported
  config.data.seed = 0
  config.optimizer.update(learning_rate=5e-6, weight_decay=0.0)
  config.train.update(steps=1000, log_every=20, eval_every=200, checkpoint_every=200)

  if variant == "default":
    pass
  elif variant == "lora":
    config.lora.enabled = True
    config.optimizer.learning_rate = 5e-5
  elif variant == "test":
    common.shrink_model_for_tests(config.model, max_seq_len=64)
    config.data.sources = ("task:arithmetic?n=32&seed=0",)
    # The first 16 training pairs (same generator and seed): reward accuracy on seen pairs.
    config.data.eval_sources = ("task:arithmetic?n=16&seed=0",)
    config.data.seq_len = 48
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.train.steps = 30
    config.train.log_every = 1
    config.train.eval_every = 15
    config.train.checkpoint_every = 10
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 0
    config.preference.beta = 0.5
    config.export.enabled = False
  else:
    raise ValueError(f"unknown dpo variant {variant!r}; use default, lora or test")
  return config
