"""Supervised fine-tuning.

Variants:
  quickstart  a ~1M-parameter model from scratch on bundled generated data (calculator
              dialogues + small talk); a few minutes on a 2-core CPU.
  arithmetic  the start of the RL learning demonstration: two-operand arithmetic answered
              directly, 30% of the answers showing their work; stopped at partial accuracy.
  test        an even smaller run for the test suite (resume, NaN guard).
  imported    full fine-tuning of an imported model (--config.init_from=/path/to/hf_dir; its
              tokenizer and chat template come with it) on tool-calling arithmetic and small
              talk: low learning rate, 512-token rows, full remat, HF export. README "Bring your
              own model".
  lora        LoRA on an imported checkpoint: set --config.init_from=/path/to/hf_dir.
  qlora       the same with the frozen base in 4-bit NF4.

  python -m wakea_jax.train --config=configs/sft.py:quickstart --workdir=/tmp/wakea_quickstart
  python -m wakea_jax.train --config=configs/sft.py:lora --config.init_from=/models/Qwen3-0.6B \
      --config.data.sources='(("my.jsonl", 1.0),)' ...
"""

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variant = arg or "quickstart"
  config = common.run_config("sft")
  config.variant = variant
  # (source, weight) pairs: a .jsonl/.json/.parquet path or a bundled task ("task:NAME?...").
  config.data.sources = (("task:arithmetic?n=4000&seed=0", 0.7),
                         ("task:smalltalk?n=1000&seed=0", 0.3))
  config.data.eval_sources = (("task:arithmetic?n=200&seed=1234", 1.0),)
  config.data.seq_len = 256
  config.data.batch_size = 16          # the global batch (rows of all processes together)
  config.data.eval_batch_size = 16
  config.data.eval_batches = 4        # 0: every evaluation example
  # Logical data shards, 0: one per process. A fixed value (dividing batch_size, a multiple
  # of the process count) gives the same batches on any number of hosts (resume included).
  config.data.shards = 0
  config.data.packing = True
  config.data.overlength = "truncate"   # or "drop"; either way counted and reported
  config.data.on_error = "raise"        # or "skip_and_count" malformed records
  config.data.seed = 0
  config.train.update(steps=300, log_every=20, eval_every=100, checkpoint_every=100)

  if variant == "quickstart":
    pass
  elif variant == "arithmetic":
    config.data.sources = (("task:arithmetic?n=20000&max_operand=99&tools=0&worked=30", 1.0),)
    config.data.eval_sources = (
        ("task:arithmetic?n=64&seed=5&max_operand=99&tools=0&worked=30", 1.0),)
    config.train.steps = 1500
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.export.hf = False
  elif variant == "test":
    config.model.embed_dim = 64
    config.model.num_layers = 2
    config.model.mlp_dim = 128
    config.data.sources = (("task:arithmetic?n=400&seed=0", 1.0),)
    config.data.eval_sources = (("task:arithmetic?n=32&seed=99", 1.0),)
    config.data.seq_len = 256
    config.data.batch_size = 4
    config.data.eval_batch_size = 4
    config.data.eval_batches = 2
    config.train.steps = 20
    config.train.log_every = 1
    config.train.eval_every = 10
    config.train.checkpoint_every = 5
    config.optimizer.warmup_steps = 5
    config.export.enabled = False
  elif variant == "imported":
    config.data.sources = (("task:arithmetic?n=4000&seed=0&tools=1", 0.7),
                           ("task:smalltalk?n=1000&seed=0", 0.3))
    config.data.eval_sources = (("task:arithmetic?n=64&seed=1234&tools=1", 1.0),)
    config.data.seq_len = 512
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.model.remat_policy = "full"
    config.optimizer.update(learning_rate=1e-5, warmup_steps=20, weight_decay=0.0)
    config.train.update(steps=200, eval_every=100, checkpoint_every=100)
  elif variant in ("lora", "qlora"):
    config.lora.enabled = True
    config.lora.quantize_base = "nf4" if variant == "qlora" else ""
    config.optimizer.learning_rate = 2e-4
    config.optimizer.weight_decay = 0.0
  else:
    raise ValueError(f"unknown sft variant {variant!r}; use quickstart, arithmetic, test, "
                     "imported, lora or qlora")
  return config
