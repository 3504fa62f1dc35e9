"""Rollouts -> train batch: alignment, tool masking, and sampler vs trainer log-probs."""

import jax
import numpy as np
import pytest
from flax import nnx

from wakea_jax.data.tokenizer import IM_END, default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rollout as rollout_lib
from wakea_jax.rl import update as update_lib
from wakea_jax.sampling.sampler import Sampler


@pytest.fixture(scope="module")
def tokenizer():
  return default_tokenizer()


@pytest.fixture(scope="module")
def model():
  config = get_preset(
      "tiny", vocab_size=1024, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=16, mlp_dim=64, max_seq_len=256)
  return transformer.create_model(config, seed=3)


def _rollouts(tool_rows=()):
  prompts = prompts_lib.load_prompts("task:arithmetic?n=2&seed=1&max_operand=9&tools=0")
  completion = [[5, 6, 7, 8, 9], [10, 11, 12]]
  rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
  prompt_ids = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
  comps = [completion[0], completion[1], completion[0], completion[1]]
  tool_mask = [np.zeros(len(c), np.int32) for c in comps]
  for r in tool_rows:
    tool_mask[r][1:3] = 1
  return rollout_lib.Rollouts(
      prompts=rows, prompt_ids=prompt_ids, completion_ids=comps,
      sampler_logprobs=[-np.arange(1, len(c) + 1, dtype=np.float32) * (1 - m)
                        for c, m in zip(comps, tool_mask)],
      tool_mask=tool_mask, num_tool_calls=[0] * 4, stop_reason=["stop_id"] * 4,
      texts=["a"] * 4, finals=["a"] * 4, tool_errors=[0] * 4, group_size=2)


def test_to_batch_alignment_and_tool_mask():
  batch = rollout_lib.to_batch(_rollouts(tool_rows=(0,)), width_multiple=16)
  assert batch["input_ids"].shape == (4, 16)
  # Row 0: prompt [1,2,3], completion [5,6,7,8,9] with tokens 6,7 from a tool.
  np.testing.assert_array_equal(batch["input_ids"][0, :7], [1, 2, 3, 5, 6, 7, 8])
  np.testing.assert_array_equal(batch["targets"][0, :7], [2, 3, 5, 6, 7, 8, 9])
  np.testing.assert_array_equal(batch["loss_mask"][0, :8], [0, 0, 1, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(batch["sampler_logprobs"][0, 2:7], [-1, 0, 0, -4, -5])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 7 + [0] * 9)
  # Row 3: prompt [4,5], completion [10,11,12], no tool.
  np.testing.assert_array_equal(batch["loss_mask"][3, :5], [0, 1, 1, 1, 0])
  np.testing.assert_array_equal(batch["targets"][3, 1:4], [10, 11, 12])


def test_select_and_concat_keep_groups():
  r = _rollouts()
  picked = r.select([1])
  assert picked.prompt_ids == [[4, 5], [4, 5]]
  both = rollout_lib.Rollouts.concat([picked, r.select([0])])
  assert len(both) == 4 and both.num_groups == 2
  assert both.prompt_ids[2] == [1, 2, 3]


def test_sampler_logprobs_equal_trainer_logprobs(model, tokenizer):
  """The trainer's log-probs of sampled tokens (update.make_score_fn, the `old_logprobs`)
  equal what the sampler reported while decoding with the KV cache."""
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, model.config, temperature=1.0,
                    stop_ids=(tokenizer.token_to_id(IM_END),))
  prompts = prompts_lib.load_prompts("task:arithmetic?n=3&seed=2&max_operand=99&tools=0")
  out = rollout_lib.generate_rollouts(sampler, params, prompts, tokenizer=tokenizer,
                                      config=rollout_lib.RolloutConfig(group_size=3,
                                                                       max_new_tokens=24),
                                      rng=jax.random.key(0))
  assert len(out) == 9 and all(len(c) > 0 for c in out.completion_ids)
  batch = rollout_lib.to_batch(out)
  sampler_lp = batch.pop("sampler_logprobs")
  g2, p2, f2 = nnx.split(model, nnx.Param, ...)
  trainer_lp, values = update_lib.make_score_fn(g2)(p2, f2, batch)
  assert values is None
  mask = batch["loss_mask"]
  assert mask.sum() == sum(len(c) for c in out.completion_ids)
  gap = np.max(np.abs(np.asarray(trainer_lp) - sampler_lp) * mask)
  assert gap < 1e-4, gap
  # The check can fail: a shifted alignment would compare different tokens.
  assert np.max(np.abs(np.roll(np.asarray(trainer_lp), 1, axis=1) - sampler_lp) * mask) > 1e-2


