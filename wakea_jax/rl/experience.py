"""ExGRPO's experience buffer (arXiv 2510.02245 §3): successful rollouts kept per prompt,
replayed with priority on prompts of medium difficulty.

The buffer is host-side, pure Python/NumPy (only `WithExperience` gathers over processes);
the learner feeds it every step and draws from it.

  observe   one call per RL step with that step's fresh groups: each prompt's visit records
            its correctness rate (correct / group size), its correct rollouts are stored
            (at most `max_per_prompt` per prompt, the oldest evicted first: their behaviour
            log-probs are the furthest from the current policy), and a prompt solved by every
            rollout of its last `retire_after` visits retires: its trajectories are dropped
            and it is never replayed again (§3.1 "Experience Partition", the retired set).
  buckets   a prompt's rate Acc(q) (correct / total over its last `rate_window` visits; the
            paper's latest correctness rate when 1) puts it in low (<= low_max), medium
            (<= medium_max) or high (the rest), the paper's 25% / 75% split.
  sample    §3.1 "Experience Selection". Question sampling: the prompts are grouped by their
            rate Acc (the authors' buckets, keyed by the number of correct rollouts) and a
            group is drawn with probability proportional to the Gaussian density
            N(Acc; mu=0.5, sigma) (sigma = 1 in the paper), then a prompt uniformly inside
            it, without replacement. The authors' code (ElliottYan/LUFFY,
            ExGRPO/.../experience/weighted_bucket_sampler.py, `_normal_mapping`) evaluates the
            same density on the success count k with mu = K/2, sigma = 1, i.e. sigma = 1/K in
            rate units: set `priority_sigma` to 1/K for its sharper priority. Trajectory
            selection: per sampled prompt the trajectory of LOWEST entropy. The paper scores
            entropy under the current policy; `sample(entropy_fn=...)` takes that scoring,
            and without it each trajectory's entropy under the policy that produced it is used.
  mix       how many of a step's groups come from replay: floor(groups * rho), capped by the
            replayable prompts (the authors' `experience_ratio`, rho = 0.5), and nothing before
            replay has started: after the first step whose fresh accuracy exceeds
            `start_accuracy` (the authors' delayed start, `experience_start_sratio` = 0.35)
            and once `min_prompts` prompts are replayable.

The state (`state_dict`) is plain JSON, arrays as base64 of their little-endian bytes and the
NumPy generator's state as strings, so it rides in the checkpoint's JSON data item beside the
prompt iterator's position (`WithExperience`, the train loop's `data`) and a resumed run
replays exactly what the straight one would. `groups_from_rollouts` turns a step's rollouts
into `observe`'s arguments.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from wakea_jax.parallel import multihost

if TYPE_CHECKING:   # only the type: the buffer's users need not import the sampler
  from wakea_jax.rl.rollout import Rollouts

BUCKETS = ("low", "medium", "high")
ENTROPIES = ("current", "behaviour")
_STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ExperienceConfig:
  """config.experience: ExGRPO's buffer and replay mix (defaults: arXiv 2510.02245 and the
  authors' run script). `enabled` turns replay on in the learner (rl/replay.py)."""

  enabled: bool = False
  replay_ratio: float = 0.5      # rho: share of a step's groups replayed from the buffer
  low_max: float = 0.25          # Acc <= low_max: low bucket
  medium_max: float = 0.75       # low_max < Acc <= medium_max: medium; above: high
  priority_sigma: float = 1.0    # sigma of N(Acc; 0.5, sigma) (paper: 1; code: 1/K)
  rate_window: int = 1           # visits pooled into Acc (1: the latest correctness rate)
  retire_after: int = 1          # all-correct visits in a row that retire a prompt
  max_per_prompt: int = 8        # trajectories kept per prompt (oldest evicted)
  min_prompts: int = 1           # replayable prompts needed before replay starts
  start_accuracy: float = 0.35   # replay starts after a step's fresh accuracy exceeds this
  # Whose entropy picks a replayed prompt's trajectory (the lowest): "current" scores the
  # stored ones under the current policy (the paper; one forward pass of the candidates per
  # step, rl/replay.py), "behaviour" takes each one's stored entropy (no extra pass).
  entropy: str = "current"

  def __post_init__(self) -> None:
    for name in ("replay_ratio", "low_max", "medium_max", "start_accuracy"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"experience.{name} must be in [0, 1], got {value}")
    if not self.low_max < self.medium_max:
      raise ValueError(f"experience.low_max={self.low_max} must be below "
                       f"experience.medium_max={self.medium_max} (the medium bucket between "
                       "them would be empty)")
    if not 0.0 < self.priority_sigma < math.inf:
      raise ValueError(f"experience.priority_sigma must be a finite number > 0, got "
                       f"{self.priority_sigma}")
    for name in ("rate_window", "retire_after", "max_per_prompt", "min_prompts"):
      if getattr(self, name) < 1:
        raise ValueError(f"experience.{name} must be >= 1, got {getattr(self, name)}")
    if self.entropy not in ENTROPIES:
      raise ValueError(f"experience.entropy={self.entropy!r} is not one of {ENTROPIES}")


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
  """One stored rollout of a prompt (the prompt's ids are re-rendered from its record).

  completion_ids     int32 [T]   model and tool tokens, in order (Rollouts.completion_ids)
  completion_mask    uint8 [T]   1 on the tokens the model generated (0 on tool output)
  behaviour_logprobs float32 [T] log-probs under the policy that sampled it (0 off the mask)
  reward             its total reward
  entropy            mean token entropy under that policy over the mask
  step               the RL step that produced it
  """

  completion_ids: np.ndarray
  completion_mask: np.ndarray
  behaviour_logprobs: np.ndarray
  reward: float
  entropy: float
  step: int = 0

  def __post_init__(self) -> None:
    ids = np.asarray(self.completion_ids, np.int32).reshape(-1)
    mask = np.asarray(self.completion_mask, np.uint8).reshape(-1)
    logprobs = np.asarray(self.behaviour_logprobs, np.float32).reshape(-1)
    if not len(ids) == len(mask) == len(logprobs):
      raise ValueError(f"trajectory: completion_ids ({len(ids)}), completion_mask "
                       f"({len(mask)}) and behaviour_logprobs ({len(logprobs)}) must have one "
                       "entry per completion token")
    if not (math.isfinite(self.reward) and math.isfinite(self.entropy)):
      raise ValueError(f"trajectory: reward ({self.reward}) and entropy ({self.entropy}) must "
                       "be finite (they are saved as JSON numbers)")
    object.__setattr__(self, "completion_ids", ids)
    object.__setattr__(self, "completion_mask", mask)
    object.__setattr__(self, "behaviour_logprobs", logprobs)
    object.__setattr__(self, "reward", float(self.reward))
    object.__setattr__(self, "entropy", float(self.entropy))
    object.__setattr__(self, "step", int(self.step))


