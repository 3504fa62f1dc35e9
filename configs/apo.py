"""APO: beam search over the system prompt of a fixed model (wakea_jax/rl/apo.py).

  python -m wakea_jax.apo --config=configs/apo.py --workdir=/tmp/wakea_apo \
      --config.target.checkpoint=/tmp/sft/export/model

Variants, joined with "+" (`configs/apo.py:openai+test`):
  ""        the rule-based proposer (rl/apo_proposers.py RuleProposer: failure categories ->
            a library of edits; no model needed) on bundled arithmetic prompts, scored by the
            exact answer inside <answer></answer> tags
  "openai"  the proposer is an OpenAI-compatible endpoint (`python -m wakea_jax.serve`, vLLM,
            a hosted API): set --config.proposer.url / model / api_key_env
  "local"   the proposer is a checkpoint sampled in-process: set --config.proposer.checkpoint
  "test"    a few dev prompts, one short round (the test suite)
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variants = [v for v in (arg or "").split("+") if v]
  unknown = set(variants) - {"openai", "local", "test"}
  if unknown:
    raise ValueError(f"configs/apo.py: unknown variant(s) {sorted(unknown)}")
  config = common.base_config()
  config.objective = "apo"
  config.variant = "+".join(variants)
  # The fixed model whose system prompt is searched (a wakea_jax model dir, run workdir or HF).
  config.target = ml_collections.ConfigDict(dict(checkpoint="", tokenizer="", batch_size=64))
  # Prompt records (files or task specs, as an RL config's data.sources): every candidate is
  # scored on `dev`; the start and best prompts also on `held_out` ("" skips it). Each
  # record's own system message is replaced by the candidate.
  config.data = ml_collections.ConfigDict(dict(
      dev="task:arithmetic?n=64&seed=300&max_operand=99&tools=0",
      held_out="task:arithmetic?n=256&seed=777&max_operand=99&tools=0"))
  # How the target answers (rl/rollout.py RolloutConfig; greedy, one completion per prompt).
  config.rollout = ml_collections.ConfigDict(dict(max_new_tokens=64, tools=(), max_tool_calls=2,
                                                  max_tool_tokens=64, chunk_steps=16))
  # The verifiable reward (rl/rewards.py build_reward spec); the example's reward is the
  # weighted total. fallback=None: only an answer in <answer> tags (or \boxed) counts.
  config.reward = ml_collections.ConfigDict({"math": {"weight": 1.0, "fallback": None}})
  # rl/apo.py APOConfig (the search; config.seed seeds it).
  config.apo = ml_collections.ConfigDict(dict(
      start_prompt="You are a helpful assistant.", beam_width=2, branching=3, rounds=3,
      failures_shown=4, pass_threshold=0.5, max_prompt_chars=1000, temperature=0.7,
      max_tokens=1024))
  # The proposer (rl/apo_proposers.py): programmatic, or an rl/backends.py kind.
  config.proposer = ml_collections.ConfigDict(dict(kind="programmatic"))
  if "openai" in variants:
    config.proposer = ml_collections.ConfigDict(dict(
        kind="openai", url="http://127.0.0.1:8000/v1", model="default", api_key_env="",
        timeout_s=120.0, retries=2, workers=8))
  if "local" in variants:
    config.proposer = ml_collections.ConfigDict(dict(
        kind="local", checkpoint="", tokenizer="", batch_size=1))
  if "test" in variants:
    config.data.dev = "task:arithmetic?n=6&seed=300&max_operand=9&tools=0"
    config.data.held_out = "task:arithmetic?n=4&seed=777&max_operand=9&tools=0"
    config.target.batch_size = 8
    config.rollout.max_new_tokens = 8
    config.apo.rounds = 1
    config.apo.branching = 2
  return config
