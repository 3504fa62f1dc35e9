"""run(): LoRA / QLoRA fine-tuning of an imported checkpoint, and the merged export."""

import types

import jax
import numpy as np
import pytest
from flax import nnx

from wakea_jax.checkpoints import export, hf
from wakea_jax.config_files import get_config
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.train import metrics as metrics_lib
from wakea_jax.train import supervised
from wakea_jax.trainers import run


def _sft_config(variant):
  return get_config(f"sft:{variant}")


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_lora_run_trains_adapters_and_exports_merged_model(tmp_path, variant):
  base = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512,
                                             qk_norm=True), seed=3)
  hf.save_model(base, tmp_path / "base")
  config = _sft_config(variant)
  test = _sft_config("test")
  config.data = test.data
  config.train = test.train
  config.train.steps = 6
  config.train.eval_every = 6
  config.init_from = str(tmp_path / "base")
  config.optimizer.learning_rate = 1e-2
  config.optimizer.warmup_steps = 0
  config.lora.rank = 4
  config.lora.targets = ("q", "v", "down")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  last = run(config, tmp_path / "work")
  assert np.isfinite(last["loss"]) and "eval_loss" in last

  merged = export.load_model_dir(tmp_path / "work" / "export" / "model")
  reloaded = hf.load_model(tmp_path / "work" / "export" / "hf")
  base_params = nnx.state(base, nnx.Param)
  merged_params = nnx.state(merged, nnx.Param)
  changed = {jax.tree_util.keystr(p) for (p, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(base_params),
      jax.tree_util.tree_leaves_with_path(merged_params)) if not np.allclose(a, b, atol=1e-6)}
  # Only the targeted projections moved (QLoRA also rounds every base projection to NF4).
  assert changed and all(any(t in c for t in ("q_proj", "v_proj", "down_proj", "k_proj",
                                               "o_proj", "gate_proj", "up_proj")) for c in changed)
  if variant == "lora":
    assert all(any(t in c for t in ("q_proj", "v_proj", "down_proj")) for c in changed)
  ids = np.arange(1, 17, dtype=np.int32)[None]
  apply = jax.jit(transformer.apply, static_argnums=0)
  np.testing.assert_allclose(apply(*nnx.split(merged), ids), apply(*nnx.split(reloaded), ids),
                             atol=1e-5)
  records = metrics_lib.read_jsonl(tmp_path / "work" / "metrics.jsonl")
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))


def test_global_batch_must_split_over_the_mesh_batch_shards():
  built = types.SimpleNamespace(mesh=mesh_lib.create_mesh((2, 2, 2)), rules=mesh_lib.DEFAULT_RULES)
  supervised.check_global_batch(built, 8, "data.batch_size")
  with pytest.raises(ValueError, match=r"data.eval_batch_size=6 \(the global batch\) must be "
                                       r"divisible by the 4 batch shards of mesh"):
    supervised.check_global_batch(built, 6, "data.eval_batch_size")


@pytest.mark.parametrize("kind", ["hf", "model_dir"])
def test_init_from_takes_the_configured_layer_layout(tmp_path, kind):
  """config.model.scan_layers decides the layout of an imported model too: a loop checkpoint
  (HF or ours) is stacked for a scanned run, with the same logits."""
  from wakea_jax import config_lib
  from wakea_jax.train import setup as setup_lib

  base = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=128), seed=3)
  if kind == "hf":
    hf.save_model(base, tmp_path / "base")
  else:
    export.save_model_dir(base, tmp_path / "base")
  config = _sft_config("test")
  config.init_from = str(tmp_path / "base")
  config.model.scan_layers = True
  run_config = config_lib.run_config(config)
  mesh = mesh_lib.create_mesh((2, 2, 2))
  model = setup_lib.build_model(run_config, mesh, mesh_lib.DEFAULT_RULES)
  assert model.config.scan_layers
  ids = np.arange(1, 17, dtype=np.int32)[None]
  apply = jax.jit(transformer.apply, static_argnums=0)
  np.testing.assert_allclose(apply(*nnx.split(model), ids), apply(*nnx.split(base), ids),
                             atol=1e-5)


def test_init_from_a_model_dir_computes_in_the_configured_dtype(tmp_path):
  """config.model.dtype applies to a wakea_jax export too (it was silently the export's):
  a model trained with bfloat16 compute goes on in float32 with the default config, and
  --config.model.dtype=bfloat16 takes effect on a float32 export; shapes stay the export's."""
  from wakea_jax import config_lib
  from wakea_jax.train import setup as setup_lib

  preset = get_preset("tiny", vocab_size=1024, max_seq_len=128)
  export.save_model_dir(transformer.create_model(preset.replace(dtype="bfloat16"), seed=3),
                        tmp_path / "bf16")
  export.save_model_dir(transformer.create_model(preset, seed=3), tmp_path / "f32")
  mesh = mesh_lib.create_mesh((2, 2, 2))
  for source, dtype in (("bf16", "float32"), ("f32", "bfloat16")):
    config = _sft_config("test")
    config.init_from = str(tmp_path / source)
    config.model.dtype = dtype
    model = setup_lib.build_model(config_lib.run_config(config), mesh, mesh_lib.DEFAULT_RULES)
    assert model.config.dtype == dtype and model.config.param_dtype == "float32"
    assert model.config.num_layers == preset.num_layers