@dataclasses.dataclass(frozen=True)
class Replay:
  """One sampled prompt and its chosen (lowest-entropy) trajectory."""

  key: str
  trajectory: Trajectory
  rate: float
  bucket: str


@dataclasses.dataclass
class _Prompt:
  visits: list[tuple[int, int]]       # (correct, total), newest last
  trajectories: list[Trajectory]      # oldest first
  retired: bool = False


def prompt_key(messages: Any) -> str:
  """A stable key of a prompt: sha256 of its messages as canonical JSON (a PromptRecord or its
  `messages`), the same in every process and run, so the buffer's state maps back to it."""
  messages = getattr(messages, "messages", messages)
  text = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False,
                    separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def sampled_entropy(logprobs: np.ndarray, mask: np.ndarray) -> float:
  """-mean log p of the sampled tokens over `mask`: an unbiased estimate of the mean token
  entropy of the sampling distribution (E_x[-log p(x)] = H), for when the per-token entropy
  was not computed; 0 for an empty mask."""
  mask = np.asarray(mask, np.float64)
  total = float(mask.sum())
  return float(-(np.asarray(logprobs, np.float64) * mask).sum() / total) if total else 0.0


def bucket_of(rate: float, config: ExperienceConfig) -> str:
  """low (Acc <= low_max), medium (<= medium_max) or high."""
  if rate <= config.low_max:
    return "low"
  return "medium" if rate <= config.medium_max else "high"


def priority_weights(rates: np.ndarray, sigma: float, mu: float = 0.5) -> np.ndarray:
  """N(Acc; mu, sigma), the Gaussian density arXiv 2510.02245 §3.1 samples questions by."""
  rates = np.asarray(rates, np.float64)
  return np.exp(-((rates - mu) ** 2) / (2 * sigma ** 2)) / math.sqrt(2 * math.pi * sigma ** 2)


