"""A model whose embedding is larger than its tokenizer (Qwen pads 151,665 ids to 151,936 rows):
the padded ids are never sampled, greedy or not; the reported log-probs are log-softmaxes
over the valid ids and equal the trainer's scoring with the same limit; a tokenizer larger
than the embedding is an error naming both sizes wherever a model meets a tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wakea_jax import sample as sample_bin
from wakea_jax.checkpoints import export
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.models import scoring, transformer
from wakea_jax.models.config import get_preset
from wakea_jax.sampling.sampler import Sampler, chat_sampler, check_vocab
from wakea_jax.train import setup as setup_lib

VALID = 1024      # the bundled tokenizer's ids
PADDED = 64       # extra embedding rows, as a padded checkpoint has
PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 1, 2, 3, 4, 5, 6, 7, 9, 10, 33, 44, 55]]


@pytest.fixture(scope="module")
def rigged():
  """A model whose padded ids have far the largest logits at every position, unmasked."""
  config = get_preset("tiny", vocab_size=VALID + PADDED, max_seq_len=256)
  model = transformer.create_model(config, seed=0)
  d0 = 0
  # A constant direction in the residual stream that the head turns into a large bonus for
  # the padded ids; the rest of the hidden state still varies with the context.
  model.embed[...] = model.embed[...].at[:, d0].add(10.0)
  bonus = np.zeros(config.vocab_size, np.float32)
  bonus[VALID:] = 30.0
  model.lm_head[...] = model.lm_head[...].at[d0].add(jnp.asarray(bonus))
  graphdef, params = nnx.split(model)
  return config, graphdef, params, model


def _full_logits(graphdef, params, ids):
  return jax.jit(transformer.apply, static_argnums=0)(graphdef, params, jnp.asarray([ids]))[0]


def test_the_rig_prefers_padded_ids_when_unmasked(rigged):
  config, graphdef, params, _ = rigged
  out = Sampler(graphdef, config, temperature=0.0).generate(
      params, PROMPTS, max_new_tokens=4, rng=jax.random.key(0))
  assert all(t >= VALID for row in out.tokens for t in row), out.tokens


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=1.5, top_k=50),
                                      dict(temperature=1.0, top_p=0.9)])
def test_padded_ids_are_never_produced_and_logprobs_are_over_valid_ids(rigged, settings):
  config, graphdef, params, _ = rigged
  sampler = Sampler(graphdef, config, vocab_limit=VALID, **settings)
  prompts = PROMPTS * 4
  out = sampler.generate(params, prompts, max_new_tokens=12, rng=jax.random.key(1))
  assert all(0 <= t < VALID for row in out.tokens for t in row)
  for prompt, tokens, logprobs in zip(prompts[:3], out.tokens, out.logprobs):
    ids = prompt + tokens
    logits = _full_logits(graphdef, params, ids)[len(prompt) - 1:-1]
    valid = jax.nn.log_softmax(logits[:, :VALID], axis=-1)
    np.testing.assert_allclose(logprobs, valid[np.arange(len(tokens)), tokens], atol=1e-4)
    if settings["temperature"] == 0.0:   # greedy is the argmax over the valid ids
      np.testing.assert_array_equal(tokens, np.argmax(logits[:, :VALID], axis=-1))
    # The trainer scores over the same valid ids (rl/update.py passes the limit).
    batch = {"input_ids": jnp.asarray([ids[:-1]]), "targets": jnp.asarray([ids[1:]])}
    model = nnx.merge(graphdef, params)
    scores = scoring.score_tokens(model, batch, vocab_limit=VALID)
    np.testing.assert_allclose(scores.logprobs[0, len(prompt) - 1:], logprobs, atol=1e-4)


def test_vocab_limit_and_top_k_are_checked(rigged):
  config, graphdef, _, _ = rigged
  with pytest.raises(ValueError, match="vocab_limit"):
    Sampler(graphdef, config, vocab_limit=VALID + PADDED + 1)
  with pytest.raises(ValueError, match="top_k"):
    Sampler(graphdef, config, vocab_limit=VALID, top_k=VALID + 1)


def test_chat_sampler_takes_the_limit_stop_and_pad_ids_from_the_tokenizer(rigged):
  config, graphdef, _, _ = rigged
  tok = default_tokenizer()
  sampler = chat_sampler(graphdef, config, tok, temperature=0.0)
  assert sampler.vocab_limit == tok.vocab_size == VALID
  assert sampler.stop_ids == (tok.token_to_id("<|im_end|>"), tok.eos_id)
  assert chat_sampler(graphdef, config, tok, stop_ids=()).stop_ids == ()


def test_a_tokenizer_larger_than_the_embedding_is_an_error_naming_both(tmp_path):
  tok = default_tokenizer()
  small = get_preset("tiny", vocab_size=512, max_seq_len=256)
  message = r"tokenizer at .*tokenizer\.model has 1024 ids.*/some/dir has 512 embedding rows"
  with pytest.raises(ValueError, match=message):
    check_vocab(tok, small, model_source="the model /some/dir")
  # The sample binary, with the model directory's path in the message.
  export.save_model_dir(transformer.create_model(small, seed=0), tmp_path / "small")
  with pytest.raises(ValueError, match=r"1024 ids.*--checkpoint .*small has 512"):
    sample_bin.run(str(tmp_path / "small"), ["hi"])
  # The run setup, naming config.init_from.
  run = setup_lib.RunConfig(model=small, init_from=str(tmp_path / "small"))
  mesh = setup_lib.mesh_lib.create_mesh(run.mesh.shape)
  with pytest.raises(ValueError, match=r"1024 ids.*config\.init_from .*small has 512"):
    setup_lib.build_model(run, mesh, setup_lib.mesh_lib.normalize_rules(run.sharding_rules),
                          tokenizer=tok)
