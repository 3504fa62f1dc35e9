"""LoRA adapters in PEFT's layout: loaded with `peft.PeftModel.from_pretrained` onto the
transformers base model they give the logits of our LoRA model, and so does the merged HF
export; QLoRA runs write the same adapters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from wakea_jax.checkpoints import adapters, hf  # noqa: E402
from wakea_jax.models import lora as lora_lib  # noqa: E402
from wakea_jax.models import transformer  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=512, rms_norm_eps=1e-6, attn_implementation="eager")
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen3_tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True)),
}


def _hf_base(tmp_path, family):
  model_cls, config_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**BASE, **extra)
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():   # norms away from one, so a mis-mapped tensor cannot hide
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
  model.save_pretrained(tmp_path / "base")
  return tmp_path / "base"


def _random_adapters(model, seed):
  """Nonzero A and B everywhere, so every adapter changes the logits."""
  rng = np.random.default_rng(seed)
  for _, _, adapter in lora_lib.adapters(model):
    for var in (adapter.lora_a, adapter.lora_b):
      var[...] = jnp.asarray(0.1 * rng.standard_normal(var.shape).astype(np.float32))


def _ours(model, ids):
  return np.asarray(jax.jit(transformer.apply, static_argnums=0)(*nnx.split(model), ids))


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _auto(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rank_stabilized", [False, True])
def test_peft_loads_our_adapters_with_equal_logits(tmp_path, family, rank_stabilized):
  base_dir = _hf_base(tmp_path, family)
  config = lora_lib.LoRAConfig(rank=4, alpha=8.0, rank_stabilized=rank_stabilized,
                               targets=("q", "k", "v", "o", "gate", "up", "down"))
  model = lora_lib.apply_lora(hf.load_model(base_dir), config, rngs=nnx.Rngs(0))
  _random_adapters(model, seed=2)
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 19)), jnp.int32)
  ours = _ours(model, ids)
  base_logits = _torch_logits(_auto(base_dir), ids)
  assert np.abs(ours - base_logits).max() > 0.1   # the adapters matter

  written = adapters.save_peft_adapter(model, config, tmp_path / "adapter",
                                       base_model_name_or_path=str(base_dir))
  assert sorted(p.name for p in written.iterdir()) == [adapters.ADAPTER_CONFIG,
                                                       adapters.ADAPTER_WEIGHTS]
  saved = json.loads((written / adapters.ADAPTER_CONFIG).read_text())
  assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"],
          saved["use_rslora"], saved["bias"]) == ("LORA", "CAUSAL_LM", 4, 8.0,
                                                  rank_stabilized, "none")
  assert saved["base_model_name_or_path"] == str(base_dir)
  tensors = safetensors.numpy.load_file(str(written / adapters.ADAPTER_WEIGHTS))
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (
      4, 64)
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (
      4 * 24, 4)
  assert tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (
      4, 4 * 24)

  peft_model = peft.PeftModel.from_pretrained(_auto(base_dir), written).eval()
  np.testing.assert_allclose(_torch_logits(peft_model, ids), ours, atol=TOL)
  # The merged export is the same function, loaded by transformers alone.
  hf.save_model(lora_lib.merge_lora(model), tmp_path / "merged")
  np.testing.assert_allclose(_torch_logits(_auto(tmp_path / "merged"), ids), ours, atol=TOL)
  np.testing.assert_allclose(_torch_logits(peft_model.merge_and_unload(), ids), ours, atol=TOL)


def test_a_subset_of_targets_and_qlora_write_the_same_adapters(tmp_path):
  base_dir = _hf_base(tmp_path, "llama")
  config = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("v", "down"))
  model = lora_lib.apply_lora(hf.load_model(base_dir), config, rngs=nnx.Rngs(0))
  _random_adapters(model, seed=4)
  qconfig = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("v", "down"), quantize_base="nf4")
  qlora = lora_lib.apply_lora(hf.load_model(base_dir), qconfig, rngs=nnx.Rngs(1))
  nnx.update(qlora, nnx.state(model, nnx.LoRAParam))
  plain = adapters.peft_tensors(model, config)
  assert sorted({k.split(".")[-3] for k in plain}) == ["down_proj", "v_proj"]
  quantized = adapters.peft_tensors(qlora, qconfig)
  assert plain.keys() == quantized.keys()
  for key in plain:
    np.testing.assert_array_equal(plain[key], quantized[key])
  # PEFT applies them to the unquantised base: the LoRA model's function.
  adapters.save_peft_adapter(qlora, qconfig, tmp_path / "adapter")
  peft_model = peft.PeftModel.from_pretrained(_auto(base_dir), tmp_path / "adapter").eval()
  ids = jnp.arange(1, 20, dtype=jnp.int32)[None]
  np.testing.assert_allclose(_torch_logits(peft_model, ids), _ours(model, ids), atol=TOL)
  assert json.loads((tmp_path / "adapter" / adapters.ADAPTER_CONFIG).read_text())[
      "target_modules"] == ["down_proj", "v_proj"]


def test_errors(tmp_path):
  base_dir = _hf_base(tmp_path, "llama")
  config = lora_lib.LoRAConfig(rank=2, alpha=4.0, targets=("q",))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    adapters.peft_tensors(hf.load_model(base_dir), config)
  model = lora_lib.apply_lora(hf.load_model(base_dir), config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="scale"):
    adapters.peft_tensors(model, lora_lib.LoRAConfig(rank=2, alpha=8.0, targets=("q",)))
  (tmp_path / "occupied").mkdir()
  (tmp_path / "occupied" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    adapters.save_peft_adapter(model, config, tmp_path / "occupied")