def test_samples_carry_answers_and_lengths(model, tokenizer):
  r = _rollouts(tool_rows=(1,))
  samples = r.samples()
  assert samples[0].answer == r.prompts[0].answer
  assert samples[1].num_tokens == 1   # 3 tokens, 2 from a tool


def _chain_model(chain, vocab=1024):
  """A tiny model that greedily writes `chain` over and over: the residual stream is just the
  token's embedding (attention and MLP outputs zeroed), a one-hot per chain token that the
  head maps to its successor; any other token (a prompt's, an injected one) leads to
  chain[0]."""
  import jax.numpy as jnp
  cfg = get_preset("tiny", vocab_size=vocab, max_seq_len=1024)
  model = transformer.create_model(cfg, seed=0)
  assert len(set(chain)) == len(chain) and len(chain) < cfg.embed_dim
  embed = np.zeros((vocab, cfg.embed_dim), np.float32)
  embed[:, 0] = 10.0
  head = np.zeros((cfg.embed_dim, vocab), np.float32)
  head[0, chain[0]] = 1.0
  for i, token in enumerate(chain):
    embed[token, 1 + i] = 10.0
    head[1 + i, chain[(i + 1) % len(chain)]] = 5.0
  model.embed[...] = jnp.asarray(embed)
  model.lm_head[...] = jnp.asarray(head)
  for layer in model.layers:
    layer.attn.o_proj[...] = jnp.zeros_like(layer.attn.o_proj[...])
    layer.mlp.down_proj[...] = jnp.zeros_like(layer.mlp.down_proj[...])
  return cfg, model


def test_search_protocol_rollouts_mask_the_passages(tmp_path):
  """rollout.protocol="search_r1" end to end on a real model that writes a search over and
  over: the first two searches get the passages injected (masked out of the loss by
  tool_mask), the third ends the row (max_searches); the config's checks name the fields.
  The tag is `tool_call` only because the bundled tokenizer has single ids for it, which
  the chain model needs (its successor map must be unambiguous)."""
  from wakea_jax.sampling.sampler import chat_sampler

  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"id": "Mirvale", "text": "Zorava Kelt was born in Mirvale."}\n'
                    '{"id": "Other", "text": "Nothing to see."}\n')
  with pytest.raises(ValueError, match="rollout.index"):
    rollout_lib.RolloutConfig(protocol="search_r1")
  with pytest.raises(ValueError, match="rollout.protocol"):
    rollout_lib.RolloutConfig(protocol="bing", index=str(corpus))
  with pytest.raises(FileNotFoundError, match="rollout.index"):
    rollout_lib.search_source(str(tmp_path / "missing"))
  tok = default_tokenizer()
  chain = tok.encode("<tool_call>Zorava Kelt</tool_call>")
  cfg, model = _chain_model(chain)
  graphdef, params = nnx.split(model)
  sampler = chat_sampler(graphdef, cfg, tok, temperature=0.0)
  config = rollout_lib.RolloutConfig(group_size=2, max_new_tokens=40, protocol="search_r1",
                                     index=str(corpus), max_searches=2, search_tokens=128,
                                     search_k=1, search_tag="tool_call")
  prompts = [prompts_lib.PromptRecord(
      messages=({"role": "user", "content": "Where was Zorava Kelt born?"},), answer="Mirvale")]
  out = rollout_lib.generate_rollouts(sampler, params, prompts, tokenizer=tok, config=config,
                                      rng=jax.random.key(0))
  block = ("<tool_call>Zorava Kelt</tool_call>\n\n<information>Doc 1 (Title: Mirvale) "
           "Zorava Kelt was born in Mirvale.</information>\n\n")
  assert out.texts[0] == block * 2 + "<tool_call>Zorava Kelt</tool_call>", out.texts[0]
  assert out.num_tool_calls == [2, 2] and out.stop_reason == ["stop_string"] * 2
  batch = rollout_lib.to_batch(out, pad_id=0)
  injected = int(out.tool_mask[0].sum())
  assert injected > 0
  assert batch["loss_mask"][0].sum() == len(out.completion_ids[0]) - injected
  np.testing.assert_array_equal(out.sampler_logprobs[0][out.tool_mask[0] == 1], 0.0)


