"""LoRA (Hu et al., arXiv 2106.09685) and QLoRA (Dettmers et al., arXiv 2305.14314) adapters.

`apply_lora` swaps the chosen projections of every decoder layer for a `LoRAWeight`, which
`layers.dense` calls as `weight(x, equation, dtype)`:

  y = x W + (alpha / r) * (dropout(x) A) B        (LoRA eq. 3; A [in..., r], B [r, out...])

W stays frozen (an `nnx.Param`, or an `NF4Weight` under QLoRA); A and B are `nnx.LoRAParam`,
so the trainer takes exactly the adapters with `nnx.LoRAParam` and everything else with
`nnx.Not(nnx.LoRAParam)`. B starts at zero (section 4.1), so the adapted model starts equal
to the base. The low-rank branch runs on activations: W + AB is never materialised.

With `quantize_base="nf4"` every projection matrix (q, k, v, o, gate, up, down, targeted or
not) is stored in 4-bit NF4, as QLoRA stores the whole base (section 3); embeddings, the LM
head and norms stay in `param_dtype` because the decoder reads them without `dense`.

Dropout on the adapter input uses one "dropout" RNG stream per adapter, folded with the
adapter's index so that `nnx.reseed(model, dropout=key)` (what the train step does every
micro-step) still gives every adapter an independent mask. `model.eval()` /
`nnx.view(model, deterministic=True)` turn it off; `model.train()` back on.

`merge_lora` folds the adapters back (W + (alpha / r) A B, dequantizing NF4 bases) into a
model whose state has exactly the structure of a fresh `Transformer`, ready for export;
`adapters` lists the adapters themselves (`checkpoints/adapters.py` writes them in PEFT's
layout).
`python -m wakea_jax.models.lora --preset bench56m` prints the memory accounting.

On a `scan_layers` model the adapters (and NF4 bases) are built per layer exactly as on a
looped one (same random A for the same seed) and then stacked with the layer parameters, so
the scan carries them too; `adapters` and `merge_lora` see them one layer at a time. Adapter
dropout is refused there: its per-adapter mask index is static, which a stacked layer cannot
hold per layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import Array

from wakea_jax.models.config import ModelConfig, get_preset
from wakea_jax.models.layers import dense
from wakea_jax.models.quant import NF4Weight
from wakea_jax.models.stacking import layer_list, set_layers
from wakea_jax.models.transformer import Transformer

# Target name -> (submodule of a DecoderLayer, attribute, number of leading weight dims that
# contract with the input). The layouts are those of layers.py.
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_proj", 1),        # [E, N, H]
    "k": ("attn", "k_proj", 1),        # [E, K, H]
    "v": ("attn", "v_proj", 1),        # [E, K, H]
    "o": ("attn", "o_proj", 2),        # [N, H, E]
    "gate": ("mlp", "gate_proj", 1),   # [E, M]
    "up": ("mlp", "up_proj", 1),       # [E, M]
    "down": ("mlp", "down_proj", 1),   # [M, E]
}
A_INITS = ("kaiming_uniform", "gaussian")
QUANTIZERS = (None, "nf4")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Adapter hyper-parameters.

  scale = alpha / rank (LoRA section 4.1), or alpha / sqrt(rank) with `rank_stabilized`
  (rsLoRA, arXiv 2312.03732). `a_init` "kaiming_uniform" is U(+-1/sqrt(fan_in)) as in
  PEFT (torch's Linear init); "gaussian" is N(0, 1/rank^2) (PEFT's "gaussian"), the paper
  only saying "random Gaussian". Adapters are kept in `param_dtype` whatever the base
  is stored in (QLoRA keeps them in 16/32 bits).
  """

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(TARGETS)
  quantize_base: str | None = None
  nf4_block_size: int = 64
  nf4_double_quant: bool = True
  a_init: str = "kaiming_uniform"
  rank_stabilized: bool = False
  param_dtype: str = "float32"

  def __post_init__(self) -> None:
    if isinstance(self.targets, str):
      raise ValueError(f"LoRAConfig.targets must be a sequence of names, got the string "
                       f"{self.targets!r}; e.g. ('q', 'v')")
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
    if not self.targets:
      raise ValueError(f"LoRAConfig.targets is empty; choose from {tuple(TARGETS)}")
    for name in self.targets:
      if name not in TARGETS:
        raise ValueError(f"LoRAConfig.targets: unknown target {name!r}; "
                         f"choose from {tuple(TARGETS)}")
    duplicates = sorted({n for n in self.targets if self.targets.count(n) > 1})
    if duplicates:
      raise ValueError(f"LoRAConfig.targets names {duplicates} more than once")
    if self.quantize_base not in QUANTIZERS:
      raise ValueError(f"LoRAConfig.quantize_base must be one of {QUANTIZERS}, "
                       f"got {self.quantize_base!r}")
    if not isinstance(self.nf4_block_size, int) or self.nf4_block_size < 2 or (
        self.nf4_block_size % 2):
      raise ValueError(f"LoRAConfig.nf4_block_size must be a positive even int, "
                       f"got {self.nf4_block_size!r}")
    if self.a_init not in A_INITS:
      raise ValueError(f"LoRAConfig.a_init must be one of {A_INITS}, got {self.a_init!r}")
    if self.param_dtype not in _DTYPES:
      raise ValueError(f"LoRAConfig.param_dtype must be one of {sorted(_DTYPES)}, "
                       f"got {self.param_dtype!r}")

  @property
  def scale(self) -> float:
    """The factor of the low-rank branch: alpha / rank, or alpha / sqrt(rank) (rsLoRA)."""
    return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)