def mix(groups: int, replay_ratio: float, available: int | None = None) -> tuple[int, int]:
  """(fresh, replayed) groups of a step of `groups`: floor(groups * rho) replayed, at most
  `available` (the replayable prompts), the rest fresh."""
  if groups < 0 or not 0.0 <= replay_ratio <= 1.0:
    raise ValueError(f"mix: groups ({groups}) must be >= 0 and replay_ratio ({replay_ratio}) "
                     "in [0, 1]")
  replay = math.floor(groups * replay_ratio + 1e-9)   # 0.29 * 100 is 28.999..
  if available is not None:
    replay = min(replay, max(available, 0))
  return groups - replay, replay


class ExperienceBuffer:
  """Successful trajectories per prompt key, their prompts' correctness, and a seeded sampler;
  `state_dict` / `load_state_dict` round-trip it exactly through JSON."""

  def __init__(self, config: ExperienceConfig = ExperienceConfig(), seed: int = 0):
    self.config = config
    self.rng = np.random.Generator(np.random.PCG64(seed))
    self.started = False          # the delayed start has passed
    self._prompts: dict[str, _Prompt] = {}
    self._last: dict[str, float] = {"replay_ratio": 0.0, "replay_entropy": 0.0}

  # -- feeding ---------------------------------------------------------------------------

  def observe(self, keys: Sequence[str], trajectories: Sequence[Sequence[Trajectory]],
              correct: Sequence[Sequence[bool]]) -> None:
    """One step's fresh groups: prompt `keys[i]` was rolled out as `trajectories[i]`, whose
    correctness is `correct[i]` (aligned). Updates the rates, stores the correct rollouts,
    retires always-solved prompts and passes the delayed start once the step's accuracy
    exceeds `start_accuracy`. Groups of retired prompts are ignored."""
    if not len(keys) == len(trajectories) == len(correct):
      raise ValueError(f"observe: {len(keys)} keys, {len(trajectories)} trajectory groups and "
                       f"{len(correct)} correctness groups must be aligned")
    solved = seen = 0
    c = self.config
    for key, group, right in zip(keys, trajectories, correct):
      right = [bool(x) for x in right]
      if len(group) != len(right) or not right:
        raise ValueError(f"observe: prompt {key}: {len(group)} trajectories and {len(right)} "
                         "correctness flags must be aligned and non-empty")
      solved, seen = solved + sum(right), seen + len(right)
      entry = self._prompts.setdefault(key, _Prompt(visits=[], trajectories=[]))
      if entry.retired:
        continue
      entry.visits.append((sum(right), len(right)))
      del entry.visits[:-max(c.rate_window, c.retire_after)]
      stored = entry.trajectories
      for trajectory, ok in zip(group, right):
        if ok and not any(np.array_equal(t.completion_ids, trajectory.completion_ids)
                          for t in stored):
          stored.append(trajectory)
      del stored[:-c.max_per_prompt]
      recent = entry.visits[-c.retire_after:]
      if len(recent) == c.retire_after and all(k == n for k, n in recent):
        entry.retired, entry.trajectories = True, []
    if seen and solved / seen > c.start_accuracy:
      self.started = True

  # -- reading ---------------------------------------------------------------------------

  def rate(self, key: str) -> float:
    """Acc(q): correct / total over the prompt's last `rate_window` visits."""
    visits = self._prompts[key].visits[-self.config.rate_window:]
    return sum(k for k, _ in visits) / max(sum(n for _, n in visits), 1)

  def retired(self, key: str) -> bool:
    """Whether the prompt retired (always solved; never replayed again)."""
    entry = self._prompts.get(key)
    return entry is not None and entry.retired

  def trajectories(self, key: str) -> list[Trajectory]:
    """The prompt's stored trajectories, oldest first."""
    entry = self._prompts.get(key)
    return list(entry.trajectories) if entry is not None else []

  def replayable(self) -> list[str]:
    """Keys of the prompts that can be replayed (not retired, a trajectory stored), sorted."""
    return sorted(k for k, e in self._prompts.items() if not e.retired and e.trajectories)

  def ready(self) -> bool:
    """Replay has started: the delayed start passed and `min_prompts` prompts are replayable."""
    return self.started and len(self.replayable()) >= self.config.min_prompts

  def replay_groups(self, groups: int) -> int:
    """How many of a step's `groups` come from replay (`mix` with the config's rho, capped by
    the replayable prompts; 0 before replay starts). Recorded as the replay_ratio metric."""
    replay = 0
    if self.ready():
      replay = mix(groups, self.config.replay_ratio, len(self.replayable()))[1]
    self._last["replay_ratio"] = replay / groups if groups else 0.0
    return replay

  def draw_probabilities(self) -> dict[str, float]:
    """The probability of each replayable prompt being the next draw of `sample`: its rate
    group's N(Acc; 0.5, sigma) share, divided evenly within the group."""
    levels = self._levels(self.replayable())
    if not levels:
      return {}
    rates = sorted(levels)
    weights = priority_weights(np.array(rates), self.config.priority_sigma)
    share = weights / weights.sum()
    return {k: float(p) / len(levels[r]) for r, p in zip(rates, share) for k in levels[r]}

  def sample(self, n: int, entropy_fn: Callable[[str, list[Trajectory]], Sequence[float]]
             | None = None) -> list[Replay]:
    """Up to `n` distinct prompts by the Gaussian priority (none before `ready()`), each with
    its lowest-entropy trajectory: by `entropy_fn(key, trajectories)` (e.g. the current
    policy's, as the paper) or else by each trajectory's stored entropy."""
    keys = self.replayable()
    if n <= 0 or not self.ready():
      return []
    levels = self._levels(keys)
    picked: list[str] = []
    for _ in range(min(n, len(keys))):
      rates = sorted(levels)
      weights = priority_weights(np.array(rates), self.config.priority_sigma)
      rate = rates[int(self.rng.choice(len(rates), p=weights / weights.sum()))]
      members = levels[rate]
      picked.append(members.pop(int(self.rng.integers(len(members)))))
      if not members:
        del levels[rate]
    out = []
    for key in picked:
      stored = self._prompts[key].trajectories
      entropies = ([t.entropy for t in stored] if entropy_fn is None
                   else list(entropy_fn(key, list(stored))))
      if len(entropies) != len(stored):
        raise ValueError(f"sample: entropy_fn returned {len(entropies)} entropies for the "
                         f"{len(stored)} trajectories of prompt {key}")
      rate = self.rate(key)
      out.append(Replay(key=key, trajectory=stored[int(np.argmin(entropies))], rate=rate,
                        bucket=bucket_of(rate, self.config)))
    self._last["replay_entropy"] = (float(np.mean([r.trajectory.entropy for r in out]))
                                    if out else 0.0)
    return out

  def _levels(self, keys: Sequence[str]) -> dict[float, list[str]]:
    levels: dict[float, list[str]] = {}
    for key in keys:
      levels.setdefault(round(self.rate(key), 12), []).append(key)
    return levels

  def metrics(self) -> dict[str, float]:
    """experience/*: replayable prompts per bucket, stored trajectories, retired prompts, the
    last step's replay ratio and the mean entropy of the trajectories it replayed."""
    counts = dict.fromkeys(BUCKETS, 0)
    for key in self.replayable():
      counts[bucket_of(self.rate(key), self.config)] += 1
    return {**{f"experience/prompts_{b}": float(n) for b, n in counts.items()},
            "experience/trajectories": float(sum(len(e.trajectories)
                                                 for e in self._prompts.values())),
            "experience/retired": float(sum(e.retired for e in self._prompts.values())),
            "experience/started": float(self.started),
            "experience/replay_ratio": self._last["replay_ratio"],
            "experience/replay_entropy": self._last["replay_entropy"]}

  # -- state -----------------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """Everything as JSON: prompts in insertion order, each prompt's trajectories packed into
    concatenated arrays (base64), the generator's state (big integers as strings)."""
    prompts = []
    for key, e in self._prompts.items():
      t = e.trajectories
      prompts.append({
          "key": key, "visits": [list(v) for v in e.visits], "retired": e.retired,
          "lengths": [len(x.completion_ids) for x in t],
          "rewards": [x.reward for x in t], "entropies": [x.entropy for x in t],
          "steps": [x.step for x in t],
          "completion_ids": _encode([x.completion_ids for x in t], np.int32),
          "completion_mask": _encode([x.completion_mask for x in t], np.uint8),
          "behaviour_logprobs": _encode([x.behaviour_logprobs for x in t], np.float32)})
    rng = self.rng.bit_generator.state
    return {"format": _STATE_FORMAT, "started": self.started,
            "rng": json.loads(json.dumps(rng, default=str), parse_int=str),
            "last": dict(self._last), "prompts": prompts}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Continues from a `state_dict()` (after a JSON round trip or not)."""
    if state.get("format") != _STATE_FORMAT:
      raise ValueError(f"experience buffer state: format {state.get('format')!r} is not "
                       f"{_STATE_FORMAT}, the one this code writes")
    prompts: dict[str, _Prompt] = {}
    for p in state["prompts"]:
      offsets = np.cumsum([0, *p["lengths"]])
      ids = _decode(p["completion_ids"], np.int32)
      mask = _decode(p["completion_mask"], np.uint8)
      logprobs = _decode(p["behaviour_logprobs"], np.float32)
      if not len(ids) == len(mask) == len(logprobs) == offsets[-1]:
        raise ValueError(f"experience buffer state: prompt {p['key']}: the arrays do not "
                         f"match the {offsets[-1]} tokens its lengths add up to")
      trajectories = [Trajectory(ids[a:b], mask[a:b], logprobs[a:b], reward=r, entropy=h,
                                 step=s)
                      for a, b, r, h, s in zip(offsets[:-1], offsets[1:], p["rewards"],
                                               p["entropies"], p["steps"])]
      prompts[p["key"]] = _Prompt(visits=[(int(k), int(n)) for k, n in p["visits"]],
                                  trajectories=trajectories, retired=bool(p["retired"]))
    self._prompts = prompts
    self.started = bool(state["started"])
    self._last = {k: float(v) for k, v in state["last"].items()}
    self.rng.bit_generator.state = _ints(state["rng"])


class WithExperience:
  """The train loop's resumable `data`: the prompt iterator and the experience buffer, saved
  together in the checkpoint's JSON data item as {"prompts": .., "experience": [one buffer
  state per process]}. Each process keeps the buffer of the prompts it draws, so the states
  are gathered (every process calls `get_state` at the same point, as the loop does) and a
  resume needs the same process count. A checkpoint from before the buffer (a bare prompt
  position) resumes with an empty buffer."""

  def __init__(self, data: Any, buffer: ExperienceBuffer):
    self.data, self.buffer = data, buffer

  def get_state(self) -> dict[str, Any]:
    """{"prompts": the iterator's state, "experience": every process's buffer state}."""
    return {"prompts": self.data.get_state(),
            "experience": multihost.gather_objects([self.buffer.state_dict()])}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` (or from a bare prompt position: empty buffer)."""
    if "experience" not in state:
      self.data.set_state(state)
      return
    parts = state["experience"]
    if len(parts) != jax.process_count():
      raise ValueError(f"the checkpoint's experience buffer was saved by {len(parts)} "
                       f"processes, this run has {jax.process_count()}: resume ExGRPO with "
                       "the same process count")
    self.data.set_state(state["prompts"])
    self.buffer.load_state_dict(parts[jax.process_index()])


