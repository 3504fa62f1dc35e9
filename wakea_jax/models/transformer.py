"""Decoder-only language model (Llama / Qwen2 / Qwen3 family) in Flax NNX.

Used functionally: build once, `graphdef, state = nnx.split(model)`, pass `state` through
`jax.jit` and `nnx.merge(graphdef, state)` inside (see `apply`).

Public call: `model(input_ids)` with int32 [batch, seq] returns float32 logits
[batch, seq, vocab]. Keyword arguments:
  inputs_embeds   [batch, seq, embed] in place of `input_ids` (pass `input_ids=None`): the
                  decoder's input vectors, e.g. token embeddings (`embed_tokens`) with media
                  features scattered into placeholder positions (`models/multimodal.py`).
                  Everything else (positions, segments, masks, cache) is as for ids, so fused
                  media tokens take the text path; the text-only path is unchanged.
  positions       int32 [batch, seq]; default arange, restarted per segment when
                  `segment_ids` is given, or continuing from the cache's end index.
  segment_ids     int32 [batch, seq] for packed rows; attention never crosses a segment and
                  segment 0 marks padding (such keys are never attended to).
  attention_mask  [batch, seq], 1 for real tokens and 0 for padding. Without a cache it masks
                  padding keys; with a cache it marks which new tokens are real (prompts are
                  right-padded) and so how far each sequence's end index advances.
  cache           a `KVCache`; the call then returns `(logits, new_cache)`.

With `config.scan_layers`, `self.layers` is one `DecoderLayer` whose every Variable holds all
layers stacked on a leading axis (logical axis "layers"), and the forward runs it under one
`lax.scan`: the layer is traced and compiled once, not once per layer, so compile time stops
growing with depth. Otherwise `self.layers` is an `nnx.List` run by a Python loop. The two
layouts hold the same numbers (`models/stacking.py`: `stack_layers` / `convert_layers` move
between them) and give the same outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.config import ModelConfig
from wakea_jax.models.layers import (
  LOWP_BATCHED_DOT,
  LOWP_DOT,
  DecoderLayer,
  KVCache,
  RMSNorm,
  param,
  take_rows,
)
from wakea_jax.models.stacking import stack_layers
from wakea_jax.parallel import mesh as mesh_lib

_POLICIES = jax.checkpoint_policies
# The 16-bit products (layers.lowp_matmul) are custom VJPs whose dots the dot policies do not
# see: their outputs are saved by name alongside.
_REMAT = {
    "full": None,
    "dots": _POLICIES.save_from_both_policies(
        _POLICIES.dots_with_no_batch_dims_saveable,
        _POLICIES.save_only_these_names(LOWP_DOT)),
    "dots_saveable": _POLICIES.save_from_both_policies(
        _POLICIES.checkpoint_dots, _POLICIES.save_only_these_names(LOWP_DOT, LOWP_BATCHED_DOT)),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecoderOutput:
  """What `Transformer.forward` returns; `cache` is the updated KVCache when one was given."""

  logits: Array                 # [batch, seq, vocab] float32
  hidden: Array                 # [batch, seq, embed] final-normed hidden states
  values: Array | None = None   # [batch, seq] float32, when the config has a value head
  cache: KVCache | None = None


def default_positions(batch: int, length: int, segment_ids: Array | None) -> Array:
  """arange per row, restarted at every segment boundary of a packed row."""
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is None:
    return index
  starts = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - segment_start


def attention_mask_for(length: int, segment_ids: Array | None, attention_mask: Array | None,
                       batch: int) -> Array:
  """Boolean [batch, query, key] mask: causal, within-segment, padding keys removed."""
  index = jnp.arange(length)
  mask = jnp.broadcast_to(index[:, None] >= index[None, :], (batch, length, length))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask & (segment_ids[:, None, :] != 0)
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, :]
  return mask


class Transformer(nnx.Module):
  """Token embedding -> N pre-norm decoder layers -> final RMSNorm -> LM head (+ value head)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    pd = c.weight_dtype
    self.embed = param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"), pd, std=c.init_std)
    layers = [DecoderLayer(c, rngs=rngs) for _ in range(c.num_layers)]
    # Built one by one and stacked, so a scanned model and a looped one of the same seed
    # hold the same weights.
    self.layers = stack_layers(layers) if c.scan_layers else nnx.List(layers)
    self.final_norm = RMSNorm(c.embed_dim, c.norm_eps, param_dtype=pd)
    if not c.tie_embeddings:
      self.lm_head = param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), pd,
                           std=c.init_std)
    if c.value_head:
      self.value_head = param(rngs, (c.embed_dim,), ("embed",), pd, std=c.init_std)
      self.value_bias = param(None, (), (), pd, value=0.0)

  def head_matrix(self) -> tuple[Array, bool]:
    """(the LM head as stored, vocab_major): the embedding [vocab, embed] itself when tied,
    else [embed, vocab]. Chunked scoring contracts against it directly, so a tied head is
    never copied transposed (0.6 GB, and as much again for its gradient, at Qwen3-0.6B)."""
    dt = self.config.compute_dtype
    if self.config.tie_embeddings:
      return self.embed[...].astype(dt), True
    if not isinstance(self.lm_head, nnx.Variable):   # decode_layout's vocabulary-major head
      return self.lm_head.kernel[...].astype(dt), True
    return self.lm_head[...].astype(dt), False

  def __call__(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               attention_mask: Array | None = None, cache: KVCache | None = None
               ) -> Array | tuple[Array, KVCache]:
    """Float32 logits [batch, seq, vocab]; with `cache`, (logits, new_cache). See module docs."""
    out = self.forward(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                       segment_ids=segment_ids, attention_mask=attention_mask, cache=cache)
    return out.logits if cache is None else (out.logits, out.cache)

  def embed_tokens(self, input_ids: Array) -> Array:
    """The token embeddings [batch, seq, embed] in the compute dtype: what `forward` feeds the
    layers for `input_ids`, and what a multimodal model fuses media features into."""
    # The lookup gathers rows of the table with its 'embed' (FSDP) dimension gathered first,
    # as for any FSDP weight: a table still split over fsdp cannot be resharded to the
    # batch-over-fsdp activations without XLA replicating the whole gather output.
    table = mesh_lib.constrain(self.embed[...], ("vocab", None))
    return take_rows(table, input_ids).astype(self.config.compute_dtype)

  def value_from(self, hidden: Array) -> Array:
    """The value head on final hidden states [b, t, e] -> [b, t] float32."""
    return (jnp.einsum("bte,e->bt", hidden.astype(jnp.float32),
                       self.value_head[...].astype(jnp.float32))
            + self.value_bias[...].astype(jnp.float32))

  def forward(self, input_ids: Array | None = None, *, inputs_embeds: Array | None = None,
              positions: Array | None = None, segment_ids: Array | None = None,
              attention_mask: Array | None = None, cache: KVCache | None = None
              ) -> DecoderOutput:
    """Like `__call__` (see the module docstring), but returns the whole `DecoderOutput`.

    Exactly one of `input_ids` [batch, seq] and `inputs_embeds` [batch, seq, embed] is given.
    With a cache, `segment_ids` raise, and each sequence's end index advances by its number of
    real tokens in `attention_mask` (by `seq` without one).
    """
    c = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
      if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
      batch, length = input_ids.shape
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.embed_dim:
        raise ValueError(f"inputs_embeds must be [batch, seq, {c.embed_dim}], got shape "
                         f"{inputs_embeds.shape}")
      batch, length, _ = inputs_embeds.shape
    if cache is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
      if positions is None:
        positions = cache.end_index[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
      query_slot = cache.end_index[:, None] + jnp.arange(length)[None]        # [b, t]
      mask = jnp.arange(cache.capacity)[None, None, :] <= query_slot[:, :, None]
    else:
      if positions is None:
        positions = default_positions(batch, length, segment_ids)
      mask = attention_mask_for(length, segment_ids, attention_mask, batch)

    x = (self.embed_tokens(input_ids) if input_ids is not None
         else inputs_embeds.astype(c.compute_dtype))
    x = mesh_lib.constrain(x, ("act_batch", "act_length", "act_embed"))
    if c.scan_layers:
      x, new_keys, new_values = _scan_layers(self.layers, c.remat_policy, x, positions, mask,
                                             cache)
    else:
      x, new_keys, new_values = _loop_layers(self.layers, c.remat_policy, x, positions, mask,
                                             cache)
    hidden = self.final_norm(x)
    dt = c.compute_dtype
    if c.tie_embeddings:
      logits = jnp.einsum("bte,ve->btv", hidden, self.embed[...].astype(dt),
                          preferred_element_type=jnp.float32)
    elif not isinstance(self.lm_head, nnx.Variable):   # decode_layout's vocab-major head
      logits = self.lm_head(hidden, "bte,ev->btv", dt, out_dtype=jnp.float32)
    else:
      logits = jnp.einsum("bte,ev->btv", hidden, self.lm_head[...].astype(dt),
                          preferred_element_type=jnp.float32)
    logits = mesh_lib.constrain(logits, ("act_batch", "act_length", "act_vocab"))
    values = self.value_from(hidden) if c.value_head else None
    new_cache = None
    if cache is not None:
      advance = (jnp.sum(attention_mask.astype(jnp.int32), axis=1) if attention_mask is not None
                 else jnp.full((batch,), length, jnp.int32))
      new_cache = KVCache(new_keys, new_values, cache.end_index + advance)
    return DecoderOutput(logits=logits.astype(jnp.float32), hidden=hidden, values=values,
                         cache=new_cache)


def _recompute_in_backward(fn: Any) -> Any:
  """`fn(state, x, positions, mask)` whose backward pass recomputes it from its inputs: full
  rematerialisation that XLA:CPU keeps.

  XLA:CPU drops `jax.checkpoint`'s recomputation: common-subexpression elimination merges
  the recomputed forward with the original one, so every layer's activations stay alive
  until the backward pass and `remat_policy="full"` saved nothing (a Qwen3-0.6B GRPO step:
  32.5 GB with remat, 33.8 GB without; tools/bench_memory.py). Here the backward recomputes
  the layer from an input tied to the incoming cotangent (`x + ct[0] * 0`, which XLA may
  not fold, since 0 * inf is NaN), so the recomputation can neither be merged with the
  forward nor hoisted before the backward. Gradients are those of `fn`.
  """

  @jax.custom_vjp
  def run(state: Any, x: Array, positions: Array, mask: Array) -> Array:
    return fn(state, x, positions, mask)

  def forward(state: Any, x: Array, positions: Array, mask: Array) -> tuple[Array, Any]:
    return fn(state, x, positions, mask), (state, x, positions, mask)

  def backward(residuals: Any, ct: Array) -> tuple[Any, ...]:
    state, x, positions, mask = residuals
    x = x + (ct.reshape(-1)[0] * 0).astype(x.dtype)
    _, vjp = jax.vjp(lambda s, h: fn(s, h, positions, mask), state, x)
    d_state, d_x = vjp(ct)
    return d_state, d_x, None, None

  run.defvjp(forward, backward)
  return run


def _not_a_view(prim: Any, *_: Any, **__: Any) -> bool:
  """Remat policy "save everything but reshapes and broadcasts" (cheap to redo).

  Why: in a Python loop, a reshaped weight or activation kept for the backward pass is a
  free view of a buffer kept anyway; as a residual of `lax.scan` it becomes a stacked copy
  of its own. tools/bench_compile.py's 28-layer step without remat: XLA buffers 0.96 GB with
  every residual saved, 0.91 GB with this policy (the loop: 0.78 GB)."""
  return prim not in (jax.lax.reshape_p, jax.lax.broadcast_in_dim_p)


def _layer_fn(graphdef: nnx.GraphDef, policy: str, cached: bool, scanned: bool = False) -> Any:
  """`run(state, x, positions, mask, layer_cache) -> (x, kv or None)` for one layer's state,
  rematerialised per `policy`. The layer is merged inside the function, so the remat (and a
  scan around it) sees plain arrays: only trace-time cost, no NNX transform in the graph."""

  def run(state, x, positions, mask, layer_cache):
    return nnx.merge(graphdef, state)(x, positions, mask, layer_cache)

  if policy == "none":
    return jax.checkpoint(run, policy=_not_a_view) if scanned and not cached else run
  if policy == "full" and not cached and jax.default_backend() == "cpu":
    def hidden_only(state, x, positions, mask):
      return run(state, x, positions, mask, None)[0]

    recompute = _recompute_in_backward(hidden_only)
    return lambda state, x, positions, mask, _: (recompute(state, x, positions, mask), None)
  return jax.checkpoint(run, policy=_REMAT[policy])


def _loop_layers(layers: Sequence[DecoderLayer], policy: str, x: Array, positions: Array,
                 mask: Array, cache: KVCache | None) -> tuple[Array, Any, Any]:
  """The layers one after another in Python: (x, new keys, new values), tuples per layer."""
  new_keys, new_values = [], []
  for i, layer in enumerate(layers):
    layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.end_index)
    if policy == "none":
      x, kv = layer(x, positions, mask, layer_cache)
    else:
      graphdef, state = nnx.split(layer)
      x, kv = _layer_fn(graphdef, policy, cache is not None)(state, x, positions, mask,
                                                            layer_cache)
    if kv is not None:
      new_keys.append(kv[0])
      new_values.append(kv[1])
  return x, tuple(new_keys), tuple(new_values)


