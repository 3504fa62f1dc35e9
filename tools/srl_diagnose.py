r"""What SRL's reward can see in a model: its step-wise prompts, sampled greedily and G times.

  python tools/srl_diagnose.py --model=WORKDIR/base/export/model \
      --tokenizer=WORKDIR/tokenizer.model --trajectories=WORKDIR/expert/trajectories.jsonl

For each of the first `--num` step prompts of the trajectories (rl/srl.py `step_prompts`, the
expert's earlier steps in the prefix, with their monologues unless
`--noprefix_reasoning`), one greedy completion and `--samples` at `--temperature`, each
stopped at the end of its first step as an SRL rollout is (`srl.step_complete`) and scored
with SRL's reward (`srl.score`). Prints:

- greedy: how often the model writes exactly the expert's next action, its mean
  similarity, and how often its output does not parse;
- of the steps it gets wrong greedily, how many have the expert's action among the samples
  ("reachable"): the others are confident errors, which no method that samples and then
  rewards can see;
- how many groups have a reward spread of at least `--min_std` (the groups SRL's dynamic
  sampling keeps at that threshold);
- the same per step index.

A diagnostic, not a benchmark; prints lscpu's model name with its time all the same. The SRL
demonstration's README section quotes its figures on the demonstration's base.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "Model directory (an export's model/).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer (default: the model's).")
_TRAJECTORIES = flags.DEFINE_string(
    "trajectories", None, "Trajectory spec (data/trajectories.py): a JSONL / JSON / Parquet "
    "file, a datasets directory or task:equations?n=..")
_NUM = flags.DEFINE_integer("num", 400, "Step prompts diagnosed (the first ones).")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Samples per step prompt (SRL's group size).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_MIN_STD = flags.DEFINE_float("min_std", 0.01, "Group reward spread counted as 'has signal'.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "New tokens per completion.")
_PREFIX_REASONING = flags.DEFINE_boolean(
    "prefix_reasoning", True, "The expert's monologues in the prefixes (srl.prefix_reasoning).")
_SYSTEM = flags.DEFINE_string(
    "system", None, "System prompt of the step prompts (default: the equations task's, as "
    "configs/srl.py:equations and the SRL demonstration use; '' for none).")
_BATCH = flags.DEFINE_integer("batch_prompts", 32, "Step prompts per sampler call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

EXACT = 1.0 - 1e-9   # difflib's ratio is 1.0 exactly when the two actions are equal


@dataclasses.dataclass
class Counts:
  """Tallies over a set of step prompts (`diagnose`)."""

  prompts: int = 0
  greedy_exact: int = 0
  greedy_unparsed: int = 0
  greedy_similarity: float = 0.0
  wrong: int = 0
  reachable: int = 0          # wrong greedily, the expert's action among the samples
  spread: int = 0             # groups whose rewards' std is >= min_std

  def add(self, greedy: float, sampled: Sequence[float], spread: bool) -> None:
    self.prompts += 1
    self.greedy_similarity += max(greedy, 0.0)
    if greedy < 0:
      self.greedy_unparsed += 1
    if greedy >= EXACT:
      self.greedy_exact += 1
    else:
      self.wrong += 1
      self.reachable += any(s >= EXACT for s in sampled)
    self.spread += spread

  def summary(self) -> dict[str, float]:
    n = max(self.prompts, 1)
    return {"prompts": self.prompts, "greedy_exact": self.greedy_exact / n,
            "greedy_similarity": self.greedy_similarity / n,
            "greedy_unparsed": self.greedy_unparsed / n, "wrong": self.wrong,
            "reachable": self.reachable / max(self.wrong, 1), "spread": self.spread / n}


def diagnose(greedy: Sequence[float], sampled: Sequence[Sequence[float]],
             steps: Sequence[Any], min_std: float) -> dict[Any, Counts]:
  """Per prompt: its greedy reward, its samples' rewards and its step index ->
  {"all": Counts, step index: Counts}. Rewards are SRL's (`srl.score`: similarity, -1
  unparsed). A group has a spread where SRL's dynamic sampling would keep it
  (`advantages.low_spread_groups`, the learner's test)."""
  import numpy as np

  from wakea_jax.rl import advantages

  low = np.asarray(advantages.low_spread_groups(np.asarray(sampled, np.float32), min_std))
  out: dict[Any, Counts] = collections.defaultdict(Counts)
  for g, s, step, flat in zip(greedy, sampled, steps, low, strict=True):
    out["all"].add(g, s, not flat)
    out[step].add(g, s, not flat)
  return dict(out)


def _line(label: str, c: dict[str, float]) -> str:
  return (f"{label:<8} {c['prompts']:>6} {100 * c['greedy_exact']:>7.1f}% "
          f"{c['greedy_similarity']:>9.3f} {100 * c['greedy_unparsed']:>8.1f}% "
          f"{c['wrong']:>6} {100 * c['reachable']:>10.1f}% {100 * c['spread']:>7.1f}%")


def main(argv):
  del argv
  import jax
  from flax import nnx
  from machine import cpu_model

  from wakea_jax.checkpoints import loader
  from wakea_jax.data import trajectories as traj_lib
  from wakea_jax.data.tasks import equations
  from wakea_jax.data.tokenizer import tokenizer_from
  from wakea_jax.rl import rollout as rollout_lib
  from wakea_jax.rl import srl
  from wakea_jax.sampling.sampler import chat_sampler

  if not _MODEL.value or not _TRAJECTORIES.value:
    raise app.UsageError("--model and --trajectories are required")
  for name, value in (("num", _NUM.value), ("samples", _SAMPLES.value),
                      ("max_new_tokens", _MAX_NEW.value), ("batch_prompts", _BATCH.value)):
    if value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {value}")
  start = time.perf_counter()
  trajectories = traj_lib.load_trajectories(_TRAJECTORIES.value)
  system = equations.SYSTEM if _SYSTEM.value is None else _SYSTEM.value
  prompts = srl.step_prompts(trajectories, system=system,
                             prefix_reasoning=_PREFIX_REASONING.value)
  prompts = prompts[:_NUM.value]
  model = loader.load_model(_MODEL.value)
  graphdef, params = nnx.split(model)
  tokenizer = tokenizer_from(_TOKENIZER.value or loader.tokenizer_path(_MODEL.value))

  def run(temperature: float, group: int) -> list[str]:
    sampler = chat_sampler(graphdef, model.config, tokenizer, temperature=temperature)
    config = rollout_lib.RolloutConfig(group_size=group, max_new_tokens=_MAX_NEW.value,
                                       temperature=temperature)
    texts: list[str] = []
    for first in range(0, len(prompts), _BATCH.value):
      out = rollout_lib.generate_rollouts(
          sampler, params, prompts[first:first + _BATCH.value], tokenizer=tokenizer,
          config=config, rng=jax.random.key(_SEED.value * 1_000_003 + first),
          stop=(srl.step_complete,))
      texts += out.texts
    return texts

  greedy_texts = run(0.0, 1)
  sampled_texts = run(_TEMPERATURE.value, _SAMPLES.value)
  g = _SAMPLES.value
  greedy = [srl.score(t, p.answer) for t, p in zip(greedy_texts, prompts, strict=True)]
  sampled = [[srl.score(t, p.answer) for t in sampled_texts[i * g:(i + 1) * g]]
             for i, p in enumerate(prompts)]
  counts = diagnose(greedy, sampled, [p.meta["step"] for p in prompts], _MIN_STD.value)
  seconds = time.perf_counter() - start
  print(f"cpu: {cpu_model()}; {len(prompts)} step prompts of {len(trajectories)} "
        f"trajectories; greedy and {g} samples at temperature {_TEMPERATURE.value:g}; "
        f"{seconds:.1f} s")
  print(f"{'step':<8} {'prompts':>6} {'exact':>8} {'similarity':>9} {'unparsed':>9} "
        f"{'wrong':>6} {'reachable':>11} {'spread':>8}")
  print(_line("all", counts["all"].summary()))
  for step in sorted(k for k in counts if k != "all"):
    print(_line(str(step), counts[step].summary()))
  total = counts["all"].summary()
  print(f"exact: the greedy action is the expert's; reachable: of the wrong ones, the expert's "
        f"action is among the {g} samples (the rest, "
        f"{100 * (1 - total['reachable']):.1f}%, are confident errors); spread: groups whose "
        f"rewards' std is >= {_MIN_STD.value:g}")


if __name__ == "__main__":
  app.run(main)
