"""Batched autoregressive sampling with a KV cache: jitted prefill + `lax.while_loop` decode.

`Sampler` is a frozen, hashable dataclass (model graphdef + static settings); params are an
argument, so one compiled sampler serves every policy update of an RL run. Pieces:

  prefill(params, cache, tokens [b, t], mask [b, t]) -> (cache, logits [b, vocab])
      Appends the real (mask 1) tokens of each row to that row's cache at its end index;
      rows whose mask is all zero do not advance (their returned logits are meaningless, so
      callers merge with `jnp.where(mask.any(1)[:, None], new, old)`). This is both the
      prompt prefill and the "append tool output mid-generation to some rows" step.
  decode(params, state, num_steps) -> state
      Up to `num_steps` sampling steps (a `lax.while_loop` that also exits when every row is
      done); the state, and with it the cache, is donated.
  generate(params, prompts, *, max_new_tokens, rng, ...) -> SampleOutput   (host API)

Log-probs. `SampleOutput.logprobs` is log p(token) under the *unmodified* model distribution
(temperature 1, no top-k/top-p), i.e. exactly `objectives.sft.token_logprobs` on a full
forward of prompt + completion, which is what a trainer recomputes as the behaviour policy.
`processed_logprobs` is log q(token) under the distribution actually sampled from (tempered
and truncated; 0 for greedy), which importance corrections for truncated sampling need.

Vocabulary. A model's embedding may have more rows than its tokenizer has ids (Qwen pads
151,665 ids to 151,936 rows; a from-scratch model may round its vocabulary up). Ids at or
above `vocab_limit` (the tokenizer's vocab_size) cannot be decoded, so their logits are -inf
before anything else: they are never sampled nor picked greedily, and both log-probs above
are log-softmaxes over the valid ids only. The trainer scores with the same restriction
(`models.scoring.score_tokens(..., vocab_limit=...)`, wired by the RL learner), so the
sampler/trainer comparison holds also where padded rows carry mass (a random init; a
trained model gives them ~0). `chat_sampler` builds a Sampler for a model and a tokenizer,
with the limit, chat stop ids and pad id, after `check_vocab` (a tokenizer larger than the
embedding is an error naming both sizes).

Stop strings. Strings can straddle token boundaries and only exist after detokenisation, so
they are checked on the host: decoding runs in chunks of `chunk_steps` steps inside the jit,
and between chunks the host decodes each still-running row, finds the first stop string,
keeps the shortest token prefix whose text contains it, marks the row done and rewinds the
row's cache end index to that prefix (slot s holds position s, so the at most `chunk_steps`
extra tokens written past it are simply stale slots that get overwritten on resume). Stop
token ids, by contrast, are checked inside the loop every step.

Bucketing. The prompt width and the decode steps (the most new tokens) are rounded up to
powers of two (at least `min_prompt_bucket`), so new prompt lengths and max_new_tokens within
a bucket reuse the compiled functions (max new tokens is a per-row array, not a static). The
cache capacity is the prompt width + the most new tokens rounded up to a quarter of their
steps bucket (at least 64 slots, at most the bucket): at most two capacities per (width,
steps) bucket, and no slot a row cannot fill, since every decode step attends over the whole
capacity. The capacity is exact: a row that fills it is done, and the padding that done rows go on
feeding (written at their end index, clamped onto the last slot of a full row) lands only in
rows that are never read again (a done row resumes only through `inject`, which needs room
for its tool turn). An earlier rule's spare slot cost bench56m's common 128 + 128 shape a
third more cache (capacity 384, not 256): 2 ms of a 23 ms decode step on a 2-core AMD EPYC. The
batch size is not bucketed. `compile_count()` reports how many executables the jitted
functions hold (for tests).

Media prompts. The graphdef may be a `VisionLanguageModel` / `AudioLanguageModel`
(`models/multimodal.py`); `Sampler.config` is then its text decoder's ModelConfig (a
multimodal config given to `Sampler` or `chat_sampler` is replaced by its `.text`). Called
without media such a model runs its text path, so decode, `inject` and `refill` are
unchanged. `start` / `generate` take `media`, the per-row arrays of `models/media.py`, one
row per prompt (row i holds prompt i's items in the order of its placeholders):

  pixel_values [b, k, C, H, W] + image_mask [b, k]              (vision-language)
  input_features [b, k, mels, F] + feature_attention_mask [b, k, F]   (audio-language)

with every placeholder already expanded to its item's token count in the prompt ids
(`data/multimodal.py` tokenize + expand). The filler rows `start` adds get empty media (mask
0, zeros) and the prompt prefill runs `prefill_media`, a jitted entry of its own that fuses
the media into the prompt's embeddings (`models.media.bind_media`); everything after the
prompt is text. The text-only prefill is a separate executable, untouched by media calls.
A new media shape (k, image size, frames) compiles `prefill_media` once more. The placeholder
counts are not checked here (under jit a mismatch cannot raise): callers build the ids with
`data.multimodal.expand`, or check with `models.multimodal.check_media_placement`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array
from jax.sharding import Mesh, NamedSharding

from wakea_jax.data.chat import chat_stop_ids
from wakea_jax.data.tokenizer import Tokenizer, chat_pad_id
from wakea_jax.models import decode_layout
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.layers import KVCache
from wakea_jax.models.media import bind_media
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.parallel import multihost

STOP_NONE, STOP_ID = 0, 1  # device-side stop codes; stop strings are found on the host

# A host-side stop, checked between decode chunks on a row's decoded text: a string (the row
# stops right after its first occurrence) or a predicate on the text (the row stops at the
# shortest token prefix whose text satisfies it; it must stay true once true, as containing
# a string does: a step that is complete, e.g. rl/srl.py's `step_complete`).
StopRule = str | Callable[[str], bool]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Everything the decode loop carries. Token columns are decode steps."""
  cache: KVCache
  logits: Array            # [b, vocab] float32: the distribution of each row's next token
  tokens: Array            # [b, steps] int32, pad_id after a row is done
  logprobs: Array          # [b, steps] float32, log p under the unmodified distribution
  processed_logprobs: Array  # [b, steps] float32, log q under the sampling distribution
  num_generated: Array     # [b] int32
  limit: Array             # [b] int32: max new tokens of each row
  done: Array              # [b] bool: finished or paused rows do not advance their cache
  stop_code: Array         # [b] int32, STOP_NONE or STOP_ID
  step: Array              # [] int32: next column of `tokens`
  keys: Array              # [b, 2] uint32: each row's own key data (see `row_keys`)
  # Per-row sampling settings (`Sampler.per_row`; None otherwise): temperature (0: greedy)
  # and top-p of each row, set by `start` / `refill`.
  temperature: Array | None = None   # [b] float32
  top_p: Array | None = None         # [b] float32

  def replace(self, **changes: Any) -> DecodeState:
    """Returns a copy with the given fields replaced (the state is frozen)."""
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Per-row results of `Sampler.generate`, each list indexed by prompt.

  `logprobs` and `processed_logprobs` are float32 arrays of one entry per generated token (see
  the module docstring); `lengths` counts the generated tokens.
  """

  tokens: list[list[int]]             # generated tokens per row (stop token included)
  logprobs: list[np.ndarray]          # float32 per token, log p under temperature-1 logits
  processed_logprobs: list[np.ndarray]
  lengths: list[int]
  stop_reason: list[str]              # "stop_id", "stop_string" or "length"


def round_pow2(n: int, minimum: int) -> int:
  """The power of two at or above `n`, at least `minimum`: the widths prompts, steps and
  tool turns are padded to, so that few shapes compile."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _row_mask(rows: Array, x: Array) -> Array:
  """rows [b] broadcast against a cache window [b, k, t, h] or stacked [layers, b, k, t, h]."""
  return rows[:, None, None, None] if x.ndim == 4 else rows[None, :, None, None, None]