def _scan_layers(layers: DecoderLayer, policy: str, x: Array, positions: Array, mask: Array,
                 cache: KVCache | None) -> tuple[Array, Array | None, Array | None]:
  """The stacked layers under one `lax.scan`: (x, new keys, new values), stacked or None.

  The stacked cache rides in the carry and each layer writes its slice back with a dynamic
  update, which XLA does in place (the cache is donated by the sampler), rather than as
  scan outputs, which would be a second cache-sized buffer.
  """
  graphdef, state = nnx.split(layers)
  run = _layer_fn(graphdef, policy, cache is not None, scanned=True)
  if cache is None:
    def body(h: Array, layer_state: Any) -> tuple[Array, None]:
      return run(layer_state, h, positions, mask, None)[0], None

    x, _ = jax.lax.scan(body, x, state)
    return x, None, None
  if not cache.stacked:
    raise ValueError("a ModelConfig.scan_layers model needs a stacked KV cache; create it with "
                     "KVCache.create(config, ...) from the same config")

  def cached_body(carry: tuple[Array, Array, Array, Array], layer_state: Any
                  ) -> tuple[tuple[Array, Array, Array, Array], None]:
    h, keys, values, i = carry
    layer_cache = (keys[i], values[i], cache.end_index)
    h, (k, v) = run(layer_state, h, positions, mask, layer_cache)
    keys = jax.lax.dynamic_update_index_in_dim(keys, k, i, 0)
    values = jax.lax.dynamic_update_index_in_dim(values, v, i, 0)
    return (h, keys, values, i + 1), None

  (x, keys, values, _), _ = jax.lax.scan(
      cached_body, (x, cache.keys, cache.values, jnp.zeros((), jnp.int32)), state)
  return x, keys, values


# ------------------------------------------------------------------------------------------
# Functional helpers
# ------------------------------------------------------------------------------------------


def apply(graphdef: nnx.GraphDef, state: nnx.State, input_ids: Array | None = None,
          **kwargs: Any) -> Any:
  """`model(input_ids, **kwargs)` for a split model (`input_ids=None, inputs_embeds=...` for
  embeddings); call it inside `jax.jit`."""
  return nnx.merge(graphdef, state)(input_ids, **kwargs)


def create_model(config: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 rules: mesh_lib.Rules | None = None) -> Transformer:
  """A randomly initialised model; with a mesh, each parameter is created already sharded."""
  if mesh is None:
    return Transformer(config, rngs=nnx.Rngs(seed))
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = mesh_lib.state_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init() -> nnx.State:
    return nnx.split(Transformer(config, rngs=nnx.Rngs(seed)))[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(config: ModelConfig) -> Transformer:
  """The model's structure with ShapeDtypeStruct leaves (no memory), e.g. for loading."""
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> int:
  """Total number of elements in the model's `nnx.Param` variables."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
