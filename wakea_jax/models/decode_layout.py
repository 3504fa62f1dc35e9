"""Weight layouts for small-batch decoding on CPU: fused projections, output-major kernels.

A decode step multiplies a few rows (the batch) by every weight matrix, and how fast XLA:CPU
streams a weight through such a dot depends on how the weight is laid out and how big the
dot is, not only on its bytes: a small dot pays a fixed cost. `python tools/bench_matvec.py`
on a 2-core AMD EPYC, batch 8 (GB/s of weights read), on two hosts of that name:

  shape [in, out]   stored [in, out]   [out, in] (contract the last dims)
  512 x 512             7.1                 10.5
  1408 x 512            7.0                 14.1
  512 x 1408 (x2)       7.9 each            11.5;  fused [512, 2816]: 15.0
  all 57 dots          15.7                 11.4     (2026-12-05, the other host)

The model stores kernels input-major (Flax's convention, what HF import, LoRA, QLoRA and the
sharding rules see), which is also what training wants. `pack_for_decode(model)` rewrites a
merged model in place, inside the sampler's jitted decode and before its loop (so the
rewrite is paid once per call, not per step; the trainer's params are never touched):

  - attention's q, k and v kernels become one `qkv_proj` kernel [embed, q + 2 kv heads,
    head_dim] (one dot instead of three: at bench56m's shapes the three took 0.41 ms a
    layer, the one 0.23-0.26), and the MLP's gate and up kernels one [embed, 2 * mlp]
    `gate_up` kernel;
  - with `out_major` (the "packed" layout), `qkv_proj`, attention's o and the MLP's down
    projection become `OutMajor` weights, the same kernels transposed to their output
    dimensions first;
  - with `head=True`, an untied float32 LM head becomes vocabulary-major, [vocab, embed].

Which of these pay depends on the CPU (`choose_layout`). The fusions only remove dots.
The transposes are a bet on the dot kernels: on one 2-core AMD EPYC host the output-major
layers took 10-18% off a bench56m float32 decode step; on another (2026-12-05, the rates in
the last row above) they added 5-9% against the fusions alone, and "fused" was fastest
(alternating in one process, six rounds, median ms/step: fused 14.6, stored 15.2, packed
15.9, head 16.0). On a 2-core AMX Intel Xeon the output-major layers added 8-10%, while the
vocabulary-major head alone took 7-10% off (three alternating rounds, 2026-12-04: stored
20.4-22.4 ms/step, head only 18.9-20.3, layers 23.6-24.1, layers and head 20.7-22.5). In
bfloat16 neither moved the step on the Xeon.

Only plain `nnx.Param` kernels of unstacked layers are rewritten (q, k and v are fused only
when all three are): LoRA adapters, quantized bases (weight modules) and scanned layers keep
their own path. The result is the same function (the products are the same sums, in another
order: logits agree to float32 rounding). In a 16-bit compute dtype the output-major
products accumulate in float32 (`layers.lowp_matmul`), the only form XLA:CPU runs on its
16-bit kernels. On GPU and TPU the compiler picks layouts itself; `Sampler(weight_layout=)`
applies this on CPU only unless told otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import Array

from wakea_jax.models.layers import MLP, Attention, lowp_matmul


class OutMajor(nnx.Module):
  """A dense kernel stored output-dimensions first: a weight module for `layers.dense`.

  `kernel` holds the stored kernel's trailing (output) dimensions first and its
  `contracted` leading (input) dimensions last; calling it contracts x's trailing
  `contracted` dimensions with them, as `dense(x, stored, equation)` would.
  """

  def __init__(self, stored: Array, contracted: int):
    if not 0 < contracted < stored.ndim:
      raise ValueError(f"contracted must be in [1, {stored.ndim - 1}] for a rank-{stored.ndim} "
                       f"kernel, got {contracted}")
    self.contracted = contracted
    perm = tuple(range(contracted, stored.ndim)) + tuple(range(contracted))
    self.kernel = nnx.Param(jnp.transpose(stored, perm))

  def __call__(self, x: Array, equation: str, dtype: Any, out_dtype: Any = None) -> Array:
    """x [..., in...] -> [..., out...] computed in `dtype` and returned in `out_dtype`
    (default `dtype`), as `dense(x, stored, equation, dtype)`."""
    del equation   # the layers' equations all contract x's trailing dims with the inputs
    k = self.contracted
    w = self.kernel[...].astype(dtype)
    out = w.shape[:w.ndim - k]
    if x.shape[x.ndim - k:] != w.shape[w.ndim - k:]:
      raise ValueError(f"input dims {x.shape[x.ndim - k:]} do not match the kernel's "
                       f"{w.shape[w.ndim - k:]}")
    x2 = x.reshape(-1, math.prod(w.shape[w.ndim - k:])).astype(dtype)
    w2 = w.reshape(math.prod(out), -1)
    out_dtype = out_dtype or dtype
    if jnp.dtype(dtype).itemsize == 2:
      # float32 accumulation: the only form XLA:CPU runs on its 16-bit kernels (a 16-bit
      # output converts both operands to float32 first; see layers.lowp_matmul)
      y = lowp_matmul(x2, w2, out_dtype, w_transposed=True)
    else:
      y = jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())),
                              preferred_element_type=out_dtype)
    return y.reshape(x.shape[:x.ndim - k] + out)


def _plain(weight: Any, rank: int) -> bool:
  """A plain parameter of an unstacked layer (not a weight module, no leading layer axis)."""
  return isinstance(weight, nnx.Variable) and weight[...].ndim == rank


def pack_for_decode(model: nnx.Module, *, layers: bool = True, out_major: bool = True,
                    head: bool = False) -> int:
  """Rewrites `model` in place (see the module docstring): with `layers`, every unstacked
  Attention and MLP (fused q/k/v and gate/up; with `out_major`, those and the o and down
  kernels output-major); with `head`, an untied float32 LM head becomes vocabulary-major (an
  `OutMajor` weight). Returns how many stored kernels it rewrote. Call it on a model merged
  inside a jitted function: the concatenations and transposes then happen in that program,
  once."""
  rewritten = 0
  for _, module in list(nnx.iter_modules(model)):
    # A decoder's LM head, or a media model's decoder's.
    lm_head = getattr(module, "lm_head", None) if head else None
    if _plain(lm_head, 2) and lm_head[...].dtype == jnp.float32:
      module.lm_head = OutMajor(lm_head[...], 1)
      rewritten += 1
    if not layers:
      continue
    if isinstance(module, Attention):
      q, k, v = module.q_proj, module.k_proj, module.v_proj
      if _plain(q, 3) and _plain(k, 3) and _plain(v, 3):
        fused = jnp.concatenate([q[...], k[...], v[...]], axis=1)   # [e, n + 2 kv, h]
        module.qkv_proj = OutMajor(fused, 1) if out_major else nnx.Param(fused)
        module.q_proj = module.k_proj = module.v_proj = None
        rewritten += 3
      # Whichever of q, k, v are left (beside a LoRA one) and o, output-major.
      for name, contracted, rank in (("q_proj", 1, 3), ("k_proj", 1, 3), ("v_proj", 1, 3),
                                     ("o_proj", 2, 3)):
        weight = getattr(module, name)
        if out_major and _plain(weight, rank):
          setattr(module, name, OutMajor(weight[...], contracted))
          rewritten += 1
    elif isinstance(module, MLP):
      gate, up, down = module.gate_proj, module.up_proj, module.down_proj
      if _plain(gate, 2) and _plain(up, 2):
        module.gate_up = nnx.Param(jnp.concatenate([gate[...], up[...]], axis=1))
        module.gate_proj = module.up_proj = None
        rewritten += 2
      if out_major and _plain(down, 2):
        module.down_proj = OutMajor(down[...], 1)
        rewritten += 1
  return rewritten


LAYOUTS = ("auto", "packed", "fused", "head", "stored")


def check_layout(weight_layout: str) -> None:
  """Raises ValueError unless `weight_layout` is one of LAYOUTS."""
  if weight_layout not in LAYOUTS:
    raise ValueError(f"weight_layout must be one of {LAYOUTS}, got {weight_layout!r}")


@functools.cache
def cpu_vendor() -> str:
  """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where unknown; read
  once per process (every Sampler.layout asks)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("vendor_id"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


# `pack_for_decode`'s arguments for each resolved layout ("stored": no packing).
PACK_ARGS = {"packed": {"layers": True, "head": False},
             "fused": {"layers": True, "out_major": False, "head": False},
             "head": {"layers": False, "head": True}, "stored": {}}


def choose_layout(weight_layout: str, *, backend: str, mesh: bool) -> str:
  """The layout `Sampler(weight_layout=)` decodes on, a key of PACK_ARGS: "packed" fuses
  and transposes the layers' kernels, "fused" only fuses them, "head" rewrites the LM head
  alone, "stored" nothing; "auto" is "stored" off the CPU backend or on a mesh (the compiler
  lays out sharded kernels), else what measured fastest on the CPU's vendor (the module
  docstring): "head" on Intel, "fused" elsewhere (AMD EPYC: the fusions paid wherever
  measured, the transposes on one host and not on another)."""
  check_layout(weight_layout)
  if weight_layout != "auto":
    return weight_layout
  if backend != "cpu" or mesh:
    return "stored"
  return "head" if cpu_vendor() == "GenuineIntel" else "fused"
