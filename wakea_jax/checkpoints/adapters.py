"""LoRA adapters in PEFT's layout, loadable with `peft.PeftModel.from_pretrained(base, dir)`
onto the `transformers` model of the base checkpoint.

A directory holds `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
use_rslora, lora_dropout, target_modules in HF names, bias "none", base_model_name_or_path)
and `adapter_model.safetensors` with one pair of tensors per adapted projection:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

PEFT computes y = x W^T + scaling * (x A^T) B^T with scaling = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora), so A^T and B^T are our A [in, r] and B [r, out] with
the projection's dims flattened the way the HF weight flattens them (heads-major for q/k/v
outputs and the o_proj input, as `hf.HOOKS` split_heads / merge_heads; see
`LoRAWeight.matrices`). Every target of `models.lora.TARGETS` maps to a PEFT module. A QLoRA
run writes the same adapters: PEFT applies them to the unquantised HF base (the import's
source), as QLoRA adapters are used.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import uuid
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

from wakea_jax.checkpoints.hf import PathLike, check_writable, replace_dir
from wakea_jax.models import lora as lora_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Our target name -> the module path inside an HF decoder layer.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers.{i}."
_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def adapter_config(config: lora_lib.LoRAConfig, *, base_model_name_or_path: str | None = None
                   ) -> dict[str, Any]:
  """PEFT's LoraConfig fields for adapters trained with `config` (inference mode)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "inference_mode": True, "r": config.rank, "lora_alpha": config.alpha,
      "use_rslora": config.rank_stabilized, "lora_dropout": config.dropout,
      "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in config.targets),
      "exclude_modules": None, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
      "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {},
  }


def peft_tensors(model: Any, config: lora_lib.LoRAConfig) -> dict[str, np.ndarray]:
  """PEFT tensor name -> float32 array for every adapter of `model` (trained with `config`)."""
  found = lora_lib.adapters(model)
  if not found:
    raise ValueError("the model has no LoRA adapters to export")
  tensors = {}
  for i, name, adapter in found:
    if name not in config.targets:
      raise ValueError(f"layer {i} has a {name!r} adapter, not among LoRAConfig.targets "
                       f"{config.targets}")
    if not np.isclose(adapter.scale, config.scale):
      raise ValueError(f"layer {i} {name!r}: adapter scale {adapter.scale} differs from the "
                       f"config's {config.scale} (alpha {config.alpha}, rank {config.rank})")
    a, b = (np.asarray(m, np.float32) for m in adapter.matrices())
    if a.shape[1] != config.rank:
      raise ValueError(f"layer {i} {name!r}: rank {a.shape[1]} != LoRAConfig.rank "
                       f"{config.rank}")
    module = _PREFIX.format(i=i) + HF_MODULES[name]
    tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
    tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
  return tensors


def save_peft_adapter(model: Any, config: lora_lib.LoRAConfig, path: PathLike, *,
                      base_model_name_or_path: str | None = None, dtype: str = "float32",
                      overwrite: bool = False) -> pathlib.Path:
  """Writes the adapters of `model` to the directory `path` in PEFT's layout.

  `base_model_name_or_path` is what PEFT records as the base (the HF directory the run
  imported). `dtype` is what tensors are stored in. The directory appears atomically; a
  previous adapter directory there is replaced, any other non-empty directory is an error
  unless `overwrite`.
  """
  if dtype not in _SAVE_DTYPES:
    raise ValueError(f"adapter dtype must be one of {sorted(_SAVE_DTYPES)}, got {dtype!r}")
  target = pathlib.Path(path).absolute()
  check_writable(target, ADAPTER_CONFIG, overwrite)
  tensors = {k: v.astype(_SAVE_DTYPES[dtype]) for k, v in peft_tensors(model, config).items()}
  temp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  temp.mkdir(parents=True)
  try:
    safetensors.numpy.save_file(tensors, str(temp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    values = adapter_config(config, base_model_name_or_path=base_model_name_or_path)
    (temp / ADAPTER_CONFIG).write_text(json.dumps(values, indent=2) + "\n")
    replace_dir(temp, target)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return target