def trainable_filter(config: LoRAConfig | None) -> Any:
  """What the optimizer trains: every Param without LoRA, only the adapters with it."""
  return nnx.Param if config is None else nnx.LoRAParam


class LoRAWeight(nnx.Module):
  """A frozen base weight plus a trainable low-rank update, called like a weight by `dense`.

  base    nnx.Param or NF4Weight of shape [in..., out...] (the first `in_ndim` dims contract)
  lora_a  nnx.LoRAParam [in..., rank], logical axes of the input dims + (None,)
  lora_b  nnx.LoRAParam [rank, out...], (None,) + logical axes of the output dims; zeros
  """

  def __init__(self, base: nnx.Param | NF4Weight, *, in_ndim: int, config: LoRAConfig,
               index: int, rngs: nnx.Rngs):
    self.base = base
    if isinstance(base, NF4Weight):
      shape, axes = base.shape, base.logical_axes
    else:
      shape, axes = tuple(base.shape), base.get_metadata().get("logical_axes")
    axes = tuple(axes) if axes is not None else (None,) * len(shape)
    if not 0 < in_ndim < len(shape):
      raise ValueError(f"in_ndim {in_ndim} does not split a weight of shape {shape}")
    self.in_ndim = in_ndim
    self.scale = config.scale
    self.index = index  # static; decorrelates the dropout masks of adapters sharing a key
    in_shape, out_shape = shape[:in_ndim], shape[in_ndim:]
    r, dtype = config.rank, _DTYPES[config.param_dtype]
    fan_in = math.prod(in_shape)
    key = rngs.params()
    if config.a_init == "kaiming_uniform":
      # kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] matrix: bound = 1 / sqrt(fan_in).
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(key, in_shape + (r,), jnp.float32, -bound, bound)
    else:
      a = jax.random.normal(key, in_shape + (r,), jnp.float32) / r
    self.lora_a = nnx.LoRAParam(a.astype(dtype), logical_axes=axes[:in_ndim] + (None,))
    self.lora_b = nnx.LoRAParam(jnp.zeros((r,) + out_shape, dtype),
                                logical_axes=(None,) + axes[in_ndim:])
    if config.dropout > 0:
      self.dropout = nnx.Dropout(config.dropout)
      # Tag "dropout" whatever stream `rngs` falls back to, so nnx.reseed(dropout=...) finds it.
      self.dropout_rng = nnx.RngStream(rngs.dropout(), tag="dropout")
    else:
      self.dropout = None

  def _equations(self, equation: str) -> tuple[str, str]:
    """'bte,enh->btnh' -> ('bte,er->btr', 'btr,rnh->btnh') for the two low-rank einsums."""
    inputs, out = equation.replace(" ", "").split("->")
    x_sub, w_sub = inputs.split(",")
    in_sub, out_sub = w_sub[:self.in_ndim], w_sub[self.in_ndim:]
    batch = "".join(ch for ch in x_sub if ch not in in_sub)
    r = next(ch for ch in string.ascii_letters if ch not in equation)
    return f"{x_sub},{in_sub}{r}->{batch}{r}", f"{batch}{r},{r}{out_sub}->{out}"

  def __call__(self, x: Array, equation: str, dtype: Any) -> Array:
    """`einsum(equation, x, base)` + scale * (dropout(x) A) B, in `dtype` (as `dense` calls it)."""
    y = dense(x, self.base, equation, dtype)
    eq_a, eq_b = self._equations(equation)
    h = x
    if self.dropout is not None and not self.dropout.deterministic:
      key = jax.random.fold_in(self.dropout_rng(), self.index)
      h = self.dropout(h, rngs=key)
    h = jnp.einsum(eq_a, h.astype(dtype), self.lora_a[...].astype(dtype))
    # Scale the rank-r activations rather than the output: same product, r/out the work.
    h = h * jnp.asarray(self.scale, dtype)
    return y + jnp.einsum(eq_b, h, self.lora_b[...].astype(dtype))

  def delta(self) -> Array:
    """scale * A B in float32, shaped like the base weight."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    r = a.shape[-1]
    full = a.reshape(-1, r) @ b.reshape(r, -1)
    return self.scale * full.reshape(a.shape[:-1] + b.shape[1:])

  def matrices(self) -> tuple[Array, Array]:
    """(A [in, rank], B [rank, out]) with the weight's input and output dims flattened in
    row-major order, as a `[in, out]` matrix of the base weight would be; the delta is
    scale * A @ B. (PEFT stores lora_A.weight = A.T and lora_B.weight = B.T.)"""
    a, b = self.lora_a[...], self.lora_b[...]
    r = a.shape[-1]
    return a.reshape(-1, r), b.reshape(r, -1)

  def merged(self) -> nnx.Param:
    """base + scale * A B as a plain Param, in the base's dtype and logical axes."""
    if isinstance(self.base, NF4Weight):
      base = self.base.to_param()
    else:
      base = self.base
    value = base[...]
    return base.copy((value.astype(jnp.float32) + self.delta()).astype(value.dtype))


