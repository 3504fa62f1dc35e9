"""Exports a user can use: a trained run's HF export, loaded by transformers alone (model,
tokenizer, chat template, generation config), greedy-generates the tokens our sampler does
for the same chat prompt; a LoRA run's PEFT adapters give the merged export's logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from wakea_jax.checkpoints import adapters, export, hf  # noqa: E402
from wakea_jax.config_files import get_config  # noqa: E402
from wakea_jax.data import chat  # noqa: E402
from wakea_jax.data.tokenizer import default_tokenizer  # noqa: E402
from wakea_jax.models import transformer  # noqa: E402
from wakea_jax.models.config import get_preset  # noqa: E402
from wakea_jax.sampling.sampler import chat_sampler  # noqa: E402
from wakea_jax.train import hf_export  # noqa: E402
from wakea_jax.trainers import run  # noqa: E402

VALID, PADDED = 1024, 64
PROMPTS = [[{"role": "user", "content": "What is 12+7?"}],
           [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Compute 3*4, please."}]]
NEW_TOKENS = 12


def _auto_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _greedy_ours(model, ids, n=NEW_TOKENS):
  graphdef, params = nnx.split(model)
  sampler = chat_sampler(graphdef, model.config, default_tokenizer(), temperature=0.0)
  out = sampler.generate(params, [ids], max_new_tokens=n, rng=jax.random.key(0))
  return out.tokens[0]


def _greedy_transformers(model, ids, n=NEW_TOKENS, **kwargs):
  with torch.no_grad():   # generation_config.json supplies eos and suppressed ids
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, **kwargs)
  return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny from-scratch SFT run (embedding padded past the tokenizer) exported with hf."""
  workdir = tmp_path_factory.mktemp("sft")
  config = get_config("sft:test", **{"train.steps": 30, "train.eval_every": 100,
                                     "train.checkpoint_every": 100})
  config.model.vocab_size = VALID + PADDED
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.export.update(enabled=True, hf=True)
  run(config, workdir)
  return workdir / "export"


def test_hf_export_holds_tokenizer_chat_template_and_generation_config(trained):
  names = sorted(p.name for p in (trained / "hf").iterdir())
  assert names == ["config.json", "generation_config.json", "model.safetensors",
                   "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
  generation = transformers.GenerationConfig.from_pretrained(trained / "hf")
  tok = default_tokenizer()
  assert generation.eos_token_id == [tok.token_to_id("<|im_end|>"), tok.eos_id]
  assert generation.suppress_tokens == list(range(VALID, VALID + PADDED))


def test_transformers_greedy_equals_our_sampler_on_a_chat_prompt(trained):
  auto_tok = transformers.AutoTokenizer.from_pretrained(trained / "hf")
  hf_model = _auto_model(trained / "hf")
  ours = export.load_model_dir(trained / "model")
  for messages in PROMPTS:
    ids = list(auto_tok.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    assert ids == chat.render(messages, default_tokenizer(),
                              add_generation_prompt=True).input_ids.tolist()
    tokens = _greedy_ours(ours, ids)
    assert tokens == _greedy_transformers(hf_model, ids)
    assert auto_tok.decode(tokens) == default_tokenizer().decode(tokens)


def test_padded_ids_are_suppressed_in_transformers_as_in_our_sampler(trained, tmp_path):
  """The trained model rigged so the padded ids have far the largest logits: both samplers
  skip them (transformers through generation_config.json's suppress_tokens) and agree."""
  model = export.load_model_dir(trained / "model")
  model.embed[...] = model.embed[...].at[:, 0].add(10.0)
  bonus = jnp.zeros(model.config.vocab_size).at[VALID:].set(30.0)
  model.lm_head[...] = model.lm_head[...].at[0].add(bonus)
  tok = default_tokenizer()
  hf.save_model(model, tmp_path / "rigged", files=hf_export.side_files(tok, model.config))
  hf_model = _auto_model(tmp_path / "rigged")
  ids = chat.render(PROMPTS[0], tok, add_generation_prompt=True).input_ids.tolist()
  assert all(t >= VALID for t in _greedy_transformers(hf_model, ids, 4, suppress_tokens=None))
  tokens = _greedy_ours(model, ids)
  assert max(tokens) < VALID
  assert tokens == _greedy_transformers(hf_model, ids)


def test_lora_run_exports_peft_adapters_matching_the_merged_export(tmp_path):
  base = transformer.create_model(get_preset("tiny", vocab_size=VALID, max_seq_len=512,
                                             qk_norm=True), seed=3)
  hf.save_model(base, tmp_path / "base")
  config = get_config("sft:lora")
  test = get_config("sft:test")
  config.data = test.data
  config.train = test.train
  config.train.update(steps=4, eval_every=100, checkpoint_every=100)
  config.init_from = str(tmp_path / "base")
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  config.lora.update(rank=4, alpha=16.0, targets=("q", "o", "up"))
  config.export.update(enabled=True, hf=True)
  config.export.adapter = True
  config.mesh.update(data=2, fsdp=2, tensor=2)
  run(config, tmp_path / "work")

  out = tmp_path / "work" / "export"
  saved = json.loads((out / "adapter" / adapters.ADAPTER_CONFIG).read_text())
  assert saved["base_model_name_or_path"] == str((tmp_path / "base").absolute())
  assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (
      4, 16.0, ["o_proj", "q_proj", "up_proj"])
  base_model = _auto_model(saved["base_model_name_or_path"])
  peft_model = peft.PeftModel.from_pretrained(base_model, out / "adapter").eval()
  ids = np.arange(3, 40, dtype=np.int64)[None]
  with torch.no_grad():
    via_peft = peft_model(torch.tensor(ids)).logits.numpy()
    merged = _auto_model(out / "hf")(torch.tensor(ids)).logits.numpy()
  ours = jax.jit(transformer.apply, static_argnums=0)(
      *nnx.split(export.load_model_dir(out / "model")), jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(via_peft, merged, atol=1e-4)
  np.testing.assert_allclose(via_peft, np.asarray(ours), atol=1e-4)
  with torch.no_grad():   # the run did move the adapters
    assert np.abs(via_peft - _auto_model(tmp_path / "base")(torch.tensor(ids)).logits.numpy()
                  ).max() > 1e-3