def test_srl_rollouts_stop_at_the_end_of_the_first_step():
  """`generate_rollouts(stop=(srl.step_complete,))`, as the SRL learner calls it, on a model
  that writes a monologue and a step over and over: every row ends right after the step's
  line, on static and on continuous batching; without the stop it runs to max_new_tokens.
  The stop is for plain generation: with the tool loop it is refused."""
  from wakea_jax.rl import srl
  from wakea_jax.sampling.sampler import chat_sampler

  tok = default_tokenizer()
  step = "<think>a</think>Step 2: x=3\n"
  cfg, model = _chain_model(tok.encode(step))
  graphdef, params = nnx.split(model)
  sampler = chat_sampler(graphdef, cfg, tok, temperature=0.0)
  prompts = [prompts_lib.PromptRecord(messages=({"role": "user", "content": "Solve."},),
                                      answer="3")]
  for slots in (0, 2):
    config = rollout_lib.RolloutConfig(group_size=2, max_new_tokens=40, slots=slots,
                                       chunk_steps=8)
    out = rollout_lib.generate_rollouts(sampler, params, prompts, tokenizer=tok,
                                        config=config, rng=jax.random.key(0),
                                        stop=(srl.step_complete,))
    assert out.texts == [step] * 2 and out.stop_reason == ["stop_string"] * 2, out.texts
    assert [len(c) for c in out.completion_ids] == [len(tok.encode(step))] * 2
  free = rollout_lib.generate_rollouts(sampler, params, prompts, tokenizer=tok, config=config,
                                       rng=jax.random.key(0))
  assert free.texts[0].startswith(step * 2) and free.stop_reason == ["length"] * 2
  with pytest.raises(ValueError, match="`stop` applies to plain generation"):
    rollout_lib.generate_rollouts(
        sampler, params, prompts, tokenizer=tok, rng=jax.random.key(0),
        config=rollout_lib.RolloutConfig(group_size=2, max_tool_calls=1),
        router=object(), stop=(srl.step_complete,))


def test_greedy_rollouts_in_calls_of_batch_prompts(model, tmp_path):
  """greedy_rollouts samples `batch_prompts` prompts per call (the last call shorter): the
  same completions, in prompt order, as one call of every prompt."""
  from wakea_jax.checkpoints import export
  from wakea_jax.rl import evaluation
  export.save_model_dir(model, tmp_path / "model")
  prompts = prompts_lib.load_prompts("task:arithmetic?n=7&seed=4&max_operand=99&tools=0")
  rollout = rollout_lib.RolloutConfig(max_new_tokens=12)
  one = evaluation.greedy_rollouts(tmp_path / "model", prompts, rollout=rollout,
                                   batch_prompts=64)
  calls = evaluation.greedy_rollouts(tmp_path / "model", prompts, rollout=rollout,
                                     batch_prompts=3)
  assert [p.text for p in calls.prompts] == [p.text for p in prompts]
  assert calls.completion_ids == one.completion_ids
  assert len({tuple(c) for c in one.completion_ids}) > 1    # the prompts' completions differ
  with pytest.raises(ValueError, match="batch_prompts"):
    evaluation.greedy_rollouts(tmp_path / "model", prompts, rollout=rollout, batch_prompts=0)
