"""HF BERT checkpoints -> `models.text_encoder.BertEncoder`, without PyTorch.

`load_bert(path)` reads `config.json` and `model.safetensors` with numpy (HF `BertModel`
names, with or without a "bert." prefix); the name map is data (`TENSOR_RULES`), its
tensor hooks those of the decoder's table (`checkpoints/hf.py`). Every tensor is checked:
a missing, extra or mis-shaped one is an error naming the file and the tensor.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from wakea_jax.checkpoints.hf import HOOKS, PathLike
from wakea_jax.models.text_encoder import BertConfig, BertEncoder

# Files a sentence-transformers directory must hold (see retrieval/minilm.py).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# ------------------------------------------------------------------------------------------
# The name map ("{i}" = layer index) and hooks from checkpoints.hf.
# ------------------------------------------------------------------------------------------

_L = "encoder.layer.{i}."
TENSOR_RULES: tuple[tuple[str, str, str], ...] = (
    ("embeddings.word_embeddings.weight", "word_embed", "identity"),
    ("embeddings.position_embeddings.weight", "position_embed", "identity"),
    ("embeddings.token_type_embeddings.weight", "type_embed", "identity"),
    ("embeddings.LayerNorm.weight", "embed_norm.scale", "identity"),
    ("embeddings.LayerNorm.bias", "embed_norm.bias", "identity"),
    (_L + "attention.self.query.weight", "layers.{i}.q_proj", "split_heads"),
    (_L + "attention.self.key.weight", "layers.{i}.k_proj", "split_heads"),
    (_L + "attention.self.value.weight", "layers.{i}.v_proj", "split_heads"),
    (_L + "attention.self.query.bias", "layers.{i}.q_bias", "split_bias"),
    (_L + "attention.self.key.bias", "layers.{i}.k_bias", "split_bias"),
    (_L + "attention.self.value.bias", "layers.{i}.v_bias", "split_bias"),
    (_L + "attention.output.dense.weight", "layers.{i}.o_proj", "merge_heads"),
    (_L + "attention.output.dense.bias", "layers.{i}.o_bias", "identity"),
    (_L + "attention.output.LayerNorm.weight", "layers.{i}.attn_norm.scale", "identity"),
    (_L + "attention.output.LayerNorm.bias", "layers.{i}.attn_norm.bias", "identity"),
    (_L + "intermediate.dense.weight", "layers.{i}.up_proj", "linear_in_out"),
    (_L + "intermediate.dense.bias", "layers.{i}.up_bias", "identity"),
    (_L + "output.dense.weight", "layers.{i}.down_proj", "linear_in_out"),
    (_L + "output.dense.bias", "layers.{i}.down_bias", "identity"),
    (_L + "output.LayerNorm.weight", "layers.{i}.mlp_norm.scale", "identity"),
    (_L + "output.LayerNorm.bias", "layers.{i}.mlp_norm.bias", "identity"),
)
# Tensors we read but do not use: the position-id buffer and the [CLS] pooler head.
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.dense.weight",
            "pooler.dense.bias")


def require_files(directory: pathlib.Path, names: Sequence[str]) -> None:
  """Raises FileNotFoundError listing every file of `names` missing from `directory`."""
  missing = [n for n in names if not (directory / n).is_file()]
  if missing:
    raise FileNotFoundError(f"{directory}: missing {', '.join(missing)} "
                            f"(a BERT checkpoint needs {', '.join(REQUIRED_FILES)})")


def load_bert(path: PathLike) -> tuple[BertEncoder, BertConfig]:
  """Loads `config.json` + `model.safetensors` from a directory (HF `BertModel` names, with or
  without a "bert." prefix) into a `BertEncoder`. No PyTorch; every tensor is checked."""
  directory = pathlib.Path(path)
  require_files(directory, ("config.json", "model.safetensors"))
  config = BertConfig.from_json(directory / "config.json")
  abstract = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  expected = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
  file = directory / "model.safetensors"
  values: dict[str, np.ndarray] = {}
  with safe_open(str(file), framework="numpy") as f:
    keys = set(f.keys())
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in keys else ""
    for hf_pattern, ours_pattern, hook_name in TENSOR_RULES:
      layers = range(config.num_hidden_layers) if "{i}" in hf_pattern else (None,)
      for i in layers:
        hf_name = prefix + hf_pattern.format(i=i)
        ours = ours_pattern.format(i=i)
        if hf_name not in keys:
          raise ValueError(f"{file}: tensor {hf_name!r} is missing")
        shape = tuple(expected[ours][1].shape)
        hook = HOOKS[hook_name]
        array = f.get_tensor(hf_name)
        if tuple(array.shape) != hook.hf_shape(shape):
          raise ValueError(f"{file}: tensor {hf_name!r} has shape {tuple(array.shape)}, "
                           f"expected {hook.hf_shape(shape)} from {directory / 'config.json'}")
        values[ours] = np.ascontiguousarray(hook.to_ours(array, shape), dtype=np.float32)
        keys.discard(hf_name)
  unused = sorted(k for k in keys if k.removeprefix(prefix) not in _IGNORED)
  if unused:
    raise ValueError(f"{file}: unexpected tensors {unused[:5]}{' ...' if len(unused) > 5 else ''}")
  state = nnx.from_flat_state(
      [(p, v.replace(jnp.asarray(values[name]))) for name, (p, v) in expected.items()])
  return nnx.merge(graphdef, state), config


__all__ = ["REQUIRED_FILES", "TENSOR_RULES", "load_bert", "require_files"]
