"""Held-out evaluation of a policy on verifiable prompts: greedy accuracy and pass@k.

A completion's correctness is the value of the reward named by `correct_reward` (a
`rewards.REWARDS` entry, e.g. "math": 1 correct, 0 not). pass@k uses the unbiased estimator of
Chen et al. 2021 (arXiv 2107.03374 eq. 1) from n >= k samples per prompt:
pass@k = E[1 - C(n - c, k) / C(n, k)], c the number of correct samples.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from wakea_jax.checkpoints import loader
from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.tokenizer import Tokenizer, chat_pad_id, tokenizer_from
from wakea_jax.parallel import multihost
from wakea_jax.rl.media_prompts import PromptMedia
from wakea_jax.rl.prompts import PromptRecord
from wakea_jax.rl.rewards import correctness_reward
from wakea_jax.rl.rollout import RolloutConfig, Rollouts, generate_rollouts, router_for
from wakea_jax.rl.samples import Sample
from wakea_jax.sampling.sampler import Sampler, chat_sampler, check_vocab
from wakea_jax.toolbox.router import Router

CorrectFn = Callable[[Sequence[Sample]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """config.eval: held-out evaluation of a policy."""

  correct_reward: str = "math"   # the reward (rewards.REWARDS) whose value is correctness (0/1)
  num_samples: int = 8           # n samples per prompt for pass@k (0: greedy only)
  pass_k: tuple[int, ...] = (1, 8)
  temperature: float = 1.0
  batch_prompts: int = 64        # prompts per sampler call

  def __post_init__(self) -> None:
    object.__setattr__(self, "pass_k", tuple(self.pass_k))
    if self.num_samples and any(k > self.num_samples for k in self.pass_k):
      raise ValueError(f"eval.pass_k {self.pass_k} needs eval.num_samples >= {max(self.pass_k)}")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_and_check(sampler: Sampler, params: nnx.State, prompts: Sequence[PromptRecord],
                     group: int, *, tokenizer: Tokenizer, rollout: RolloutConfig,
                     correct: CorrectFn, router: Router | None, rng: jax.Array,
                     batch_prompts: int = 64, media: PromptMedia | None = None
                     ) -> tuple[np.ndarray, list[str]]:
  """`group` completions per prompt, `batch_prompts` prompts per sampler call:
  (correctness [num_prompts, group], completion texts, group-major). `media` renders and
  prefills media prompts (rl/media_prompts.py)."""
  config = dataclasses.replace(rollout, group_size=group)
  rows, texts = [], []
  for start in range(0, len(prompts), batch_prompts):
    # On several processes each samples its share of the chunk (the sampler call is
    # collective, so every process runs the same number of chunks).
    chunk = multihost.process_slice(prompts[start:start + batch_prompts])
    out = generate_rollouts(sampler, params, chunk, tokenizer=tokenizer, config=config,
                            rng=jax.random.fold_in(rng, start), router=router, media=media)
    rows.append(np.asarray(correct(out.samples()), np.float32).reshape(len(chunk), group))
    texts += out.texts
  return np.concatenate(rows), texts


def evaluate_policy(graphdef: nnx.GraphDef, params: nnx.State, prompts: Sequence[PromptRecord],
                    *, tokenizer: Tokenizer, rollout: RolloutConfig, correct: CorrectFn,
                    config: EvalConfig = EvalConfig(), router: Router | None = None,
                    stop_ids: tuple[int, ...] = (), pad_id: int = 0, seed: int = 0,
                    model_config: Any = None, mesh: Mesh | None = None,
                    rules: Any = None, media: PromptMedia | None = None) -> dict[str, Any]:
  """{"greedy_accuracy", "pass@k"..., "eval_seconds", "examples": [(prompt, completion)]}.

  With a `mesh` the sampler runs on it; on several processes each process samples and
  checks its share of the prompts and the figures cover all of them.
  """
  start = time.perf_counter()
  placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
  greedy = chat_sampler(graphdef, model_config, tokenizer, temperature=0.0, stop_ids=stop_ids,
                        pad_id=pad_id, **placement)
  rng = jax.random.key(seed)
  common = dict(tokenizer=tokenizer, rollout=rollout, correct=correct, router=router,
                batch_prompts=config.batch_prompts, media=media)
  greedy_ok, texts = sample_and_check(greedy, params, prompts, 1, rng=rng, **common)
  mine = multihost.process_slice  # this process's prompts, in the order its texts come
  shown = [p.text for start in range(0, len(prompts), config.batch_prompts)
           for p in mine(prompts[start:start + config.batch_prompts])]
  greedy_ok = multihost.gather_objects(greedy_ok.tolist())
  result: dict[str, Any] = {"greedy_accuracy": float(np.mean(greedy_ok))}
  if config.num_samples:
    sampler = chat_sampler(graphdef, model_config, tokenizer, temperature=config.temperature,
                           stop_ids=stop_ids, pad_id=pad_id, **placement)
    ok, _ = sample_and_check(sampler, params, prompts, config.num_samples,
                             rng=jax.random.fold_in(rng, 1), **common)
    ok = np.asarray(multihost.gather_objects(ok.tolist()), np.float32)
    n = config.num_samples
    counts = ok.sum(axis=1).astype(int)
    for k in config.pass_k:
      result[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in counts]))
    result["sample_accuracy"] = float(ok.mean())
  result["seconds"] = time.perf_counter() - start
  result["examples"] = list(zip(shown[:4], texts[:4]))
  return result


def greedy_rollouts(checkpoint: str | pathlib.Path, prompts: Sequence[PromptRecord], *,
                    rollout: RolloutConfig, tokenizer_path: str = "", seed: int = 0,
                    dtype: str | None = None, batch_prompts: int = 64) -> Rollouts:
  """One greedy completion per prompt from the model at `checkpoint`, sampled like `rollout`
  (its search protocol included, no tool router; `batch_prompts` prompts per sampler call, on this
  process): the whole rollouts, for the demonstrations that score more than correctness
  (searches per answer, valid steps). `dtype`: the compute dtype (default: the
  checkpoint's). `evaluate_checkpoint` is the figure of record for accuracy and pass@k.

  Calls of 64 rows, not one of every prompt: the SRL demonstration's 1,024 questions took
  48.7 s in one call against 19.7 s in calls of 64 and 14.2 s of 16, the same completions
  (its 1M-parameter base, whose decode step reads the KV cache far more than the weights;
  `tools/bench_scoring.py`, README "The SRL learning demonstration")."""
  if batch_prompts < 1:
    raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
  model = loader.load_model(checkpoint, dtype=dtype)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
  sampler = chat_sampler(graphdef, model.config, tokenizer, temperature=0.0,
                         model_source=f"the model {checkpoint}")
  config, rng = dataclasses.replace(rollout, group_size=1), jax.random.key(seed)
  return Rollouts.concat([
      generate_rollouts(sampler, params, prompts[start:start + batch_prompts],
                        tokenizer=tokenizer, config=config, rng=jax.random.fold_in(rng, start))
      for start in range(0, max(len(prompts), 1), batch_prompts)])


def evaluate_checkpoint(checkpoint: str | pathlib.Path, prompts: Sequence[PromptRecord], *,
                        rollout: RolloutConfig, config: EvalConfig, tokenizer_path: str = "",
                        seed: int = 0, mesh: Mesh | None = None, rules: Any = None
                        ) -> dict[str, Any]:
  """`evaluate_policy` of the model at `checkpoint` (any kind `checkpoints.loader` reads),
  sampled like `rollout` (tools included), correct per `config.correct_reward`; with a
  `mesh`, restored onto it and sampled there."""
  model = loader.load_model(checkpoint, mesh=mesh, rules=rules)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
  check_vocab(tokenizer, model.config, model_source=f"the checkpoint {checkpoint}")
  return evaluate_policy(
      graphdef, params, prompts, tokenizer=tokenizer, rollout=rollout,
      correct=correctness_reward(config.correct_reward), config=config,
      router=router_for(rollout), stop_ids=chat_stop_ids(tokenizer),
      pad_id=chat_pad_id(tokenizer), seed=seed, model_config=model.config, mesh=mesh,
      rules=rules)
