r"""Google Tunix's GRPO step on the bench56m shapes: the comparison figure for bench_grpo.py.

Runs under an interpreter that has google-tunix installed, NOT wakea_jax's venv (it imports
nothing from wakea_jax; tools/machine.py is plain Python):

  python3.11 -m venv /tmp/tunix-venv && /tmp/tunix-venv/bin/pip install google-tunix
  /tmp/tunix-venv/bin/python tools/bench_tunix_grpo.py [--shapes='{"num_layers": 8, ...}'] \
      [--prompts=2 --group=8 --prompt_tokens=64 --new=128 --steps=3 --kl_beta=0.04 --json]

`python tools/bench_grpo.py --tunix_python=/tmp/tunix-venv/bin/python` runs it with the
preset's shapes and prints its figures beside ours.

The workload is bench_grpo's: a from-scratch float32 Llama (tunix.models.llama3: RMSNorm,
GQA, RoPE, SwiGLU, untied head) of the given shapes, weights drawn from N(0, 0.02) like ours;
a separate reference copy (KL on, beta 0.04, the k3 / "low_var_kl" estimator like ours);
`prompts` prompts x `group` completions of exactly `new` tokens (the tokenizer's EOS id is
outside the vocabulary, so no completion stops early) from `prompt_tokens`-token prompts
(BOS + random ids); temperature 1, top-p 1, no top-k; a host reward with a different value
per completion; one iteration, one minibatch: one AdamW update (lr 1e-4, b2 0.99, clip 1.0)
per step. The step is Tunix's own loop (`GRPOLearner.train`, vanilla rollout engine,
trainer and sampler sharing one model on a one-device mesh); one warm-up step (compilation),
then `steps` timed steps. Phases are timed by wrapping the learner's own calls:
  rollout  RLCluster.generate (Tunix Sampler: prefill + while_loop decode, detokenise)
  reward   the learner's reward computation (host)
  score    RLCluster.get_ref_per_token_logps (the reference model's pass)
  update   RLCluster.update_actor (the policy-gradient AdamW step)
  step     the learner's whole global step (the above plus padding, masks, advantages)
Tunix re-scores no old log-probs at one iteration (it takes the loss's ratio against the
stopped-gradient current policy), so its step compares with our `auto` mode.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (tools/machine.py: no wakea_jax import)

# wakea_jax.models.config.get_preset("bench56m") (copied; bench_grpo.py passes the preset's
# current fields with --shapes, so the two stay in step).
BENCH56M = dict(vocab_size=32000, embed_dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
                head_dim=64, mlp_dim=1408, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=False, dtype="float32", param_dtype="float32",
                init_std=0.02)
PHASES = ("rollout", "reward", "score", "update", "step")


class IdTokenizer:
  """Text is space-separated token ids: no tokenizer file, and every id round-trips. EOS is
  `vocab_size` (never sampled), so every completion runs the full `new` tokens."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str, **kwargs) -> list[int]:
    del kwargs
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return self.vocab_size

  def pad_id(self) -> int:
    return 0


def parity_reward(prompts, completions, **kwargs):
  """Fraction of odd ids in a completion: a different value for nearly every completion of
  a random model, so the advantages are non-zero and every update is real."""
  del prompts, kwargs
  out = []
  for text in completions:
    ids = text.split()
    out.append(sum(int(t) % 2 for t in ids) / max(len(ids), 1))
  return out


