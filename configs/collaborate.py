"""The three-model collaboration (issue 16 item 4): retrieve context, let a teacher write
step-by-step solutions, verify them, regenerate the rejected ones, keep the verified ones.

  python -m wakea_jax.collaborate --config=configs/collaborate.py --workdir=/tmp/wakea_collab

Variants, joined with "+" (`configs/collaborate.py:openai+judge`):
  ""            the task's programmatic expert as teacher, with 20% of its solutions given one
                wrong number so that the verifier has something to reject
  "openai"      the teacher is an OpenAI-compatible endpoint (`python -m wakea_jax.serve`,
                vLLM, a hosted API): set --config.teacher.url / model / api_key_env
  "local"       the teacher is a checkpoint sampled in-process: set --config.teacher.checkpoint
  "judge"       an LLM judge (OpenAI-compatible) must also score each solution at least
                collaboration.min_judge_score: set --config.judge.url / model / api_key_env
  "arithmetic"  the bundled arithmetic task instead of equations
  "test"        a handful of problems (the test suite)
"""

import ml_collections

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  variants = [v for v in (arg or "").split("+") if v]
  unknown = set(variants) - {"openai", "local", "judge", "arithmetic", "test"}
  if unknown:
    raise ValueError(f"configs/collaborate.py: unknown variant(s) {sorted(unknown)}")
  config = common.base_config()
  config.objective = "collaborate"
  config.variant = "+".join(variants)
  # rl/collaboration.py CollaborationConfig; the problems and the expert's errors use config.seed.
  config.collaboration = ml_collections.ConfigDict(dict(
      task="equations",
      num_problems=200,
      # equations: split 0 train / 1 held-out, level 0 a mix of 1..6 steps (min/max_level).
      problem_options=ml_collections.ConfigDict(dict(split=0, level=0)),
      context_k=3, context_examples=20,
      max_attempts=3, batch_size=64,
      temperature=0.7, max_tokens=512,
      min_judge_score=0.7))
  # The teacher backend (rl/backends.py BACKENDS): only the fields of its kind.
  config.teacher = ml_collections.ConfigDict(dict(kind="programmatic", error_rate=0.2))
  # rl/judge.py JudgeConfig; an empty url means no judge.
  config.judge = ml_collections.ConfigDict(dict(
      url="", model="", api_key_env="", timeout_s=60.0, retries=2, workers=8,
      max_tokens=512))
  if "openai" in variants:
    config.teacher = ml_collections.ConfigDict(dict(
        kind="openai", url="http://127.0.0.1:8000/v1", model="default", api_key_env="",
        timeout_s=120.0, retries=2, workers=8))
  if "local" in variants:
    config.teacher = ml_collections.ConfigDict(dict(
        kind="local", checkpoint="", tokenizer="", batch_size=16))
  if "judge" in variants:
    config.judge.url = "http://127.0.0.1:8000/v1"
    config.judge.model = "default"
  if "arithmetic" in variants:
    config.collaboration.task = "arithmetic"
    config.collaboration.problem_options = ml_collections.ConfigDict(dict(max_operand=99))
  if "test" in variants:
    config.collaboration.num_problems = 12
    config.collaboration.batch_size = 5
    config.collaboration.context_examples = 6
  return config
