"""Config sections every run shares, and the shrinkers the test variants use.

Loaded by the other config files with `config_files.sibling(__file__, "common")`. Each
section mirrors a frozen dataclass of the library (wakea_jax/config_lib.py maps them):
  mesh -> parallel.mesh.MeshConfig         data -> data.config.DataConfig
  model -> models.config.ModelConfig       optimizer -> train.optimizer.OptimizerConfig
  train -> train.loop.TrainConfig          lora -> models.lora.LoRAConfig (+ enabled)
  export -> train.setup.ExportConfig       (RL: rl, rollout, loss, ppo, eval; DPO: preference)
"""

import ml_collections

from wakea_jax.models.config import get_preset
from wakea_jax.parallel import mesh as mesh_lib

# The bundled tokenizer has 1,024 pieces; every from-scratch config starts from this model.
SMALL_MODEL = dict(vocab_size=1024, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=32, mlp_dim=384, max_seq_len=512)


def model_config_dict(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A ConfigDict holding every ModelConfig field of `preset`, so each is overridable."""
  return ml_collections.ConfigDict(get_preset(preset, **overrides).to_dict())


def base_config() -> ml_collections.ConfigDict:
  """Fields every binary shares: seed, mesh sizes, logical-axis rules."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Mesh axis sizes; -1 takes the remaining devices.
  # devices: 0 spans every device; N the first N (parallel/mesh.py MeshConfig).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "devices": 0})
  # Logical axis -> mesh axes; strings, lists of strings or None.
  config.sharding_rules = [list(rule) for rule in mesh_lib.DEFAULT_RULES]
  return config


def run_config(objective: str) -> ml_collections.ConfigDict:
  """A training run's shared sections with the small from-scratch model."""
  config = base_config()
  config.objective = objective
  config.model = model_config_dict("tiny", **SMALL_MODEL)
  config.init_from = ""     # HF dir, wakea_jax model dir or run workdir; empty: from scratch
  config.tokenizer = ""     # .model / HF dir; empty: init_from's tokenizer, else the bundled one
  config.grad_accum = 1
  config.data = ml_collections.ConfigDict()
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=30, decay_steps=None, min_lr_ratio=0.1, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  config.optimizer.decay_steps = ml_collections.FieldReference(None, field_type=int)
  config.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=20, eval_every=200, checkpoint_every=200, keep_checkpoints=3,
      async_checkpoint=True, peak_flops=0.0, eval_at_start=False))
  config.lora = ml_collections.ConfigDict(dict(
      enabled=False, rank=16, alpha=32.0, dropout=0.0,
      targets=("q", "k", "v", "o", "gate", "up", "down"), quantize_base=""))
  config.export = ml_collections.ConfigDict(dict(enabled=True, hf=True, adapter=False))
  return config