def build_model(shapes: dict, seed: int):
  """A tunix.models.llama3 model of `shapes`, every matrix drawn from N(0, init_std)."""
  import jax
  from flax import nnx
  from tunix.models.llama3 import model as llama3

  config = llama3.ModelConfig(
      num_layers=shapes["num_layers"], vocab_size=shapes["vocab_size"],
      embed_dim=shapes["embed_dim"], hidden_dim=shapes["mlp_dim"],
      num_heads=shapes["num_heads"], head_dim=shapes["head_dim"],
      num_kv_heads=shapes["num_kv_heads"], rope_theta=int(shapes["rope_theta"]),
      norm_eps=shapes["norm_eps"], weight_tying=bool(shapes["tie_embeddings"]))
  model = llama3.Llama3(config, rngs=nnx.Rngs(seed))
  # Tunix's own init is N(0, 0.01) for attention/embeddings and zeros for the MLP; draw every
  # matrix like ours instead (norm scales stay ones).
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  std = float(shapes.get("init_std", 0.02))
  leaves = [x if x.ndim < 2 else std * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model, config


def run(args, shapes: dict) -> dict:
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  start = time.perf_counter()
  model, config = build_model(shapes, seed=0)
  reference, _ = build_model(shapes, seed=0)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # One device; Auto axes (jax.make_mesh's default Explicit axes break Tunix's embedding
  # gather).
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  roles = rl_cluster_lib.Role
  optimizer = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0))
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optimizer, eval_every_n_steps=10**9,
          max_steps=args.steps + 1, pbar_description=None),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=args.new, max_prompt_length=args.prompt_tokens,
          kv_cache_size=args.prompt_tokens + args.new, temperature=1.0, top_p=1.0,
          top_k=None))
  cluster = rl_cluster_lib.RLCluster(
      actor=model, reference=reference, tokenizer=IdTokenizer(config.vocab_size),
      cluster_config=cluster_config)
  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster,
      algo_config=grpo_learner.GRPOConfig(
          num_generations=args.group, num_iterations=1, beta=args.kl_beta,
          kl_loss_mode="low_var_kl", epsilon=0.2),
      reward_fns=parity_reward)
  build_s = time.perf_counter() - start

  times: dict[str, list[float]] = collections.defaultdict(list)
  tokens: list[int] = []

  def timed(name, fn, block=None):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      out = fn(*a, **k)
      jax.block_until_ready(block() if block else out)
      times[name].append(time.perf_counter() - t0)
      if name == "rollout":
        tokens.append(sum(len(t) for t in out.tokens))
      return out
    return wrapper

  actor_state = lambda: nnx.state(cluster.actor_trainer.model, nnx.Param)  # noqa: E731
  cluster.generate = timed("rollout", cluster.generate)
  cluster.get_ref_per_token_logps = timed("score", cluster.get_ref_per_token_logps)
  cluster.update_actor = timed("update", cluster.update_actor, block=actor_state)
  learner._compute_rewards = timed("reward", learner._compute_rewards)
  learner._run_global_step = timed("step", learner._run_global_step, block=actor_state)

  # Prompts: BOS + (prompt_tokens - 1) random ids, fresh ones every step.
  rng = np.random.default_rng(0)
  # (An array, as a grain batch gives it: the learner repeats each prompt `group` times.)
  batches = [{"prompts": np.array([" ".join(map(str, rng.integers(
      3, config.vocab_size, args.prompt_tokens - 1))) for _ in range(args.prompts)])}
             for _ in range(args.steps + 1)]
  learner.train(batches)
  if len(times["step"]) != args.steps + 1:
    raise RuntimeError(f"expected {args.steps + 1} steps, Tunix ran {len(times['step'])}")
  out = {p: float(np.mean(times[p][1:])) for p in PHASES}
  # How far the updates moved the policy from the reference (same init): > 0 and finite
  # when every update was real.
  reference_model = cluster.inference_worker.get_model("reference")
  pairs = zip(jax.tree.leaves(nnx.state(cluster.actor_trainer.model, nnx.Param)),
              jax.tree.leaves(nnx.state(reference_model, nnx.Param)))
  moved = float(np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in pairs)))
  out.update(first_step=times["step"][0], build=build_s, tokens=float(np.mean(tokens[1:])),
             params=float(params), moved=moved)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="", help="JSON of ModelConfig fields (bench56m's "
                      "if empty; unknown keys ignored)")
  parser.add_argument("--prompts", type=int, default=2)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--prompt_tokens", type=int, default=64)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--kl_beta", type=float, default=0.04)
  parser.add_argument("--json", action="store_true",
                      help="End with one line 'TUNIX_JSON {...}' for bench_grpo.py.")
  args = parser.parse_args()
  shapes = {**BENCH56M, **(json.loads(args.shapes) if args.shapes else {})}
  for key, want in (("dtype", "float32"), ("param_dtype", "float32"), ("qkv_bias", False),
                    ("qk_norm", False), ("rope_scaling", None)):
    if shapes.get(key, want) != want:
      print(f"note: {key}={shapes[key]!r} is not modelled here (runs {want!r})")

  import importlib.metadata

  import jax

  version = importlib.metadata.version("google-tunix")
  print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}; "
        f"google-tunix {version}, jax {jax.__version__}", flush=True)
  r = run(args, shapes)
  print(f"tunix llama3: {r['params'] / 1e6:.1f}M params, float32; {args.prompts} prompts x "
        f"{args.group} completions, prompts {args.prompt_tokens} tokens, {args.new} new tokens "
        f"(no early stop), beta {args.kl_beta}; build {r['build']:.1f} s, warm-up step "
        f"(compile) {r['first_step']:.1f} s; mean of {args.steps} steps after it; policy "
        f"moved {r['moved']:.3g} (L2) from the reference")
  print(f"{'':<17}" + "".join(f"{p + ' s':>10}" for p in PHASES) + f"{'tokens':>9}"
        f"{'tokens/s':>10}")
  print(f"{'tunix ' + version:<17}" + "".join(f"{r[p]:>10.2f}" for p in PHASES)
        + f"{r['tokens']:>9.0f}{r['tokens'] / r['step']:>10.1f}")
  if args.json:
    print("TUNIX_JSON " + json.dumps({"version": version, **r}), flush=True)


if __name__ == "__main__":
  main()
