"""Layer layouts: a list of decoder layers <-> one module of layers stacked on a leading axis.

A scanned model (`ModelConfig.scan_layers`) holds its layers as one module whose Variables
carry a leading "layers" axis; a looped one holds an `nnx.List`. Both hold the same numbers:
these helpers move between the layouts (HF import/export, model directories, LoRA).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

# A decoder (models.transformer.Transformer): `.config.scan_layers` and `.layers`. Not imported,
# since the decoder builds its stacked layers with this module.
Transformer = nnx.Module

LAYERS_AXIS = "layers"


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
  """One module shaped like `layers[0]` whose every Variable holds the layers' values stacked
  on a new leading axis, logical axis "layers" prepended to its `logical_axes`.

  The layers must hold the same Variables (paths, shapes); static attributes are those of
  `layers[0]` (so per-layer static values, such as a LoRA adapter's dropout index, are not
  kept). Works on concrete and traced arrays.
  """
  if not layers:
    raise ValueError("stack_layers needs at least one layer")
  graphdef, first = nnx.split(layers[0])
  flats = [dict(nnx.to_flat_state(first))]
  flats += [dict(nnx.to_flat_state(nnx.split(layer)[1])) for layer in layers[1:]]
  for i, flat in enumerate(flats[1:], start=1):
    if flat.keys() != flats[0].keys():
      odd = sorted(".".join(map(str, p)) for p in flat.keys() ^ flats[0].keys())
      raise ValueError(f"stack_layers: layer {i} differs from layer 0 at {odd[:5]}")
  items = []
  for path, var in flats[0].items():
    value = jnp.stack([flat[path].get_value() for flat in flats])
    axes = var.get_metadata().get("logical_axes")
    meta = {} if axes is None else {"logical_axes": (LAYERS_AXIS,) + tuple(axes)}
    items.append((path, var.replace(value, **meta)))
  return nnx.merge(graphdef, nnx.from_flat_state(items))


def unstack_layers(stacked: nnx.Module) -> list[nnx.Module]:
  """The inverse of `stack_layers`: one module per index of the leading axis."""
  graphdef, state = nnx.split(stacked)
  flat = list(nnx.to_flat_state(state))
  if not flat:
    raise ValueError("unstack_layers: the module holds no Variables")
  num = flat[0][1].get_value().shape[0]

  def layer(i: int) -> nnx.Module:
    items = []
    for path, var in flat:
      axes = var.get_metadata().get("logical_axes")
      if axes is not None and (not axes or axes[0] != LAYERS_AXIS):
        raise ValueError(f"unstack_layers: {'.'.join(map(str, path))} has logical axes {axes}, "
                         f"not led by {LAYERS_AXIS!r}; is the module stacked?")
      meta = {} if axes is None else {"logical_axes": tuple(axes)[1:]}
      items.append((path, var.replace(var.get_value()[i], **meta)))
    return nnx.merge(graphdef, nnx.from_flat_state(items))

  return [layer(i) for i in range(num)]


def layer_list(model: Transformer) -> list[nnx.Module]:
  """The decoder layers of `model` one per index: the modules themselves for a looped model,
  unstacked copies (`unstack_layers`) for a scanned one."""
  if model.config.scan_layers:
    return unstack_layers(model.layers)
  return list(model.layers)


def set_layers(model: Transformer, layers: Sequence[nnx.Module]) -> None:
  """Puts per-layer modules back into `model` in its layout (stacked when scanned), in place."""
  model.layers = stack_layers(layers) if model.config.scan_layers else nnx.List(list(layers))


def convert_layers(model: Transformer, scan_layers: bool) -> Transformer:
  """`model` in the layer layout `scan_layers` (a copy; `model` itself when it already is).

  Any model works (LoRA adapters, NF4 bases): the layers are stacked or unstacked whole. The
  copy shares arrays with `model`; on a mesh, re-place it (`mesh_lib.shard_state`) if the
  new leading axis should be laid out by the rules.
  """
  if model.config.scan_layers == scan_layers:
    return model
  layers = layer_list(model)
  out = nnx.clone(model)
  out.config = model.config.replace(scan_layers=scan_layers)
  set_layers(out, layers)
  return out
