"""LLaVA's `multi_modal_projector` (linear_1 -> act -> linear_2) to and from
`models.projector.Projector`, without PyTorch.

A table like the decoder's (`checkpoints/hf.py`): HF tensor names after the prefix, our
parameter paths, layout hooks. The config comes from a LLaVA config.json (vision width x
feature layers -> text width, `projector_hidden_act`, `multimodal_projector_bias`). Token
pooling is ours alone (HF's LLaVA has none) and is not part of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from wakea_jax.checkpoints.hf import HOOKS, SAVE_DTYPES, Hook, SafetensorsReader, int_field
from wakea_jax.checkpoints.vision import vision_config_from_hf
from wakea_jax.models.projector import Projector, ProjectorConfig, abstract_projector
from wakea_jax.models.vision import ACTIVATIONS

# (HF name after the prefix, our path, hook, when): "bias" rows exist when the config has bias.
PROJECTOR_RULES: tuple[tuple[str, str, str, str], ...] = (
    ("linear_1.weight", "linear_1", "linear_in_out", "always"),
    ("linear_1.bias", "bias_1", "identity", "bias"),
    ("linear_2.weight", "linear_2", "linear_in_out", "always"),
    ("linear_2.bias", "bias_2", "identity", "bias"),
)
# LLaVA saved by transformers 4.x, then by 5.
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def projector_config_from_hf(hf_config: dict[str, Any], *,
                             source: str = "config.json") -> ProjectorConfig:
  """The ProjectorConfig of an HF LLaVA config: vision width x feature layers -> text width,
  `projector_hidden_act` (default "gelu"), `multimodal_projector_bias` (default true)."""
  vision = vision_config_from_hf(hf_config, source=source)
  text = hf_config.get("text_config")
  if not isinstance(text, dict) or text.get("hidden_size") is None:
    raise ValueError(f"{source}: field 'text_config.hidden_size' is missing")
  layer = hf_config.get("vision_feature_layer", -2)
  layers = len(layer) if isinstance(layer, list) else 1
  act = hf_config.get("projector_hidden_act") or "gelu"
  if act not in ACTIVATIONS:
    raise NotImplementedError(f"{source}: projector_hidden_act {act!r} is not supported "
                              f"(one of {sorted(ACTIVATIONS)})")
  bias = hf_config.get("multimodal_projector_bias", True)
  if not isinstance(bias, bool):
    raise ValueError(f"{source}: field 'multimodal_projector_bias' must be true or false, "
                     f"got {bias!r}")
  return ProjectorConfig(
      in_dim=vision.embed_dim * layers,
      out_dim=int_field(text["hidden_size"], "text_config.hidden_size", source),
      hidden_act=act, bias=bias)


def projector_map(config: ProjectorConfig, prefix: str) -> list[tuple[str, tuple[str], Hook]]:
  """`PROJECTOR_RULES` for `config`: (HF name, our path, hook) per tensor."""
  return [(prefix + hf, (ours,), HOOKS[hook]) for hf, ours, hook, when in PROJECTOR_RULES
          if when == "always" or config.bias]


def read_projector_params(reader: SafetensorsReader, config: ProjectorConfig,
                          prefix: str | None, source: str) -> Projector:
  """A projector of `config` from `reader`'s tensors under `prefix` (None: detected among
  `PROJECTOR_PREFIXES`); shapes and dtypes are checked before data is read."""
  if prefix is None:
    found = [p for p in PROJECTOR_PREFIXES if p + "linear_1.weight" in reader.weight_map]
    if not found:
      raise ValueError(f"{reader.directory}: no multi_modal_projector tensors (looked for "
                       f"'<prefix>linear_1.weight' for a prefix in {PROJECTOR_PREFIXES})")
    prefix = found[0]
  graphdef, abstract_state = nnx.split(abstract_projector(config))
  expected = dict(nnx.to_flat_state(abstract_state))
  entries = projector_map(config, prefix)
  wanted = {name for name, *_ in entries}
  missing = sorted(wanted - set(reader.weight_map))
  extra = sorted(n for n in reader.weight_map if n.startswith(prefix) and n not in wanted)
  if missing or extra:
    raise ValueError(f"{reader.directory}: projector tensor(s) {missing[:5]} missing and "
                     f"{extra[:5]} unexpected for {source}")
  for name, path, hook in entries:
    reader.check_tensor(name, hook.hf_shape(tuple(expected[path].get_value().shape)), source)
  dtype = np.dtype(SAVE_DTYPES[config.param_dtype])
  values = {}
  for name, path, hook in entries:
    array = hook.to_ours(reader.read(name), tuple(expected[path].get_value().shape))
    values[path] = jax.numpy.asarray(np.asarray(array.astype(dtype), order="C"))
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in expected.items()])
  return nnx.merge(graphdef, state)


def projector_tensors(projector: Projector, prefix: str = "multi_modal_projector.",
                      dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array in HF layout) for every tensor of `projector`."""
  flat = dict(nnx.to_flat_state(nnx.state(projector, nnx.Param)))
  for name, path, hook in projector_map(projector.config, prefix):
    array = np.asarray(jax.device_get(flat[path].get_value()))
    yield name, np.asarray(hook.to_hf(array).astype(dtype), order="C")


__all__ = ["PROJECTOR_PREFIXES", "PROJECTOR_RULES", "projector_config_from_hf", "projector_map",
           "projector_tensors", "read_projector_params"]
