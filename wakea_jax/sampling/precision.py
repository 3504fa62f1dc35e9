"""Rollout precision: the trainer's policy rebuilt for decoding in bfloat16 or int8.

Decoding is memory-bound: every step reads every weight once for a handful of tokens, so
weights half (bfloat16) or, for the projections, a quarter (int8) the size of the float32
master copy make each step cheaper where bandwidth is the limit. On CPU, bfloat16 decodes
~2.4x faster than float32 where the cores have AMX (its products go through
`layers.lowp_matmul`, the cache and embedding move 16-bit bits); int8's codes are
multiplied in the trainer's compute dtype, so under a float32 trainer it decodes at
float32's speed (tools/bench_precision.py). The trainer keeps its own numerics;
`RolloutModel.convert` rebuilds the rollout weights from its params once per policy update
(jitted), and the learner re-scores the rollouts with the trainer, so the importance ratio
is always against the trainer's own log-probs and the sampler-trainer gap is measured
every step (rl/learner.py).

  ""          the trainer's graph, params and dtype (no conversion)
  "bfloat16"  every weight cast to bfloat16 and compute in bfloat16 (`ModelConfig.dtype`
              and `param_dtype`), the KV cache too; the embedding and LM head included
  "int8"      the seven projections of every layer (q, k, v, o, gate, up, down) as
              `models/int8.py` Int8Weight: per-output-channel symmetric int8, one matmul
              against the codes in the trainer's compute dtype, the scale applied to its
              output. The embedding, LM head and norms stay in the trainer's param dtype:
              the decoder reads them without `layers.dense`, and the LM head is the one
              matrix whose error lands on the logits unfiltered.

LoRA: the rollout decoder is always a plain one. Adapters are merged first (W + scale A B,
an NF4 base dequantized: `lora.merge_lora`), so decoding runs no low-rank branch and int8
quantizes the weight the policy actually applies. The rollout graph is that of a fresh
`Transformer` of the rollout config (`nnx.eval_shape`, no memory), so it owes nothing to how
the trainer's modules hold their config.

Media models (`VisionLanguageModel` / `AudioLanguageModel`, GRPO on image or audio prompts):
only the text decoder is converted, as above; the tower and projector keep the trainer's
params and dtype. They run once per prompt, in the prefill, while the decoder's weights are
read at every decode step, so that is where the bandwidth goes; the projected features are
cast to the decoder's dtype where they are written over the placeholders. The rollout model
is a media model of the same class (a fresh one's tower and projector, the trainer's params)
whose `language_model` is the rollout decoder and whose `config.text` that decoder's config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

from wakea_jax.models import lora as lora_lib
from wakea_jax.models.config import ModelConfig
from wakea_jax.models.int8 import Int8Weight
from wakea_jax.models.media import is_multimodal
from wakea_jax.models.quant import NF4Weight
from wakea_jax.models.stacking import layer_list, set_layers
from wakea_jax.models.transformer import Transformer
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling.sampler import text_config

ROLLOUT_DTYPES = ("", "bfloat16", "int8")


def check_dtype(dtype: str) -> None:
  """Raises ValueError unless `dtype` is one of ROLLOUT_DTYPES."""
  if dtype not in ROLLOUT_DTYPES:
    raise ValueError(f"rollout.dtype={dtype!r} is not one of {ROLLOUT_DTYPES} "
                     "('': the trainer's params and dtype)")


def rollout_config(config: ModelConfig, dtype: str) -> ModelConfig:
  """The ModelConfig the rollout model runs: bfloat16 weights and compute for "bfloat16",
  the trainer's own otherwise (int8 changes how projections are stored, not the dtypes)."""
  check_dtype(dtype)
  if dtype == "bfloat16":
    return config.replace(dtype="bfloat16", param_dtype="bfloat16")
  return config


