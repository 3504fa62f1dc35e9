"""The quick-start job until the trainer lands: build a sharded tiny model, run a jitted
forward and loss over the bundled chat examples, export to Hugging Face and re-import.

  python -m wakea_jax.demo --config=configs/demo.py --workdir=/tmp/wakea_demo
  python -m wakea_jax.demo --config=configs/demo.py:bench56m --config.mesh.fsdp=2
"""

from wakea_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config()
  config.preset = arg or "tiny"
  # The bundled SentencePiece tokenizer has 1024 pieces; the model's vocabulary must cover it.
  config.model = config_lib.model_config_dict(config.preset, vocab_size=1024, max_seq_len=512)
  config.tokenizer = ""          # empty: the bundled tokenizer; else a .model or HF dir
  config.data = ""               # empty: the bundled demo chats; else a JSONL of {"messages"}
  config.batch_size = 8
  config.seq_len = 256
  config.timing_steps = 5
  config.export_hf = True
  return config