def rl_config(objective: str) -> ml_collections.ConfigDict:
  """The RL config shared by configs/grpo.py and configs/ppo.py (see rl/learner.py)."""
  config = run_config(objective)
  config.data.sources = "task:arithmetic?n=8000&seed=100&max_operand=99&tools=0"       # prompts
  config.data.eval_sources = "task:arithmetic?n=256&seed=777&max_operand=99&tools=0"
  # Logical prompt shards, 0: one per process. A fixed value (dividing rl.prompts_per_step,
  # a multiple of the process count) makes every step's prompts independent of the number
  # of processes, and lets a run resume on another number of hosts.
  config.data.shards = 0
  config.rollout = ml_collections.ConfigDict(dict(
      group_size=8, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
      tools=(), max_tool_calls=2, max_tool_tokens=64, chunk_steps=16, slots=0,
      # Decode precision: "" (the trainer's), "bfloat16" or "int8" (sampling/precision.py).
      # bfloat16 decodes ~2.4x faster than float32 on a CPU with AMX (README, Benchmark);
      # the trainer then re-scores the rollouts, and the gap is logged every step.
      dtype="",
      # > 0: sample on a (data=-1, fsdp=1, tensor=N) mesh of its own (rl/rollout.py).
      tensor=0,
      # Search protocols (rl/rollout.py, sampling/protocols.py): "" | "search_r1" | "rsearch",
      # searching `index` (a build_index directory, or a corpus file for BM25).
      protocol="", index="", search_mode="dense", search_k=3, max_searches=4,
      search_tokens=256, search_tag="search", information_tag="information"))
  config.rl = ml_collections.ConfigDict(dict(
      prompts_per_step=16, num_iterations=1, minibatches=1, advantage="grpo",
      dynamic_sampling=False, max_sampling_rounds=3, overlong_filter=False,
      old_logprobs="auto",
      # With dynamic_sampling: drop groups whose reward std is below this (SRL's epsilon,
      # configs/srl.py); 0 drops only groups of equal rewards (DAPO).
      dynamic_sampling_min_std=0.0,
      # Replaces every prompt's system message ("" keeps the records'); e.g. APO's best prompt,
      # --config.rl.system_prompt="$(cat APO_DIR/best_prompt.txt)" (configs/apo.py).
      system_prompt=""))
  config.train.update(steps=200, log_every=1, eval_every=50, checkpoint_every=50,
                      keep_checkpoints=2, eval_at_start=True)
  # The policy loss (objectives/grpo.py LossConfig).
  config.loss = ml_collections.ConfigDict(dict(
      ratio="token", eps_low=0.2, eps_high=0.2, aggregation="seq_mean_token_mean",
      loss_constant=0.0, kl_beta=0.0, kl_estimator="k3"))
  # Reward components: name -> options (rl/rewards.py build_reward); weights may be
  # schedules ((step, weight), ...).
  config.reward = ml_collections.ConfigDict({"math": {"weight": 1.0}})
  config.eval = ml_collections.ConfigDict(dict(
      correct_reward="math", num_samples=8, pass_k=(1, 8), temperature=1.0))
  # LUFFY (arXiv 2504.14945, rl/offpolicy.py): off-policy traces (a JSONL/Parquet spec, comma-
  # separated; "" is off) replace `per_group` members of each group whose prompt has one;
  # off-policy tokens take f(pi / pi_phi), f(x) = x / (x + gamma), instead of the clip.
  # Traces whose reward is below min_trace_reward (None: keep all) are dropped at load.
  config.offpolicy = ml_collections.ConfigDict(dict(
      traces="", per_group=1, gamma=0.1,
      min_trace_reward=ml_collections.config_dict.placeholder(float)))
  # ExGRPO (arXiv 2510.02245, rl/experience.py, rl/replay.py): successful rollouts are kept
  # per prompt; once a step's accuracy exceeds start_accuracy and min_prompts prompts are
  # replayable, floor(groups * replay_ratio) of each step's groups are replayed prompts
  # (drawn by N(Acc; 0.5, priority_sigma) over their correctness rate Acc, low <= low_max <
  # medium <= medium_max < high), each with one member replaced by its lowest-entropy stored
  # trajectory, shaped with offpolicy.gamma. A prompt all-correct for retire_after visits in a
  # row retires. With offpolicy.traces too (hybrid), the replay takes a member the traces left.
  # entropy: "current" picks the trajectory of lowest entropy under the current policy (the
  # paper; a forward pass of the candidates each step), "behaviour" by its stored entropy.
  config.experience = ml_collections.ConfigDict(dict(
      enabled=False, replay_ratio=0.5, low_max=0.25, medium_max=0.75, priority_sigma=1.0,
      rate_window=1, retire_after=1, max_per_prompt=8, min_prompts=1, start_accuracy=0.35,
      entropy="current"))
  config.optimizer.update(learning_rate=1e-4, warmup_steps=5, min_lr_ratio=1.0, b2=0.99,
                          weight_decay=0.0)
  config.export.hf = False
  return config


def shrink_model_for_tests(model: ml_collections.ConfigDict, max_seq_len: int) -> None:
  """A from-scratch model small enough for the test suite (one layer, width 32)."""
  model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
               mlp_dim=64, max_seq_len=max_seq_len)


def shrink_rl_for_tests(config: ml_collections.ConfigDict) -> None:
  """An RL run small enough for the test suite."""
  shrink_model_for_tests(config.model, max_seq_len=256)
  config.data.sources = "task:arithmetic?n=64&seed=100&max_operand=9&tools=0"
  config.data.eval_sources = "task:arithmetic?n=8&seed=777&max_operand=9&tools=0"
  config.rollout.group_size = 4
  config.rollout.max_new_tokens = 8
  config.rl.prompts_per_step = 4
  config.train.update(steps=4, eval_every=2, checkpoint_every=2)
  config.eval.num_samples = 2
  config.eval.pass_k = (1, 2)
  config.export.enabled = False
