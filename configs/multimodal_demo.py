"""A model that learns to see and hear (issue 18): SFT then GRPO on generated shapes and tones.

  python -m wakea_jax.multimodal_demo --config=configs/multimodal_demo.py --workdir=/tmp/mm_demo

For each modality and seed: a vision- (or audio-) language model trained from scratch by SFT
on the bundled synthetic task (data/tasks/shapes.py, tones.py), stopped early, then GRPO on
the task's prompts with the exact-match reward; greedy accuracy on the held-out split after
each stage, beside chance. Variants: default, test (a tiny version for the test suite).
"""

import ml_collections

from wakea_jax import config_files

MODALITIES = {"vision": "shapes", "audio": "tones"}


def _multimodal(variant: str) -> ml_collections.ConfigDict:
  return config_files.sibling(__file__, "multimodal").get_config(variant)


def get_config(arg=None):
  variant = arg or "default"
  # seed and mesh as every config has them (the stages take their own from config.seeds).
  config = config_files.sibling(__file__, "common").base_config()
  config.objective = "multimodal_demo"
  config.variant = variant
  config.seeds = (0, 1)
  config.modalities = ("vision", "audio")
  # Examples per split of each generated task (the same data for every seed). `train` is the
  # labelled set SFT learns from, per modality; GRPO's `prompts` are new questions without
  # labels, scored by the verifiable reward. Labels are the scarce part (RLVR's premise):
  # the defaults leave SFT far above chance but short of what the task allows (README:
  # GRPO's gain over SFT grows as labels get scarcer; audio is learnt from fewer).
  # described: the fraction of the shapes' SFT answers that describe the picture first
  # (data/tasks/shapes.describe); GRPO then chooses per question which form to give.
  config.data = ml_collections.ConfigDict(dict(
      train=ml_collections.ConfigDict(dict(vision=1000, audio=100)), eval=256, prompts=2000,
      seed=0, image_size=32, described=0.0))
  # Samples per held-out prompt at the rollout temperature (0: greedy accuracy only).
  config.eval_samples = 4
  config.sft = ml_collections.ConfigDict()
  config.grpo = ml_collections.ConfigDict()
  for modality in MODALITIES:
    sft = _multimodal(modality)
    sft.train.update(steps=400, eval_every=400, checkpoint_every=400, log_every=20)
    sft.optimizer.update(learning_rate=1e-3, warmup_steps=20)
    config.sft[modality] = sft
    grpo = _multimodal(f"{modality}_grpo")
    grpo.train.update(steps=100, eval_every=20, checkpoint_every=100, log_every=1)
    grpo.optimizer.update(learning_rate=5e-5, warmup_steps=5)
    grpo.rollout.update(group_size=8, max_new_tokens=6, temperature=1.0)
    grpo.rl.prompts_per_step = 16
    grpo.eval.batch_prompts = 128
    config.grpo[modality] = grpo
  if variant == "default":
    pass
  elif variant == "test":
    config.seeds = (0,)
    # One modality: the loop runs the same code for the other (audio SFT, GRPO and sampling
    # are tested in tests/train/test_multimodal_run.py and tests/rl/test_media_rl.py).
    config.modalities = ("vision",)
    config.data.train.update(vision=64, audio=64)
    config.data.update(eval=16, prompts=32)
    config.eval_samples = 2
    for modality in MODALITIES:
      sft, grpo = config.sft[modality], config.grpo[modality]
      for stage in (sft, grpo):
        stage.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=16, mlp_dim=64)
        stage.media.vision.update(embed_dim=16, mlp_dim=32, num_layers=1, num_heads=2)
        stage.media.audio.update(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                 encoder_ffn_dim=32)
      sft.data.update(batch_size=8, eval_batch_size=8)
      sft.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
      grpo.rollout.update(group_size=4, max_new_tokens=3)
      grpo.rl.prompts_per_step = 4
      grpo.train.update(steps=2, eval_every=2, checkpoint_every=2)
  else:
    raise ValueError(f"unknown multimodal_demo variant {variant!r}; use default or test")
  return config
