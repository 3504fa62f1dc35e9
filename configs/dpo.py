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

from wakea_jax import config_lib


def get_config(arg=None):
  variant = arg or "default"
  config = config_lib.base_config()
  config.variant = variant
  config.objective = "dpo"
  config.model = config_lib.model_config_dict(
      "tiny", vocab_size=1024, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
      head_dim=32, mlp_dim=384, max_seq_len=512)
  config.init_from = ""     # HF dir or wakea_jax model dir; empty: random init from config.model
  config.tokenizer = ""     # .model / HF dir; empty: the bundled SentencePiece tokenizer
  config.grad_accum = 1     # must divide data.batch_size (micro-batches split pairs)

  # Mirrors wakea_jax.objectives.dpo.PreferenceConfig.
  config.preference = ml_collections.ConfigDict(dict(
      loss="dpo", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, orpo_lambda=0.1,
      ipo_length_normalize=True))

  config.data = ml_collections.ConfigDict()
  # Preference files (.jsonl/.json/.parquet) or task specs; pooled. Required (run() says so).
  config.data.sources = ()
  config.data.eval_sources = ()
  config.data.seq_len = 512
  config.data.batch_size = 16          # pairs per step (2x rows: chosen and rejected)
  config.data.eval_batch_size = 16     # also the batch for precomputing reference log-probs
  config.data.eval_batches = 0         # 0: all eval pairs
  config.data.overlength = "truncate"  # or "drop"; either way counted and reported
  config.data.seed = 0

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-6, warmup_steps=30, decay_steps=None, min_lr_ratio=0.1, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
  config.optimizer.decay_steps = ml_collections.FieldReference(None, field_type=int)

  config.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=20, eval_every=200, checkpoint_every=200, keep_checkpoints=3,
      async_checkpoint=True, peak_flops=0.0))

  config.lora = ml_collections.ConfigDict(dict(
      enabled=False, rank=16, alpha=32.0, dropout=0.0,
      targets=("q", "k", "v", "o", "gate", "up", "down"), quantize_base=""))

  config.export = ml_collections.ConfigDict(dict(enabled=True, hf=True))

  if variant == "default":
    pass
  elif variant == "lora":
    config.lora.enabled = True
    config.optimizer.learning_rate = 5e-5
  elif variant == "test":
    config_lib.shrink_model_for_tests(config.model, max_seq_len=64)
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
