"""LLM backends for the collaboration's roles (rl/collaboration.py): one protocol, three kinds.

  openai        any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, our own
                `python -m wakea_jax.serve`, a hosted API), through rl/chat_api.py
  local         a wakea_jax or Hugging Face checkpoint sampled in-process by our sampler,
                loaded once and sampled in batches
  programmatic  the task's own expert: the exact solution of a known problem, with an
                optional seeded error rate so that a demonstration run has work to reject

Every backend has `name` (its kind) and `model` (what provenance records) and
`generate(messages, *, n, temperature, max_tokens) -> list[str]`, n replies to one
conversation. Backends that are cheaper in batches (local, programmatic) also have
`generate_batch(conversations, ...) -> list[list[str]]`; `generate_all` uses it where it
exists and a thread pool of `generate` calls otherwise. Which backend plays a role is
config: `BACKENDS` maps a kind to its factory, `build_backend` checks the options.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
from flax import nnx

from wakea_jax.checkpoints import loader
from wakea_jax.data import chat
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.rl.chat_api import ChatClient, ChatError
from wakea_jax.sampling.sampler import Sampler, chat_sampler

Messages = Sequence[Mapping[str, str]]

# The teacher's prompt fences the problem like this (rl/collaboration.py); the programmatic
# expert finds the problem it is asked about by the last such block.
PROBLEM_OPEN, PROBLEM_CLOSE = "<problem>\n", "\n</problem>"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# An integer that is not part of a word, a decimal or a "Step k:" label.
_INTEGER = re.compile(r"(?<![\w.])\d+(?![\w.]|\s*:)")


class Backend(Protocol):
  """What a role needs from a model: n replies to a conversation."""

  name: str
  model: str

  def generate(self, messages: Messages, *, n: int = 1, temperature: float = 0.0,
               max_tokens: int = 512) -> list[str]:
    """n assistant replies to `messages` (OpenAI chat format: role and content)."""
    ...


def problem_of(messages: Messages) -> str:
  """The problem text fenced in the last user message (see PROBLEM_OPEN)."""
  user = [m["content"] for m in messages if m.get("role") == "user"]
  text = user[-1] if user else ""
  start = text.rfind(PROBLEM_OPEN)
  end = text.find(PROBLEM_CLOSE, start + len(PROBLEM_OPEN)) if start >= 0 else -1
  if end < 0:
    raise ValueError("the last user message has no <problem>...</problem> block")
  return text[start + len(PROBLEM_OPEN):end]


class OpenAIBackend:
  """Replies from an OpenAI-compatible endpoint, one request per reply.

  Why n requests rather than the API's `n`: several servers refuse or ignore n > 1 (ours
  does, serving/guardrails.py), and the replies are independent samples either way.
  A failed request raises `ChatError` (the collaboration records it as a rejection).
  """

  name = "openai"

  def __init__(self, *, url: str, model: str, api_key_env: str | None = None,
               timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 1.0,
               workers: int = 8) -> None:
    if workers < 1 or retries < 0 or timeout_s <= 0:
      raise ValueError(f"need workers >= 1, retries >= 0, timeout_s > 0; got workers={workers}"
                       f", retries={retries}, timeout_s={timeout_s}")
    self.client = ChatClient(url, model, api_key_env=api_key_env, timeout_s=timeout_s,
                             retries=retries, backoff_s=backoff_s)
    self.model = model
    self.workers = workers

  def generate(self, messages: Messages, *, n: int = 1, temperature: float = 0.0,
               max_tokens: int = 512) -> list[str]:
    """n replies, requested one after another."""
    return [self.client.complete(messages, temperature=temperature, max_tokens=max_tokens)
            for _ in range(n)]


class LocalBackend:
  """Replies sampled from a checkpoint by our sampler (model loaded once, batched calls).

  One Sampler per temperature (it is a static, compiled object); each call draws with the
  seed folded with a call counter, so regenerations differ when sampling and repeat when
  greedy.
  """

  name = "local"

  def __init__(self, *, checkpoint: str, tokenizer: str = "", seed: int = 0,
               batch_size: int = 16) -> None:
    if not checkpoint:
      raise ValueError("the local backend needs a checkpoint directory")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = checkpoint
    self.tokenizer = tokenizer_from(tokenizer or loader.tokenizer_path(checkpoint))
    model = loader.load_model(checkpoint)
    self.model_config = model.config
    self.graphdef, self.params = nnx.split(model)
    self.batch_size = batch_size
    self._rng = jax.random.key(seed)
    self._calls = 0
    self._samplers: dict[float, Sampler] = {}

  def _sampler(self, temperature: float) -> Sampler:
    if temperature not in self._samplers:
      self._samplers[temperature] = chat_sampler(
          self.graphdef, self.model_config, self.tokenizer, temperature=temperature,
          model_source=f"the checkpoint {self.model}")
    return self._samplers[temperature]

  def generate_batch(self, conversations: Sequence[Messages], *, n: int = 1,
                     temperature: float = 0.0, max_tokens: int = 512) -> list[list[str]]:
    """n replies to each conversation, sampled `batch_size` rows at a time."""
    sampler = self._sampler(temperature)
    prompts = [chat.render([dict(m) for m in messages], self.tokenizer,
                           add_generation_prompt=True).input_ids.tolist()
               for messages in conversations for _ in range(n)]
    texts: list[str] = []
    stops = set(sampler.stop_ids)
    for start in range(0, len(prompts), self.batch_size):
      self._calls += 1
      rows = prompts[start:start + self.batch_size]
      if len(prompts) > self.batch_size:
        # The sampler compiles per batch size: a short last batch is padded with copies of
        # its first row (dropped below) rather than compiled once more.
        rows = rows + [rows[0]] * (self.batch_size - len(rows))
      out = sampler.generate(self.params, rows, max_new_tokens=max_tokens,
                             rng=jax.random.fold_in(self._rng, self._calls))
      for tokens in out.tokens[:len(prompts) - start]:
        kept = tokens[:-1] if tokens and tokens[-1] in stops else tokens
        # Not skip_special: <think> and </think> are special ids, and the verifier and
        # task_types.split_steps read the monologue's markup (as rollouts keep it).
        texts.append(self.tokenizer.decode(kept))
    return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]

  def generate(self, messages: Messages, *, n: int = 1, temperature: float = 0.0,
               max_tokens: int = 512) -> list[str]:
    """n replies to one conversation."""
    return self.generate_batch([messages], n=n, temperature=temperature,
                               max_tokens=max_tokens)[0]


def corrupt(text: str, rng: random.Random) -> str:
  """`text` with one integer outside <think>...</think> moved by 1 or 2: a wrong step or a
  wrong answer, whichever the number was part of. Unchanged when there is no integer."""
  hidden = [m.span() for m in _THINK.finditer(text)]
  spots = [m for m in _INTEGER.finditer(text)
           if not any(a <= m.start() < b for a, b in hidden)]
  if not spots:
    return text
  spot = rng.choice(spots)
  value = max(0, int(spot.group()) + rng.choice((-2, -1, 1, 2)))
  if value == int(spot.group()):
    value += 1
  return text[:spot.start()] + str(value) + text[spot.end():]


class ProgrammaticBackend:
  """The task's expert: the exact solution of each problem it was given, looked up by the
  problem text fenced in the prompt; with probability `error_rate` (seeded by the problem
  and how often it was asked) one number in it is wrong (`corrupt`)."""

  name = "programmatic"

  def __init__(self, *, solutions: Mapping[str, str], expert: str, error_rate: float = 0.0,
               seed: int = 0) -> None:
    if not 0.0 <= error_rate <= 1.0:
      raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    self.solutions = dict(solutions)
    self.model = expert + (f"+errors{error_rate:g}" if error_rate else "")
    self.error_rate, self.seed = error_rate, seed
    self._asked: dict[str, int] = {}

  def generate(self, messages: Messages, *, n: int = 1, temperature: float = 0.0,
               max_tokens: int = 512) -> list[str]:
    """n copies of the known solution, each independently corrupted at `error_rate`."""
    del temperature, max_tokens   # an expert's solution has neither
    problem = problem_of(messages)
    if problem not in self.solutions:
      raise ValueError(f"the programmatic expert has no solution for problem {problem!r}")
    replies = []
    for _ in range(n):
      asked = self._asked.get(problem, 0)
      self._asked[problem] = asked + 1
      # Seeded by the problem and the call count, not by call order: a resumed or reordered
      # run makes the same mistakes on the same problem.
      rng = random.Random(f"{self.seed}:{asked}:{problem}")
      text = self.solutions[problem]
      replies.append(corrupt(text, rng) if rng.random() < self.error_rate else text)
    return replies

  def generate_batch(self, conversations: Sequence[Messages], *, n: int = 1,
                     temperature: float = 0.0, max_tokens: int = 512) -> list[list[str]]:
    """`generate` for each conversation."""
    return [self.generate(m, n=n, temperature=temperature, max_tokens=max_tokens)
            for m in conversations]


def generate_all(backend: Backend, conversations: Sequence[Messages], *, n: int = 1,
                 temperature: float = 0.0, max_tokens: int = 512, workers: int = 8
                 ) -> list[list[str] | ChatError]:
  """n replies to each conversation: the backend's `generate_batch` where it has one, else
  `generate` calls on `workers` threads; a failed request is its ChatError in place."""
  batch = getattr(backend, "generate_batch", None)
  if batch is not None:
    return batch(conversations, n=n, temperature=temperature, max_tokens=max_tokens)

  def one(messages: Messages) -> list[str] | ChatError:
    try:
      return backend.generate(messages, n=n, temperature=temperature, max_tokens=max_tokens)
    except ChatError as error:
      return error

  if not conversations:
    return []
  workers = min(getattr(backend, "workers", workers), len(conversations))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(one, conversations))


# kind -> factory(**options). The programmatic factory also receives the run's `solutions`
# and `expert` name from the collaboration (its options are only error_rate and seed).
BACKENDS: dict[str, Callable[..., Backend]] = {
    "openai": OpenAIBackend,
    "local": LocalBackend,
    "programmatic": ProgrammaticBackend,
}


def build_backend(spec: Mapping[str, Any], *, where: str, **context: Any) -> Backend:
  """The backend `spec` describes ({"kind": ..., options}); errors name `config.<where>`.

  `context` are arguments only some kinds take (the programmatic expert's solutions); they
  are passed to the kinds whose factory names them.
  """
  options = dict(spec)
  kind = options.pop("kind", None)
  if kind not in BACKENDS:
    raise ValueError(f"config.{where}.kind: {kind!r} is not a backend; known: "
                     f"{', '.join(sorted(BACKENDS))}")
  if kind == "programmatic":
    options.update(context)
  try:
    return BACKENDS[kind](**options)
  except TypeError as e:   # an unknown or missing option
    raise ValueError(f"config.{where}: {kind} backend: {e}") from None
  except ValueError as e:
    raise ValueError(f"config.{where}: {kind} backend: {e}") from None