@functools.lru_cache(maxsize=8)
def _plain_graphdef(config: ModelConfig) -> nnx.GraphDef:
  """The graph of a fresh Transformer of `config` (shapes only, nothing allocated)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))[0]


@functools.lru_cache(maxsize=8)
def _encoder_graphdef(cls: type, config: object) -> nnx.GraphDef:
  """The graph of a fresh media model of `config` without its text decoder: the tower and
  projector (shapes only, nothing allocated)."""

  def make() -> nnx.Module:
    model = cls(config, rngs=nnx.Rngs(0))
    del model.language_model
    return model

  return nnx.split(nnx.eval_shape(make))[0]


def _adapted(model: nnx.Module) -> bool:
  return any(isinstance(node, (lora_lib.LoRAWeight, NF4Weight))
             for _, node in nnx.iter_graph(model))


def quantize_projections(model: Transformer) -> Transformer:
  """Replaces the q/k/v/o/gate/up/down Params of every layer by Int8Weights, in place."""
  layers = layer_list(model)
  for layer in layers:
    for sub, attr, in_ndim in lora_lib.TARGETS.values():
      parent = getattr(layer, sub)
      setattr(parent, attr, Int8Weight.from_param(getattr(parent, attr), in_ndim))
  if model.config.scan_layers:
    set_layers(model, layers)
  return model


def rollout_model(model: nnx.Module, dtype: str) -> nnx.Module:
  """A plain decoder computing `model`'s policy at rollout precision `dtype` (a new module;
  `model` is not changed); for a media model, one of its class with the tower and projector
  as they are and that decoder as `language_model` (the module docstring). Works on
  concrete, traced and abstract state."""
  check_dtype(dtype)
  if is_multimodal(model):
    decoder = rollout_model(model.language_model, dtype)
    encoder = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.PathContains("language_model"))))
    out = nnx.merge(_encoder_graphdef(type(model), model.config), encoder)
    out.language_model = decoder
    out.config = dataclasses.replace(model.config, text=decoder.config)
    return out
  if not isinstance(model, Transformer):
    raise TypeError(f"rollout precision needs a Transformer or a vision- / audio-language "
                    f"model, got {type(model).__name__}")
  plain = lora_lib.merge_lora(model) if _adapted(model) else model
  config = rollout_config(plain.config, dtype)
  params = nnx.state(plain, nnx.Param)
  params = jax.tree.map(lambda x: x.astype(config.weight_dtype), params)
  out = nnx.merge(_plain_graphdef(config), params)
  return quantize_projections(out) if dtype == "int8" else out


@dataclasses.dataclass(frozen=True)
class RolloutModel:
  """What a sampler at rollout precision needs: its graph and config, and `convert`, the
  jitted map from the trainer's params (trainable + frozen, one state) to its params."""

  dtype: str
  graphdef: nnx.GraphDef
  config: ModelConfig
  convert: Callable[[nnx.State], nnx.State]


def rollout_model_for(graphdef: nnx.GraphDef, params: nnx.State, dtype: str, *,
                      mesh: jax.sharding.Mesh | None = None,
                      rules: mesh_lib.Rules | None = None) -> RolloutModel:
  """The RolloutModel of the trainer's `graphdef` at `dtype`; `params` (concrete or abstract)
  give the shapes. With a mesh, the converted params are laid out by their logical axes as
  the trainer's are. dtype "": the trainer's graph, config and params unchanged."""
  check_dtype(dtype)
  if not dtype:
    # A vision- or audio-language model samples with its text decoder's config (KV cache).
    model_config = text_config(nnx.merge(graphdef, jax.tree.map(_abstract, params)).config)
    return RolloutModel(dtype, graphdef, model_config, lambda p: p)

  def build(p: nnx.State) -> nnx.Module:
    return rollout_model(nnx.merge(graphdef, p), dtype)

  abstract = nnx.eval_shape(build, jax.tree.map(_abstract, params))
  rollout_graphdef, abstract_state = nnx.split(abstract)
  shardings = (None if mesh is None
               else mesh_lib.state_shardings(abstract_state, mesh, rules))
  convert = jax.jit(lambda p: nnx.split(build(p))[1], out_shardings=shardings)
  return RolloutModel(dtype, rollout_graphdef, text_config(abstract.config), convert)


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def to_rollout(graphdef: nnx.GraphDef, params: nnx.State, dtype: str
               ) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
  """(rollout graphdef, rollout params, rollout ModelConfig) of the trainer's model at
  `dtype`, once; a learner keeps the `rollout_model_for` result and calls `convert` per
  update instead (one compilation)."""
  rollout = rollout_model_for(graphdef, params, dtype)
  return rollout.graphdef, rollout.convert(params), rollout.config