def _projections(layers: list[nnx.Module]) -> list[tuple[int, str, nnx.Module, str]]:
  """(layer index, target name, parent module, attribute) for every projection of `layers`."""
  return [(i, name, getattr(layer, sub), attr)
          for i, layer in enumerate(layers) for name, (sub, attr, _) in TARGETS.items()]


def _layers(model: nnx.Module) -> list[nnx.Module]:
  """The decoder layers one per index (unstacked copies for a scan_layers model)."""
  if getattr(model, "layers", None) is None:
    raise TypeError(f"expected a Transformer with .layers, got {type(model).__name__}")
  return layer_list(model)


def adapters(model: nnx.Module) -> list[tuple[int, str, LoRAWeight]]:
  """(layer index, target name, adapter) of every LoRA adapter in `model`, in layer order."""
  return [(i, name, getattr(parent, attr))
          for i, name, parent, attr in _projections(_layers(model))
          if isinstance(getattr(parent, attr), LoRAWeight)]


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Adds adapters to `config.targets` of every layer, in place; returns `model`.

  `rngs.params` initialises A and `rngs.dropout` (or the default stream) seeds dropout.
  """
  scanned = model.config.scan_layers
  if scanned and config.dropout > 0:
    raise ValueError(f"LoRAConfig.dropout={config.dropout} is not supported with "
                     "ModelConfig.scan_layers=True (each adapter's dropout index is static); "
                     "use dropout 0 or scan_layers=False")
  layers = _layers(model)
  index = 0
  for i, name, parent, attr in _projections(layers):
    weight = getattr(parent, attr)
    if not isinstance(weight, nnx.Param):
      raise ValueError(f"layers[{i}].{attr} is already a {type(weight).__name__}; "
                       "apply_lora expects a plain model (merge_lora first)")
    base = weight
    if config.quantize_base == "nf4":
      base = NF4Weight.from_param(weight, config.nf4_block_size,
                                  double_quant=config.nf4_double_quant)
    if name in config.targets:
      base = LoRAWeight(base, in_ndim=TARGETS[name][2], config=config, index=index, rngs=rngs)
      index += 1
    setattr(parent, attr, base)
  if scanned:
    set_layers(model, layers)
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with adapters folded in and NF4 bases dequantized: a plain model.

  Each projection becomes `nnx.Param(W + scale * A B)` in the base's dtype with its logical
  axes, so the state has the structure of a fresh `Transformer` of the same config.
  """
  merged = nnx.clone(model)
  layers = _layers(merged)
  for _, _, parent, attr in _projections(layers):
    weight = getattr(parent, attr)
    if isinstance(weight, LoRAWeight):
      setattr(parent, attr, weight.merged())
    elif isinstance(weight, NF4Weight):
      setattr(parent, attr, weight.to_param())
  if merged.config.scan_layers:
    set_layers(merged, layers)
  return merged


# ----------------------------------------------------------------------------------------
# Memory accounting
# ----------------------------------------------------------------------------------------


