"""Multimodal SFT: a vision- or audio-language model (train/multimodal.py).

Variants:
  vision      a small CLIP-style ViT (32 px images, 8 px patches, 16 tokens per image) + LLaVA
              MLP projector + the small decoder, every part trained from scratch.
  audio       a small Whisper-style tower (1 s clips at 8 kHz, 32 mel bins, 100 frames ->
              25 tokens per clip after Qwen2-Audio's pooling) + projector + decoder.
  projector   `vision` training only the projector (LLaVA stage 1): start from a model with
              --config.init_from=<an HF LLaVA directory or a multimodal run's workdir>.
  vision_grpo / audio_grpo   GRPO on media prompts from a multimodal SFT workdir
              (--config.init_from=...), exact-match reward on one-word answers.
  vision_dpo / audio_dpo     DPO on media pairs from a multimodal SFT workdir.
  test / test_grpo / test_dpo   tiny vision runs for the test suite.

Records are `{"messages": [...], "images": [...]}` / `"audios"` files
(data/multimodal.py); the learning demonstration (`python -m wakea_jax.multimodal_demo`)
writes its generated shapes and tones tasks and runs these configs:

  python -m wakea_jax.train --config=configs/multimodal.py:vision --workdir=/tmp/vlm \
      --config.data.sources=/tmp/shapes/train.jsonl \
      --config.data.eval_sources=/tmp/shapes/eval.jsonl
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")

# The decoder's vocabulary: the bundled tokenizer's 1,024 pieces + the placeholder id 1024,
# padded to a multiple of 128.
VOCAB = 1152


def media_section(kind: str) -> ml_collections.ConfigDict:
  """config.media for `kind` ("vision" or "audio") with the small towers."""
  media = ml_collections.ConfigDict()
  media.kind = kind
  media.vision = ml_collections.ConfigDict(dict(
      variant="clip", embed_dim=96, mlp_dim=192, num_layers=2, num_heads=4, image_size=32,
      patch_size=8, hidden_act="gelu"))
  media.projector = ml_collections.ConfigDict(dict(hidden_act="gelu", pool_window=1))
  media.vision_feature_layer = -1
  media.vision_feature_select_strategy = "default"    # CLIP: drop the class token
  media.image = ml_collections.ConfigDict(dict(image_mean=(0.5, 0.5, 0.5),
                                               image_std=(0.5, 0.5, 0.5)))
  media.audio = ml_collections.ConfigDict(dict(
      num_mel_bins=32, d_model=96, encoder_layers=2, encoder_attention_heads=4,
      encoder_ffn_dim=192, max_source_positions=50, avg_pool=True))
  media.features = ml_collections.ConfigDict(dict(
      feature_size=32, sampling_rate=8000, hop_length=80, chunk_length=1, n_fft=256))
  media.placeholder_id = -1              # -1: the tokenizer's vocab_size (1024)
  media.train = ("encoder", "projector", "language_model")
  media.max_media = 1
  media.worker_count = 0
  media.cache_features = False           # True: run a frozen encoder once, train on its output
  return media


def _grpo_config(variant: str) -> ml_collections.ConfigDict:
  """GRPO on media prompts (records with "answer"), from a multimodal SFT run's workdir
  (--config.init_from=<workdir>): one-word answers, exact-match reward."""
  config = common.rl_config("grpo")
  config.variant = variant
  config.model.vocab_size = VOCAB
  config.model.max_seq_len = 128
  config.media = media_section("audio" if variant.startswith("audio") else "vision")
  config.model.qkv_bias = variant.startswith("audio")
  config.data.sources = ""
  config.data.eval_sources = ""
  config.rollout.update(group_size=8, max_new_tokens=8, temperature=1.0)
  config.rl.update(prompts_per_step=16)
  # The last word: the one-word answer, also after a description (shapes' `described`).
  config.reward = ml_collections.ConfigDict({"exact_match": {"weight": 1.0,
                                                             "fallback": "last_word"}})
  config.eval.update(correct_reward="exact_match", num_samples=0, pass_k=(1,))
  config.optimizer.update(learning_rate=2e-5, warmup_steps=5, weight_decay=0.0)
  config.train.update(steps=100, eval_every=50, checkpoint_every=50, eval_at_start=True)
  if variant == "test_grpo":
    test = get_config("test")
    config.model = test.model
    config.media = test.media
    config.rollout.update(group_size=4, max_new_tokens=4)
    config.rl.prompts_per_step = 4
    config.train.update(steps=2, eval_every=2, checkpoint_every=1, log_every=1)
  return config


def _dpo_config(variant: str) -> ml_collections.ConfigDict:
  """DPO (or IPO / SimPO / ORPO) on media pairs ({"prompt", "chosen", "rejected", "images"}),
  from a multimodal SFT workdir (--config.init_from=...)."""
  config = config_files.sibling(__file__, "dpo").get_config("default")
  config.variant = variant
  config.model.vocab_size = VOCAB
  config.model.max_seq_len = 128
  config.media = media_section("audio" if variant.startswith("audio") else "vision")
  config.model.qkv_bias = variant.startswith("audio")
  config.data.seq_len = 64
  config.optimizer.learning_rate = 1e-5
  if variant == "test_dpo":
    test = get_config("test")
    config.model = test.model
    config.media = test.media
    config.data.update(seq_len=48, batch_size=8, eval_batch_size=8)
    config.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=3)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  return config


def get_config(arg=None):
  variant = arg or "vision"
  if variant in ("vision_grpo", "audio_grpo", "test_grpo"):
    return _grpo_config(variant)
  if variant in ("vision_dpo", "audio_dpo", "test_dpo"):
    return _dpo_config(variant)
  config = common.run_config("sft")
  config.variant = variant
  config.model.vocab_size = VOCAB
  config.model.max_seq_len = 128
  config.media = media_section("audio" if variant == "audio" else "vision")
  if variant == "audio":
    config.model.qkv_bias = True      # Qwen2-Audio's decoder is Qwen2 (q/k/v biases)
  config.data.sources = ""
  config.data.eval_sources = ""
  config.data.seq_len = 64
  config.data.batch_size = 16
  config.data.eval_batch_size = 16
  config.data.eval_batches = 0
  config.data.overlength = "drop"
  config.data.on_error = "raise"
  config.data.seed = 0
  # Several examples per row (data/media_batches.py; media.max_media then caps a row's
  # items). Off: one example per row is what the multimodal demo was measured with.
  config.data.packing = False
  config.optimizer.learning_rate = 1e-3
  config.train.update(steps=600, log_every=20, eval_every=200, checkpoint_every=200)
  if variant in ("vision", "audio"):
    pass
  elif variant == "projector":
    config.media.train = ("projector",)
  elif variant == "test":
    config.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                        mlp_dim=64)
    config.media.vision.update(embed_dim=16, mlp_dim=32, num_layers=1, num_heads=2,
                               image_size=16)
    config.data.seq_len = 48
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=2)
    config.optimizer.warmup_steps = 1
  else:
    raise ValueError(f"unknown multimodal variant {variant!r}; use vision, audio, projector, "
                     "vision_grpo, audio_grpo, vision_dpo, audio_dpo, test, test_grpo or "
                     "test_dpo")
  return config