def _cache_window(x: Array, start: Array, width: int) -> Array:
  """Slots [start[b], start[b] + width) of every row of a cache leaf (see KVCache)."""
  take = jax.vmap(lambda c, i: jax.lax.dynamic_slice_in_dim(c, i, width, axis=1))
  return take(x, start) if x.ndim == 4 else jax.vmap(take, (0, None))(x, start)


def _put_window(x: Array, window: Array, start: Array) -> Array:
  """Writes `_cache_window`'s window back at the same slots."""
  put = jax.vmap(lambda c, w, i: jax.lax.dynamic_update_slice_in_dim(c, w, i, axis=1))
  return put(x, window, start) if x.ndim == 4 else jax.vmap(put, (0, 0, None))(x, window, start)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A compiled-once sampler for one model graph; params are passed to each call.

  Hashable (the static argument of its jitted methods). `temperature`, `top_k` and `top_p`
  shape the sampling distribution; `stop_ids` end a row on device, stop strings on the host.
  `vocab_limit` (0: the model's vocab_size) is the tokenizer's vocab_size: ids at or above it
  are never produced (see the module docstring).
  """

  graphdef: nnx.GraphDef
  config: ModelConfig
  temperature: float = 1.0          # 0 means greedy
  top_k: int = 0                    # 0 disables
  top_p: float = 1.0                # 1 disables
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  chunk_steps: int = 16             # decode steps per jitted call when stop strings are used
  min_prompt_bucket: int = 16
  vocab_limit: int = 0              # ids >= this are masked; 0: all of config.vocab_size
  # With a mesh, prefill and decode run on it (see "Sharding" in the module docstring).
  mesh: Mesh | None = None
  rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
  # Each row carries its own temperature and top_p (DecodeState.temperature / top_p, set by
  # `refill`): the serving engine's requests each bring theirs. The fields above are then
  # the defaults `start` gives every row; top_k is not available per row.
  per_row: bool = False
  # How the decode loop lays out the weights it streams every step: "fused" rewrites the
  # merged model's layers with `decode_layout.pack_for_decode` (one q/k/v dot and one
  # gate/up dot a layer; 4% off a bench56m decode step on a 2-core AMD EPYC) before the loop,
  # "packed" also makes the layers' kernels output-major (faster on one AMD EPYC host,
  # slower on another), "head" only makes a float32 LM head vocabulary-major (7-10% off on
  # an AMX Intel Xeon, where "packed" was slower than "stored"), "stored" keeps the params'
  # own layout, "auto"
  # picks by CPU vendor on the CPU backend without a mesh (`decode_layout.choose_layout`)
  # and keeps the layout elsewhere. A `decode` call packs inside its program; runs of many
  # calls pack once with `with_packed_weights`.
  weight_layout: str = "auto"

  def __post_init__(self) -> None:
    object.__setattr__(self, "rules", mesh_lib.normalize_rules(self.rules))
    # A vision- or audio-language config: the cache and the vocabulary are its decoder's.
    object.__setattr__(self, "config", text_config(self.config))
    if self.mesh is None and jax.process_count() > 1:
      raise ValueError("a Sampler on several processes needs the run's mesh (Sampler(mesh=...))")
    if not 0 <= self.vocab_limit <= self.config.vocab_size:
      raise ValueError(f"vocab_limit must be in [0, vocab_size={self.config.vocab_size}] "
                       f"(0: all), got {self.vocab_limit}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0 or self.top_k > self.valid_vocab:
      raise ValueError(f"top_k must be in [0, {self.valid_vocab}] (the valid vocabulary), "
                       f"got {self.top_k}")
    if self.per_row and self.top_k:
      raise ValueError("a per_row Sampler takes temperature and top_p per row; top_k must be 0")
    if self.chunk_steps < 1:
      raise ValueError(f"chunk_steps must be >= 1, got {self.chunk_steps}")
    decode_layout.check_layout(self.weight_layout)

  @property
  def layout(self) -> str:
    """The layout the decode loop runs on: "packed", "fused", "head" or "stored" ("auto" resolved
    by `decode_layout.choose_layout`)."""
    return decode_layout.choose_layout(self.weight_layout, backend=jax.default_backend(),
                                       mesh=self.mesh is not None)

  @property
  def _packing(self) -> dict[str, bool]:
    """`decode_layout.pack_for_decode`'s arguments for this sampler; {}: no packing."""
    return decode_layout.PACK_ARGS[self.layout]

  @property
  def packs_weights(self) -> bool:
    """Whether the decode loop runs on a `decode_layout.pack_for_decode` layout."""
    return bool(self._packing)

  def with_packed_weights(self, params: nnx.State) -> tuple[Sampler, nnx.State]:
    """(sampler, params) for a run of many decode calls on the same params: the params in
    the packed layout once (eagerly, a copy of the rewritten kernels) and a sampler whose
    graphdef is the packed model's and which does not pack again. `generate`, the tool loop,
    continuous batching and the serving engine call it; `decode` alone packs inside each
    call, which a chunked run would pay per chunk. Itself when it does not pack weights."""
    if not self.packs_weights:
      return self, params
    model = nnx.merge(self.graphdef, params)
    if not decode_layout.pack_for_decode(model, **self._packing):
      return self, params
    graphdef, packed = nnx.split(model)
    return dataclasses.replace(self, graphdef=graphdef, weight_layout="stored"), packed

  @property
  def valid_vocab(self) -> int:
    """The number of ids that can be sampled: `vocab_limit`, or the model's vocab_size."""
    return self.vocab_limit or self.config.vocab_size

  # ---------------------------------------------------------------------------------------
  # Sharding
  # ---------------------------------------------------------------------------------------

  def _rules(self) -> contextlib.AbstractContextManager:
    """At trace time: the model's `constrain` calls annotate activations for the mesh."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return mesh_lib.logical_rules(self.mesh, self.rules)

  def batch_sharding(self) -> NamedSharding | None:
    """Where host rows go: the batch over the mesh's data and fsdp axes."""
    return None if self.mesh is None else mesh_lib.batch_sharding(self.mesh, self.rules)

  def batch_multiple(self) -> int:
    """This process's row count must be a multiple of this (its batch shards)."""
    sharding = self.batch_sharding()
    return 1 if sharding is None else multihost.local_batch_blocks(sharding)

  def to_device(self, x: Any) -> Array:
    """Process-local host rows [rows, ...] -> a device array (global and batch-split on a
    mesh)."""
    sharding = self.batch_sharding()
    return jnp.asarray(x) if sharding is None else multihost.to_global(np.asarray(x), sharding)

  @staticmethod
  def _constrain_cache(cache: KVCache) -> KVCache:
    """The KV cache laid out like the activations: batch over data/fsdp, KV heads over
    tensor (a leading layer axis, if the layers are stacked, replicated). Leaves are
    head-major [(layers,) batch, kv_heads, capacity, head_dim] (see KVCache)."""
    def one(x: Array) -> Array:
      axes = ("act_batch", "act_heads", None, None)
      return mesh_lib.constrain(x, (None,) * (x.ndim - 4) + axes)

    return dataclasses.replace(cache, keys=jax.tree.map(one, cache.keys),
                               values=jax.tree.map(one, cache.values),
                               end_index=mesh_lib.constrain(cache.end_index, ("act_batch",)))

  def _constrain_state(self, s: DecodeState) -> DecodeState:
    rows = lambda x: mesh_lib.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    return s.replace(
        cache=self._constrain_cache(s.cache),
        logits=mesh_lib.constrain(s.logits, ("act_batch", "act_vocab")),
        tokens=rows(s.tokens), logprobs=rows(s.logprobs),
        processed_logprobs=rows(s.processed_logprobs), num_generated=rows(s.num_generated),
        limit=rows(s.limit), done=rows(s.done), stop_code=rows(s.stop_code))

  # ---------------------------------------------------------------------------------------
  # Jitted pieces
  # ---------------------------------------------------------------------------------------

  @functools.partial(jax.jit, static_argnums=(0, 1, 2))
  def empty_cache(self, batch: int, capacity: int) -> KVCache:
    """A zero cache for `batch` (global) rows, created already laid out on the mesh."""
    with self._rules():
      return self._constrain_cache(KVCache.create(self.config, batch, capacity))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def prefill(self, params: nnx.State, cache: KVCache, tokens: Array, mask: Array
              ) -> tuple[KVCache, Array]:
    """Appends tokens [b, t] (mask [b, t], right-padded) -> (cache, last logits [b, vocab]).

    Every row's `end_index + t` must stay <= capacity, masked rows included (their writes
    land in stale slots, but an out-of-range write would be clamped onto valid ones).
    """
    return self._prefill(params, cache, tokens, mask)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def prefill_media(self, params: nnx.State, cache: KVCache, tokens: Array, mask: Array,
                    media: dict[str, Array]) -> tuple[KVCache, Array]:
    """`prefill` of prompts holding media placeholders: `media` (per-row layout, rows aligned
    with `tokens`; see the module docstring) is fused into the prompts' embeddings."""
    return self._prefill(params, cache, tokens, mask, media)

  def _prefill(self, params: nnx.State, cache: KVCache, tokens: Array, mask: Array,
               media: Mapping[str, Array] | None = None) -> tuple[KVCache, Array]:
    # A multimodal model bound to its media (none: the text path) has the text decoder's
    # interface, `head_matrix` included; a text-only graphdef given media: a ValueError
    # naming the keys.
    model = bind_media(nnx.merge(self.graphdef, params), media or {})
    with self._rules():
      out = model.forward(tokens, attention_mask=mask, cache=self._constrain_cache(cache))
      last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
      hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]   # [b, e]
      # The head on each row's last position only: the forward's logits for every prompt
      # position ([b, t, vocab]) go unused and are not computed (bench56m, 8 x 128 tokens:
      # a fifth of the prefill's flops and 131 MB of float32 logits).
      head, vocab_major = model.head_matrix()
      last_logits = jnp.einsum("be,ve->bv" if vocab_major else "be,ev->bv", hidden, head,
                               preferred_element_type=jnp.float32)
      return (self._constrain_cache(out.cache),
              mesh_lib.constrain(last_logits, ("act_batch", "act_vocab")))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def decode(self, params: nnx.State, state: DecodeState, num_steps: Array) -> DecodeState:
    """Runs up to `num_steps` steps, stopping early once every row is done."""
    with self._rules():
      return self._decode(params, self._constrain_state(state), num_steps)

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def decode_until_free(self, params: nnx.State, state: DecodeState, num_steps: Array
                        ) -> DecodeState:
    """Like `decode`, but also returns as soon as a row finishes (so that continuous
    batching can give its slot the next request)."""
    with self._rules():
      return self._decode(params, self._constrain_state(state), num_steps, until_free=True)

  def _decode(self, params: nnx.State, state: DecodeState, num_steps: Array, *,
              until_free: bool = False) -> DecodeState:
    model = nnx.merge(self.graphdef, params)
    if self.packs_weights:
      decode_layout.pack_for_decode(model, **self._packing)   # once per call, outside the loop
    stop_ids = jnp.asarray(self.stop_ids or (-1,), jnp.int32)
    end_step = jnp.minimum(state.step + num_steps, state.tokens.shape[1])
    done_at_entry = jnp.sum(state.done)

    def cond(s: DecodeState) -> Array:
      going = (s.step < end_step) & ~jnp.all(s.done)
      return going & (jnp.sum(s.done) == done_at_entry) if until_free else going

    def body(s: DecodeState) -> DecodeState:
      # A row's n-th token is drawn with fold_in(its key, n): what a request samples does
      # not depend on its row, its batch or when it started (continuous batching).
      keys = jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(
          s.keys, s.num_generated)
      # Only the tokenizer's ids: a static slice, so sampling (noise for every id), the
      # top-k and the log-softmax never touch the padded rows (Qwen: 151,665 of 151,936;
      # a from-scratch RL model: 1,024 of 32,000 made sampling 17x cheaper per step).
      logits = s.logits[:, :self.valid_vocab]
      token, processed = (self._sample_rows(logits, keys, s.temperature, s.top_p)
                          if self.per_row else self._sample(logits, keys))
      active = ~s.done
      logp = jax.nn.log_softmax(logits, axis=-1)
      logp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
      token = jnp.where(active, token, self.pad_id)
      column = lambda buf, new: jax.lax.dynamic_update_slice(
          buf, new[:, None].astype(buf.dtype), (0, s.step))
      num_generated = s.num_generated + active.astype(jnp.int32)
      hit_stop = active & jnp.isin(token, stop_ids) if self.stop_ids else jnp.zeros_like(active)
      done = s.done | hit_stop | (num_generated >= s.limit)
      # Done rows feed padding with mask 0: their end index does not move.
      logits, cache = model(token[:, None], attention_mask=active[:, None].astype(jnp.int32),
                            cache=s.cache)
      return self._constrain_state(s.replace(
          cache=cache, logits=jnp.where(active[:, None], logits[:, 0], s.logits),
          tokens=column(s.tokens, token),
          logprobs=column(s.logprobs, jnp.where(active, logp, 0.0)),
          processed_logprobs=column(s.processed_logprobs, jnp.where(active, processed, 0.0)),
          num_generated=num_generated, done=done,
          stop_code=jnp.where(hit_stop, STOP_ID, s.stop_code), step=s.step + 1))

    return jax.lax.while_loop(cond, body, state)

  def _sample_rows(self, logits: Array, keys: Array, temperature: Array, top_p: Array
                   ) -> tuple[Array, Array]:
    """`_sample` with each row's own temperature [b] (0: greedy) and top_p [b]: a row draws
    what a static Sampler with its settings draws from the same key. Rows are drawn on
    logits / T by `_sample` itself at temperature 1 or, when some row asks for a nucleus,
    by `nucleus_sample` with each row's p (`_sample`'s top-p path), which draws a row at
    p = 1 exactly as `_sample` does (`inverse_cdf_sample` from the row's key)."""
    greedy = temperature <= 0.0
    values = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    plain = dataclasses.replace(self, temperature=1.0, top_k=0, top_p=1.0, per_row=False)
    token, processed = jax.lax.cond(jnp.any(top_p < 1.0),
                                    lambda _: nucleus_sample(values, keys, top_p),
                                    lambda _: plain._sample(values, keys), None)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), token)
    return token, jnp.where(greedy, 0.0, processed)

  def _sample(self, logits: Array, keys: Array) -> tuple[Array, Array]:
    """-> (token [b], log q(token) under the processed distribution [b]); one key per row."""
    if self.temperature == 0.0:
      return first_argmax(logits), jnp.zeros(logits.shape[:1])
    if self.top_k:
      values, indices = jax.lax.top_k(logits, self.top_k)     # sorted descending
    elif self.top_p < 1.0:
      return nucleus_sample(logits / self.temperature, keys, self.top_p)
    else:
      return inverse_cdf_sample(logits / self.temperature, keys)
    values = values / self.temperature
    if self.top_p < 1.0:
      # Nucleus (arXiv 1904.09751 §3.1): keep the smallest prefix of the sorted tokens whose
      # mass reaches p, i.e. drop a token when the mass strictly before it already does.
      probs = jax.nn.softmax(values, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      values = jnp.where(mass_before < self.top_p, values, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, values)
    processed = jnp.take_along_axis(jax.nn.log_softmax(values, axis=-1), choice[:, None],
                                    axis=1)[:, 0]
    token = jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0]
    return token.astype(jnp.int32), processed

  def compile_count(self) -> int:
    """Executables held by the jitted prefill (text and media) and decode (all Sampler
    instances)."""
    return (Sampler.prefill._cache_size() + Sampler.prefill_media._cache_size()
            + Sampler.decode._cache_size())

  # ---------------------------------------------------------------------------------------
  # Host API
  # ---------------------------------------------------------------------------------------

  def apply_stop_strings(self, state: DecodeState, stop_strings: Sequence[StopRule],
                         tokenizer: Any, *, skip: np.ndarray | None = None,
                         cut: dict[int, int] | None = None
                         ) -> tuple[DecodeState, dict[int, int]]:
    """Host check between decode chunks: stops rows whose text holds a stop (`StopRule`).

    Such a row keeps the shortest token prefix whose text holds it; it is marked done and
    its cache end index is rewound by the tokens dropped (their slots become stale). Rows in
    `cut` (already cut) or flagged in `skip` are not looked at. Returns (state, cut) where
    `cut` maps row -> kept number of generated tokens. Rows are this process's; every
    process must call this together (the cut is one collective step when any row is cut).
    """
    cut = dict(cut or {})
    tokens, counts = multihost.to_host(state.tokens), multihost.to_host(state.num_generated)
    keep = np.full(tokens.shape[0], -1, np.int32)
    for row in range(tokens.shape[0]):
      if row in cut or (skip is not None and skip[row]):
        continue
      kept = stop_string_cut(tokenizer, tokens[row, :counts[row]].tolist(), stop_strings)
      if kept is not None:
        keep[row] = cut[row] = kept
    if multihost.all_true(not (keep >= 0).any()):
      return state, cut
    return self._cut(state, self.to_device(keep)), cut

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
  def _cut(self, state: DecodeState, keep: Array) -> DecodeState:
    """Rows with keep >= 0 keep their first `keep` tokens, are done, and rewind their cache."""
    with self._rules():
      hit = keep >= 0
      drop = hit[:, None] & (jnp.arange(state.tokens.shape[1])[None, :] >= keep[:, None])
      rewind = jnp.where(hit, state.cache.end_index + keep - state.num_generated,
                         state.cache.end_index)
      return self._constrain_state(state.replace(
          done=state.done | hit, num_generated=jnp.where(hit, keep, state.num_generated),
          tokens=jnp.where(drop, self.pad_id, state.tokens),
          cache=dataclasses.replace(state.cache, end_index=rewind)))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def inject(self, params: nnx.State, state: DecodeState, tokens: Array, mask: Array
             ) -> DecodeState:
    """Appends tokens [b, t] (mask [b, t]) to the rows that have any, and resumes them: their
    next-token logits become those after the injected tokens and they are no longer done
    (tool results, mid-generation). Rows without tokens are untouched: the prefill writes
    (masked) padding into them at their end index, and where end index + t passes the
    capacity that write is clamped back onto valid slots, so their window is put back."""
    resumed = jnp.any(mask > 0, axis=1)
    width = tokens.shape[1]
    start = jnp.clip(state.cache.end_index, 0, state.cache.capacity - width)   # as clamped
    kept = jax.tree.map(lambda x: _cache_window(x, start, width),
                        (state.cache.keys, state.cache.values))
    cache, logits = self._prefill(params, state.cache, tokens, mask)
    keys, values = jax.tree.map(
        lambda x, old: _put_window(x, jnp.where(_row_mask(resumed, x),
                                                _cache_window(x, start, width), old), start),
        (cache.keys, cache.values), kept)
    cache = dataclasses.replace(cache, keys=keys, values=values)
    with self._rules():
      return self._constrain_state(state.replace(
          cache=cache, logits=jnp.where(resumed[:, None], logits, state.logits),
          done=state.done & ~resumed, stop_code=jnp.where(resumed, STOP_NONE, state.stop_code)))

  @functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
  def refill(self, params: nnx.State, state: DecodeState, rows: Array, tokens: Array,
             mask: Array, limits: Array, keys: Array, temperature: Array | None = None,
             top_p: Array | None = None, generated: Array | None = None,
             media: dict[str, Array] | None = None) -> DecodeState:
    """Starts new requests in rows `rows` [k] of a running state: each such row's cache is
    emptied and its prompt tokens [k, w] (mask [k, w]) prefilled, its counters reset, and it
    decodes on with `limits` [k] and key data `keys` [k, 2]. Only those k rows are computed
    (gathered from the cache and scattered back); rows >= the batch size are padding and
    change nothing. The other rows keep decoding state untouched. `generated` [k] starts
    rows at a generated count other than 0 (a request resumed after a pause goes on
    counting, and keying, its tokens); `temperature` / `top_p` [k] are a per_row sampler's
    settings. `media`: the k rows' media in the per-row layout, prefilled with their
    placeholders (a media model; text-only refills compile without it)."""
    batch = state.done.shape[0]
    safe = jnp.minimum(rows, batch - 1)

    def take(x: Array) -> Array:     # the k rows of a [b, ...] or stacked [layers, b, ...] leaf
      return x[safe] if x.ndim == 4 else x[:, safe]

    def put(x: Array, new: Array) -> Array:
      return (x.at[rows].set(new, mode="drop") if x.ndim == 4
              else x.at[:, rows].set(new, mode="drop"))

    with self._rules():
      cache = state.cache
      sub = dataclasses.replace(cache, keys=jax.tree.map(take, cache.keys),
                                values=jax.tree.map(take, cache.values),
                                end_index=jnp.zeros(rows.shape, jnp.int32))
      sub, logits = self._prefill(params, sub, tokens, mask, media)
      cache = dataclasses.replace(
          cache, keys=jax.tree.map(put, cache.keys, sub.keys),
          values=jax.tree.map(put, cache.values, sub.values),
          end_index=cache.end_index.at[rows].set(sub.end_index, mode="drop"))
      at = lambda x, new: x.at[rows].set(new, mode="drop")
      return self._constrain_state(state.replace(
          cache=cache, logits=at(state.logits, logits),
          tokens=at(state.tokens, jnp.full((rows.shape[0], state.tokens.shape[1]),
                                           self.pad_id, state.tokens.dtype)),
          num_generated=at(state.num_generated, 0 if generated is None else generated),
          limit=at(state.limit, limits),
          done=at(state.done, False), stop_code=at(state.stop_code, STOP_NONE),
          keys=at(state.keys, keys),
          temperature=(state.temperature if temperature is None
                       else at(state.temperature, temperature)),
          top_p=state.top_p if top_p is None else at(state.top_p, top_p)))

  def idle_state(self, rows: int, steps: int, capacity: int) -> DecodeState:
    """A state of `rows` empty, finished rows (slots for `refill`), single process."""
    return DecodeState(
        cache=self.empty_cache(rows, capacity),
        logits=jnp.zeros((rows, self.config.vocab_size), jnp.float32),
        tokens=jnp.full((rows, steps), self.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, steps)), processed_logprobs=jnp.zeros((rows, steps)),
        num_generated=jnp.zeros((rows,), jnp.int32), limit=jnp.ones((rows,), jnp.int32),
        done=jnp.ones((rows,), bool), stop_code=jnp.zeros((rows,), jnp.int32),
        step=jnp.zeros((), jnp.int32), keys=jnp.zeros((rows, 2), jnp.uint32),
        **self._row_settings(rows))

  def _row_settings(self, rows: int, to_device: Any = jnp.asarray) -> dict[str, Any]:
    """A per_row sampler's rows all at its own temperature and top_p (else nothing)."""
    if not self.per_row:
      return {}
    return {"temperature": to_device(np.full((rows,), self.temperature, np.float32)),
            "top_p": to_device(np.full((rows,), self.top_p, np.float32))}

  def buckets(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(prompt width, decode steps, cache capacity) for a batch."""
    width = round_pow2(prompt_len, self.min_prompt_bucket)
    steps = round_pow2(max_new_tokens, self.min_prompt_bucket)
    quarter = max(64, steps // 4)     # see "Bucketing" in the module docstring
    return width, steps, width + min(steps, -(-max_new_tokens // quarter) * quarter)

  def start(self, params: nnx.State, prompts: Sequence[Sequence[int]], *,
            max_new_tokens: int | Sequence[int], rng: Array, reserve: int = 0,
            media: Mapping[str, Any] | None = None) -> DecodeState:
    """Prefills right-padded prompts into a fresh cache -> the initial decode state.

    `reserve` extra cache slots (and decode columns) are kept for tokens injected later
    (tool turns). On a mesh the rows are this process's; they are padded with finished
    one-token rows up to a count that every process shares and the mesh's batch shards
    divide, so the state can hold more rows than `prompts` (the extra ones come last and
    never generate). `media`: the prompts' media in the per-row layout, first axis
    len(prompts) (see "Media prompts" in the module docstring); filler rows get none.
    """
    if any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if not prompts and self.mesh is None:
      raise ValueError("no prompts to sample from")
    real = len(prompts)
    multiple = self.batch_multiple()
    batch = -(-max(multihost.global_max(real), 1) // multiple) * multiple
    limits = np.ones((batch,), np.int32)
    limits[:real] = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (real,))
    if real and limits[:real].min() < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = multihost.global_max(max(map(len, prompts), default=1))
    most_new = multihost.global_max(int(limits.max()))
    width, steps, capacity = self.buckets(longest, most_new + reserve)
    if capacity > self.config.max_seq_len:
      raise ValueError(f"prompt ({longest}) + max_new_tokens ({most_new}) "
                       + (f"+ reserve ({reserve}) " if reserve else "")
                       + f"needs a cache of {capacity} > max_seq_len {self.config.max_seq_len}")
    tokens = np.full((batch, width), self.pad_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    mask[real:, 0] = 1           # filler rows: one pad token, done from the start
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      mask[i, :len(p)] = 1
    sharding = self.batch_sharding()
    global_batch = (batch if sharding is None
                    else batch // multiple * multihost.batch_shards(sharding))
    cache = self.empty_cache(global_batch, capacity)
    if media:
      rows = pad_media_rows(media, real, batch)
      cache, logits = self.prefill_media(params, cache, self.to_device(tokens),
                                         self.to_device(mask),
                                         {k: self.to_device(v) for k, v in rows.items()})
    else:
      cache, logits = self.prefill(params, cache, self.to_device(tokens), self.to_device(mask))
    filler = np.arange(batch) >= real
    offset = jax.process_index() * batch   # this process's rows are global rows offset..
    return DecodeState(
        cache=cache, logits=logits,
        tokens=self.to_device(np.full((batch, steps), self.pad_id, np.int32)),
        logprobs=self.to_device(np.zeros((batch, steps), np.float32)),
        processed_logprobs=self.to_device(np.zeros((batch, steps), np.float32)),
        num_generated=self.to_device(np.zeros((batch,), np.int32)),
        limit=self.to_device(limits), done=self.to_device(filler),
        stop_code=self.to_device(np.zeros((batch,), np.int32)),
        step=jnp.zeros((), jnp.int32), keys=self.to_device(row_keys(rng, offset, batch)),
        **self._row_settings(batch, self.to_device))

  def generate(self, params: nnx.State, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int | Sequence[int], rng: Array,
               stop_strings: Sequence[StopRule] = (), tokenizer: Any = None,
               media: Mapping[str, Any] | None = None) -> SampleOutput:
    """Samples completions of token-id prompts (any lengths; padded and bucketed here).

    On a mesh over several processes each process passes its own prompts and gets their
    completions; every process must call it together. `media` as in `start`.
    """
    if stop_strings and tokenizer is None:
      raise ValueError("stop_strings need a tokenizer to decode with")
    real = len(prompts)
    if stop_strings:   # several decode calls: pack once, not per chunk
      self, params = self.with_packed_weights(params)   # noqa: PLW0642
    state = self.start(params, prompts, max_new_tokens=max_new_tokens, rng=rng, media=media)
    steps = state.tokens.shape[1]
    # Without stop strings one call runs to the end; with them the host looks between chunks.
    chunk = jnp.asarray(self.chunk_steps if stop_strings else steps, jnp.int32)
    cut: dict[int, int] = {}   # row -> kept length, for rows stopped by a stop string
    settled = multihost.to_host(state.done)   # rows already done at a previous check
    while True:
      state = self.decode(params, state, chunk)
      if stop_strings:
        state, cut = self.apply_stop_strings(state, stop_strings, tokenizer, skip=settled,
                                             cut=cut)
      settled = multihost.to_host(state.done)
      if multihost.all_true(settled.all()) or int(state.step) >= steps:
        break
    host = multihost.to_host({"tokens": state.tokens, "counts": state.num_generated,
                              "logprobs": state.logprobs, "processed": state.processed_logprobs,
                              "codes": state.stop_code})
    tokens, counts, codes = host["tokens"], host["counts"], host["codes"]
    reasons = ["stop_string" if r in cut else "stop_id" if codes[r] == STOP_ID else "length"
               for r in range(real)]
    return SampleOutput(
        tokens=[tokens[r, :counts[r]].tolist() for r in range(real)],
        logprobs=[host["logprobs"][r, :counts[r]] for r in range(real)],
        processed_logprobs=[host["processed"][r, :counts[r]] for r in range(real)],
        lengths=[int(c) for c in counts[:real]], stop_reason=reasons)


def text_config(config: Any) -> ModelConfig:
  """The decoder's ModelConfig of a model config: a `VisionLanguageConfig` /
  `AudioLanguageConfig`'s `.text`, a ModelConfig itself."""
  return config if isinstance(config, ModelConfig) else config.text


def pad_media_rows(media: Mapping[str, Any], rows: int, batch: int) -> dict[str, np.ndarray]:
  """Per-row media arrays [rows, ...] -> [batch, ...] NumPy, the extra rows empty (zeros:
  mask 0, so they hold no media). Raises ValueError naming the key whose first axis is not
  `rows` (one row per prompt)."""
  out = {}
  for key, value in media.items():
    array = np.asarray(value)
    if array.ndim < 2 or array.shape[0] != rows:
      raise ValueError(f"media[{key!r}] has shape {array.shape}; the per-row layout needs "
                       f"one row per prompt first ({rows} prompts), then the items")
    out[key] = np.concatenate([array, np.zeros((batch - rows,) + array.shape[1:], array.dtype)])
  return out


def first_argmax(x: Array) -> Array:
  """`jnp.argmax(x, axis=-1)` as int32 (the first index of each row's maximum) for finite x.

  Why not argmax: XLA:CPU lowers it to a variadic (value, index) reduce that runs ~5x slower
  than these two plain reductions (bench56m greedy decode: 1.1 vs 0.2 ms a step over
  [8, 32000] logits). A row holding NaN gives the last index instead of the NaN's.
  """
  n = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
  return jnp.minimum(first, n - 1)


def inverse_cdf_sample(values: Array, keys: Array, block: int = 256) -> tuple[Array, Array]:
  """Samples softmax(values) [b, n] by inversion, one uniform per row: -> (token [b] int32,
  log softmax(values)[token] [b]); `keys` [b] are the rows' own PRNG keys.

  Why: `jax.random.categorical` draws Gumbel noise for every id (threefry over the whole
  vocabulary: 5.4 ms a step on bench56m's [8, 32000] logits, over half a decode step); this
  draws one uniform u per row and returns the first id whose cumulative mass exceeds
  u * total, in 0.26 ms. The cumulative sum is two-level (per-block sums, their cumsum, then
  the cumsum of the one block holding u * total) because a flat cumsum over the vocabulary
  is itself slow on CPU. Ids of zero probability (-inf values) are never returned: where
  rounding puts u * total past the last boundary, the last id of positive mass is taken.
  """
  b, n = values.shape
  pad = -n % block
  if pad:
    values = jnp.pad(values, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  top = jnp.max(values, axis=-1)
  weights = jnp.exp(values - top[:, None]).reshape(b, -1, block)      # unnormalised probs
  blocks = weights.shape[1]
  cumulative = jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1)           # [b, blocks]
  total = cumulative[:, -1]
  u = jax.vmap(jax.random.uniform)(keys)
  target = u * total
  # The block holding the target: the first whose cumulative mass exceeds it, or the last
  # block of positive mass where rounding put the target past the end.
  block_ids = jnp.arange(blocks, dtype=jnp.int32)
  last_block = jnp.max(jnp.where(cumulative > 0, block_ids, 0), axis=-1)
  j = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1, dtype=jnp.int32), last_block)
  before = jnp.where(j > 0, jnp.take_along_axis(cumulative, jnp.maximum(j - 1, 0)[:, None],
                                                axis=1)[:, 0], 0.0)
  chunk = jnp.take_along_axis(weights, j[:, None, None], axis=1)[:, 0]  # [b, block]
  ids = jnp.arange(block, dtype=jnp.int32)
  last_id = jnp.max(jnp.where(chunk > 0, ids, 0), axis=-1)
  i = jnp.minimum(jnp.sum(jnp.cumsum(chunk, axis=-1) <= (target - before)[:, None], axis=-1,
                          dtype=jnp.int32), last_id)
  token = j * block + i
  chosen = jnp.take_along_axis(values, token[:, None], axis=1)[:, 0]
  return token, chosen - top - jnp.log(total)