def param_bytes(tree: Any) -> int:
  """Bytes held by the arrays (or ShapeDtypeStructs) of a pytree / nnx.State."""
  # dtype.itemsize also covers PRNG key arrays (8 bytes for a threefry key).
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes of a fine-tuning setup, from the shapes of the real state (no allocation).

  projections_*   the q/k/v/o/gate/up/down weights of all layers, full precision / as stored
  frozen_bytes    everything not trained, as stored (projections, embeddings, LM head, norms)
  optimizer_*     AdamW state (mu and nu shaped like the trainable parameters, plus a count)
  Gradients, transient inside the step, are as large as the trainable parameters.
  """

  model_bytes: int
  projections_base_bytes: int
  projections_frozen_bytes: int
  frozen_bytes: int
  adapter_bytes: int
  optimizer_full_bytes: int
  optimizer_lora_bytes: int

  @property
  def full_ft_bytes(self) -> int:
    """Parameters + gradients + AdamW state of full fine-tuning."""
    return 2 * self.model_bytes + self.optimizer_full_bytes

  @property
  def lora_bytes(self) -> int:
    """Frozen state + adapters + their gradients + AdamW state."""
    return self.frozen_bytes + 2 * self.adapter_bytes + self.optimizer_lora_bytes

  def lines(self) -> list[str]:
    """One human-readable row per quantity, in MiB and in bytes."""
    rows = [
        ("model parameters, full precision", self.model_bytes),
        ("projection weights, full precision", self.projections_base_bytes),
        ("projection weights, as stored", self.projections_frozen_bytes),
        ("frozen state, as stored", self.frozen_bytes),
        ("adapters (trainable)", self.adapter_bytes),
        ("AdamW state, full fine-tuning", self.optimizer_full_bytes),
        ("AdamW state, adapters only", self.optimizer_lora_bytes),
        ("full FT: params + grads + AdamW", self.full_ft_bytes),
        ("LoRA: frozen + adapters + grads + AdamW", self.lora_bytes),
    ]
    return [f"{name:<42}{n / 2**20:10.2f} MiB {n:>14,} B" for name, n in rows]


def memory_report(model_config: ModelConfig, lora_config: LoRAConfig) -> MemoryReport:
  """Measures, on the abstract (shape-only) model, what full FT and (Q)LoRA hold."""
  # The layer layout changes no byte count; the looped one lets projections be visited.
  model_config = model_config.replace(scan_layers=False)
  plain = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  adapted = nnx.eval_shape(lambda: apply_lora(Transformer(model_config, rngs=nnx.Rngs(0)),
                                              lora_config, rngs=nnx.Rngs(1)))
  frozen_filter = nnx.All(nnx.Not(nnx.LoRAParam), nnx.Not(nnx.RngState))
  adamw = optax.adamw(1e-4)

  def projections(model: nnx.Module) -> int:
    total = 0
    for _, _, parent, attr in _projections(_layers(model)):
      weight = getattr(parent, attr)
      total += param_bytes(weight.get_value() if isinstance(weight, nnx.Variable)
                           else nnx.state(weight, frozen_filter))
    return total

  full_params = nnx.state(plain, nnx.Param)
  adapters = nnx.state(adapted, nnx.LoRAParam)
  frozen = nnx.state(adapted, frozen_filter)
  return MemoryReport(
      model_bytes=param_bytes(full_params),
      projections_base_bytes=projections(plain),
      projections_frozen_bytes=projections(adapted),
      frozen_bytes=param_bytes(frozen),
      adapter_bytes=param_bytes(adapters),
      optimizer_full_bytes=param_bytes(jax.eval_shape(adamw.init, full_params)),
      optimizer_lora_bytes=param_bytes(jax.eval_shape(adamw.init, adapters)),
  )


def main(argv: list[str] | None = None) -> None:
  """CLI: prints the memory report of `--preset` for each rank, with and without NF4."""
  parser = argparse.ArgumentParser(description="Memory of full fine-tuning vs LoRA / QLoRA.")
  parser.add_argument("--preset", default="bench56m")
  parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
  parser.add_argument("--targets", default=",".join(TARGETS))
  args = parser.parse_args(argv)
  model_config = get_preset(args.preset)
  for rank in args.ranks:
    for quantize in QUANTIZERS:
      config = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=tuple(args.targets.split(",")),
                          quantize_base=quantize)
      print(f"== {args.preset}, rank {rank}, targets {args.targets}, base "
            f"{quantize or model_config.param_dtype}")
      print("\n".join(memory_report(model_config, config).lines()))


if __name__ == "__main__":
  main()