def groups_from_rollouts(rollouts: Rollouts, rewards: np.ndarray, correct: np.ndarray, *,
                         step: int, behaviour_logprobs: Sequence[np.ndarray] | None = None
                         ) -> tuple[list[str], list[list[Trajectory]], list[list[bool]]]:
  """A step's group-major rollouts as `observe`'s (keys, trajectories, correct).

  rewards, correct   [rows] total reward and correctness (e.g. rewards.correctness_reward)
  behaviour_logprobs per row, over its completion tokens (default: the sampler's); each
  trajectory's entropy is their `sampled_entropy` over the model's tokens (1 - tool_mask).
  """
  g = rollouts.group_size
  logprobs = rollouts.sampler_logprobs if behaviour_logprobs is None else behaviour_logprobs
  keys, groups, flags = [], [], []
  for start in range(0, len(rollouts), g):
    rows = range(start, start + g)
    keys.append(prompt_key(rollouts.prompts[start]))
    group = []
    for r in rows:
      mask = 1 - np.asarray(rollouts.tool_mask[r], np.int32)
      group.append(Trajectory(
          completion_ids=np.asarray(rollouts.completion_ids[r]), completion_mask=mask,
          behaviour_logprobs=np.asarray(logprobs[r], np.float32) * mask,
          reward=float(rewards[r]), entropy=sampled_entropy(logprobs[r], mask), step=step))
    groups.append(group)
    flags.append([bool(correct[r]) for r in rows])
  return keys, groups, flags


def _encode(arrays: Sequence[np.ndarray], dtype: type) -> str:
  flat = np.concatenate(arrays).astype(np.dtype(dtype).newbyteorder("<")) if arrays else \
      np.zeros(0, dtype)
  return base64.b64encode(flat.tobytes()).decode("ascii")


def _decode(text: str, dtype: type) -> np.ndarray:
  data = np.frombuffer(base64.b64decode(text), np.dtype(dtype).newbyteorder("<"))
  return data.astype(dtype)


def _ints(value: Any) -> Any:
  """The generator state with its integer strings back as ints."""
  if isinstance(value, dict):
    return {k: _ints(v) for k, v in value.items()}
  if isinstance(value, str) and value.lstrip("-").isdigit():
    return int(value)
  return value