NUCLEUS_CANDIDATES = 256


def nucleus_sample(values: Array, keys: Array, top_p: Array | float,
                   candidates: int = NUCLEUS_CANDIDATES) -> tuple[Array, Array]:
  """Nucleus sampling (arXiv 1904.09751 §3.1) of softmax(values) [b, n]: keep the smallest
  prefix of the tokens sorted by value (ties: the lower id first) whose mass reaches p, i.e.
  drop a token when the mass strictly before it already does, and draw from what is kept by
  `inverse_cdf_sample` (one uniform per row from the row's key). `top_p` is a float or [b]
  in (0, 1]; a row at 1 draws from its whole distribution. -> (token [b] int32, log q(token)
  under the truncated distribution [b]).

  Why not sort: an argsort of the vocabulary is 58 ms for bench56m's [8, 32000] logits on a
  2-core AMD EPYC (300 ms at a 151,936-token vocabulary), four times the rest of a decode
  step. So each row takes its `candidates` highest values first (`lax.top_k`, 1.4 ms there;
  its order is the stable sort's), whose mass against the full normaliser says whether the
  nucleus ends among them; it does whenever they hold at least p. Only when some row's do
  not (a flat distribution) is the whole vocabulary searched (`_nucleus_mask`, a bisection
  instead of a sort: 2.6 ms there, 24 ms at 151,936), and then only those rows take the
  result. The kept set, so each row's draw, depends on its own values alone."""
  values = values.astype(jnp.float32)   # _nucleus_mask orders float32 bit patterns
  b, n = values.shape
  k = min(candidates, n)
  p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))[:, None]
  lse = jax.nn.logsumexp(values, axis=-1, keepdims=True)

  def truncated_draw(ordered: Array, ids: Array) -> tuple[Array, Array, Array]:
    probs = jnp.exp(ordered - lse)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < p, ordered, -jnp.inf)
    choice, logq = inverse_cdf_sample(kept, keys)
    token = jnp.take_along_axis(ids, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
    return token, logq, jnp.sum(probs, axis=-1) >= p[:, 0]

  top_values, top_ids = jax.lax.top_k(values, k)
  token, logq, enough = truncated_draw(top_values, top_ids)
  plain = p[:, 0] >= 1.0    # no truncation: the whole distribution, drawn as such below
  if k < n:
    enough = enough | plain

    def whole_vocabulary(_: None) -> tuple[Array, Array]:
      kept = jnp.where(_nucleus_mask(values, lse, p), values, -jnp.inf)
      full_token, full_logq = inverse_cdf_sample(kept, keys)
      return jnp.where(enough, token, full_token), jnp.where(enough, logq, full_logq)

    token, logq = jax.lax.cond(jnp.all(enough), lambda _: (token, logq), whole_vocabulary,
                               None)

  def untruncated(_: None) -> tuple[Array, Array]:
    plain_token, plain_logq = inverse_cdf_sample(values, keys)
    return jnp.where(plain, plain_token, token), jnp.where(plain, plain_logq, logq)

  return jax.lax.cond(jnp.any(plain), untruncated, lambda _: (token, logq), None)


def _nucleus_mask(values: Array, lse: Array, p: Array) -> Array:
  """The nucleus of each row of values [b, n] as a mask [b, n], without sorting: the kept
  set is every value above a threshold v* plus the first (by id) of the values equal to it
  (the stable sort's prefix). lse [b, 1] is the rows' log-sum-exp, p [b, 1] in (0, 1).

  v* is the largest value whose tokens at or above it hold at least p: found by bisection
  over float32's order-preserving integer keys (32 passes of a masked sum). Tokens above v*
  hold less than p, so all of them are kept; of the t tokens equal to v* (mass m each), the
  first ceil((p - mass above) / m) are, found by a second bisection over ids, run only when
  some row keeps part of a tie."""
  b, n = values.shape
  probs = jnp.exp(values - lse)
  bits = jax.lax.bitcast_convert_type(values, jnp.int32)
  keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)   # ordered as the floats

  def mass_from(key: Array) -> Array:
    return jnp.sum(jnp.where(keys >= key, probs, 0.0), axis=-1, keepdims=True)

  def narrow(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    lo, hi = bounds   # mass_from(lo) >= p; the answer is in [lo, hi]
    mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)   # ceil((lo + hi) / 2), no int32 overflow
    ok = mass_from(mid) >= p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  star, _ = jax.lax.fori_loop(0, 32, narrow, (jnp.min(keys, axis=-1, keepdims=True),
                                               jnp.max(keys, axis=-1, keepdims=True)))
  above, tied = keys > star, keys == star
  mass_above = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True)
  each = jnp.max(jnp.where(tied, probs, 0.0), axis=-1, keepdims=True)
  count = jnp.sum(tied, axis=-1, keepdims=True)
  # (A tie of zero mass, -inf values, is kept whole: it is never drawn.)
  need = jnp.where(each > 0, jnp.clip(jnp.ceil((p - mass_above) / jnp.maximum(each, 1e-38)),
                                      1, count), count).astype(jnp.int32)
  ids = jnp.arange(n, dtype=jnp.int32)

  def first_of_ties(_: None) -> Array:
    def narrow_id(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
      lo, hi = bounds   # the need-th tied id is in [lo, hi]
      mid = (lo + hi) // 2
      ok = jnp.sum(tied & (ids <= mid), axis=-1, keepdims=True) >= need
      return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, last = jax.lax.fori_loop(0, max(1, (n - 1).bit_length()), narrow_id,
                                (jnp.zeros_like(need), jnp.full_like(need, n - 1)))
    return above | (tied & (ids <= last))

  return jax.lax.cond(jnp.any(need < count), first_of_ties, lambda _: above | tied, None)


def row_keys(rng: Array, start: int, count: int) -> np.ndarray:
  """Key data [count, 2] uint32 of rows (or requests) start..start+count-1:
  fold_in(rng, index). A row's draws depend on its index and nothing else."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):   # a raw uint32 PRNGKey
    rng = jax.random.wrap_key_data(rng)
  indices = jnp.arange(start, start + count, dtype=jnp.uint32)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)
  return np.asarray(jax.random.key_data(keys), np.uint32)


def check_vocab(tokenizer: Tokenizer, model_config: ModelConfig, *,
                model_source: str = "the model") -> int:
  """The tokenizer's vocab_size, checked to fit the model's embedding.

  Every place a model meets a tokenizer calls this (run setup, sampling, evaluation): a
  tokenizer with more ids than the embedding has rows is a ValueError naming both sizes,
  the tokenizer and `model_source` (a path, or a config field). An embedding larger than
  the tokenizer is fine; the extra ids are masked by the sampler (`Sampler.vocab_limit`).
  """
  n, rows = tokenizer.vocab_size, model_config.vocab_size
  if n > rows:
    path = getattr(tokenizer, "path", None)
    name = f"at {path}" if path is not None else repr(tokenizer)
    raise ValueError(f"the tokenizer {name} has {n} ids but {model_source} has "
                     f"{rows} embedding rows (vocab_size {rows}): ids {rows}..{n - 1} would "
                     "have no embedding; use the model's own tokenizer or a model with "
                     f"vocab_size >= {n}")
  return n


def chat_sampler(graphdef: nnx.GraphDef, model_config: ModelConfig, tokenizer: Tokenizer, *,
                 model_source: str = "the model", **settings: Any) -> Sampler:
  """A Sampler for chats of `tokenizer`: `vocab_limit` = its vocab_size (after
  `check_vocab`), stop ids = end of turn and EOS, and its pad id; `settings` are the other
  Sampler fields (temperature, top_k, ...; stop_ids / pad_id override the defaults).
  `graphdef` may be a vision- or audio-language model's, with its config or its text config."""
  model_config = text_config(model_config)
  limit = check_vocab(tokenizer, model_config, model_source=model_source)
  settings.setdefault("stop_ids", chat_stop_ids(tokenizer))
  settings.setdefault("pad_id", chat_pad_id(tokenizer))
  return Sampler(graphdef, model_config, vocab_limit=limit, **settings)


def stop_string_cut(tokenizer: Any, tokens: list[int], stop_strings: Sequence[StopRule]
                     ) -> int | None:
  """Length of the shortest prefix of `tokens` whose text holds a stop (`StopRule`), or None."""
  text = tokenizer.decode(tokens)
  if not _stops(text, stop_strings):
    return None
  lo, hi = 1, len(tokens)   # the text of a prefix only grows, so binary search is exact
  while lo < hi:
    mid = (lo + hi) // 2
    prefix = tokenizer.decode(tokens[:mid])
    if _stops(prefix, stop_strings):
      hi = mid
    else:
      lo = mid + 1
  return lo


def _stops(text: str, rules: Sequence[StopRule]) -> bool:
  return any(rule in text if isinstance(rule, str) else rule(text) for rule in rules)
