"""Tool loop: pause at a tool call, run the tool, inject the response, resume; masks and caps.

A scripted sampler stands in for the model so that the loop's bookkeeping is tested on
exact, known token streams; the cache-append path it relies on (Sampler.prefill with a row
mask, then decode) is pinned to the full forward in test_sampler.py, and the last test here
runs the loop on a real model end to end.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import real_models
from flax import nnx

from wakea_jax.data import chat
from wakea_jax.data.chat import tool_turn_ids
from wakea_jax.data.tokenizer import IM_END, HFTokenizer, default_tokenizer
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.models.layers import KVCache
from wakea_jax.sampling.sampler import STOP_ID, DecodeState, Sampler
from wakea_jax.sampling.tool_loop import run_tool_loop
from wakea_jax.toolbox.registry import default_router

TOK = default_tokenizer()
IM_END_ID = TOK.token_to_id(IM_END)
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "23*19"}}\n</tool_call>'


@dataclasses.dataclass
class ScriptedSampler:
  """Emits, per row, the ids of a list of turns; each turn ends with <|im_end|>."""
  turns: list[list[str]]
  stop_ids: tuple = (IM_END_ID,)
  pad_id: int = 0
  tok: object = TOK

  def __post_init__(self):
    self.queues = [[] for _ in self.turns]
    self.injected = [[] for _ in self.turns]

  def _load_next_turn(self, row):
    if self.turns[row]:
      self.queues[row] = self.tok.encode(self.turns[row].pop(0)) + [self.stop_ids[0]]

  mesh = None

  def to_device(self, x):
    return jnp.asarray(x)

  def inject(self, params, state, tokens, mask):
    cache, logits = self.prefill(params, state.cache, tokens, mask)
    resumed = jnp.asarray(np.asarray(mask).any(1))
    return state.replace(cache=cache, logits=jnp.where(resumed[:, None], logits, state.logits),
                         done=state.done & ~resumed,
                         stop_code=jnp.where(resumed, 0, state.stop_code))

  def start(self, params, prompts, *, max_new_tokens, rng, reserve=0):
    batch = len(prompts)
    for row in range(batch):
      self._load_next_turn(row)
    zeros = jnp.zeros((batch, 1, 4096, 2))   # [b, kv_heads, capacity, head_dim]
    cache = KVCache(keys=(zeros,), values=(zeros,),
                    end_index=jnp.asarray([len(p) for p in prompts], jnp.int32))
    return DecodeState(cache=cache, logits=jnp.zeros((batch, 4)),
                       tokens=jnp.zeros((batch, 64), jnp.int32), logprobs=jnp.zeros((batch, 64)),
                       processed_logprobs=jnp.zeros((batch, 64)),
                       num_generated=jnp.zeros((batch,), jnp.int32),
                       limit=jnp.full((batch,), max_new_tokens, jnp.int32),
                       done=jnp.zeros((batch,), bool), stop_code=jnp.zeros((batch,), jnp.int32),
                       step=jnp.zeros((), jnp.int32), keys=jnp.zeros((batch, 2), jnp.uint32))

  def decode(self, params, state, num_steps):
    tokens = np.zeros(state.tokens.shape, np.int32)
    logprobs = np.zeros(state.logprobs.shape, np.float32)
    done, count = np.asarray(state.done).copy(), np.asarray(state.num_generated).copy()
    codes, limit = np.asarray(state.stop_code).copy(), np.asarray(state.limit)
    end = np.asarray(state.cache.end_index).copy()
    for step in range(int(num_steps)):
      for row in range(len(done)):
        if done[row]:
          continue
        token = self.queues[row].pop(0)
        tokens[row, step], logprobs[row, step] = token, -0.5
        count[row] += 1
        end[row] += 1
        if token == self.stop_ids[0]:
          done[row], codes[row] = True, STOP_ID
        elif count[row] >= limit[row]:
          done[row] = True
    cache = dataclasses.replace(state.cache, end_index=jnp.asarray(end))
    return state.replace(cache=cache, tokens=jnp.asarray(tokens), logprobs=jnp.asarray(logprobs),
                         num_generated=jnp.asarray(count), done=jnp.asarray(done),
                         stop_code=jnp.asarray(codes))

  def prefill(self, params, cache, tokens, mask):
    mask = np.asarray(mask)
    for row in np.nonzero(mask.any(1))[0]:
      self.injected[row].append(np.asarray(tokens)[row][mask[row] == 1].tolist())
      self._load_next_turn(row)
    end = cache.end_index + jnp.asarray(mask.sum(1), jnp.int32)
    return dataclasses.replace(cache, end_index=end), jnp.zeros((mask.shape[0], 4))


def _prompt(text):
  return chat.render([{"role": "user", "content": text}], TOK,
                     add_generation_prompt=True).input_ids.tolist()


@pytest.mark.parametrize("kind,template,call,answer", [
    # Qwen3's template writes an (empty) think block in the final turn: the model does too.
    ("qwen3", None, CALL, "<think>\n\n</think>\n\nIt is 437."),
    ("llama3", "llama3_1",
     '{"name": "calculator", "parameters": {"expression": "23*19"}}', "It is 437.")])
def test_tool_loop_speaks_the_model_template(kind, template, call, answer, tmp_path):
  """An imported model's own tool syntax: its calls are parsed, the tool turn is the one its
  template renders in a whole conversation, and rows stop at its end-of-turn id."""
  tok = HFTokenizer(real_models.build_tokenizer(kind, tmp_path, chat_template_name=template))
  sampler = ScriptedSampler(turns=[[call, answer]], stop_ids=chat.chat_stop_ids(tok),
                            tok=tok)
  prompt = chat.render([{"role": "user", "content": "What is 23*19?"}], tok,
                       add_generation_prompt=True).input_ids.tolist()
  out = run_tool_loop(sampler, None, [prompt], tokenizer=tok, router=default_router(),
                      rng=jax.random.key(0), max_new_tokens=200)
  assert out.num_tool_calls == [1] and out.tool_errors == [0]
  assert sampler.injected[0] == [tool_turn_ids(["437"], tok)]
  full = chat.render([{"role": "user", "content": "What is 23*19?"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"name": "calculator", "arguments": {"expression": "23*19"}}]},
                      {"role": "tool", "content": "437"},
                      {"role": "assistant", "content": "It is 437."}], tok)
  # The whole transcript is what the template renders for the finished conversation.
  assert prompt + out.tokens[0] == full.input_ids.tolist()[:len(prompt) + len(out.tokens[0])]
  assert tok.decode(out.tokens[0]).endswith("It is 437." + chat.chat_template(tok).turn_end)


def test_tool_call_is_executed_injected_and_masked():
  sampler = ScriptedSampler(turns=[[CALL, "23 x 19 = 437."], ["Hello there."]])
  out = run_tool_loop(sampler, None, [_prompt("What is 23*19?"), _prompt("Hi")], tokenizer=TOK,
                      router=default_router(), rng=jax.random.key(0), max_new_tokens=200)
  # Row 0: call turn, tool turn (masked), answer turn.
  text = out.text(TOK, 0)
  assert text.count("<tool_response>") == 1 and "437" in text.split("<tool_response>")[1]
  assert text.endswith("23 x 19 = 437.<|im_end|>")
  expected_turn = tool_turn_ids(["437"], TOK)
  assert sampler.injected[0] == [expected_turn]
  mask = out.tool_mask[0]
  injected = [t for t, m in zip(out.tokens[0], mask) if m]
  assert injected == expected_turn
  assert (out.logprobs[0][mask == 1] == 0).all() and (out.logprobs[0][mask == 0] == -0.5).all()
  assert out.num_tool_calls == [1, 0] and out.stop_reason == ["stop_id", "stop_id"]
  # Row 1 never paused and never saw a tool turn.
  assert out.text(TOK, 1) == "Hello there.<|im_end|>" and not out.tool_mask[1].any()
  # The whole row is exactly what chat.render produces for the same conversation.
  rendered = chat.render([
      {"role": "user", "content": "What is 23*19?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"name": "calculator", "arguments": {"expression": "23*19"}}]},
      {"role": "tool", "content": "437"},
      {"role": "assistant", "content": "23 x 19 = 437."}], TOK)
  assert _prompt("What is 23*19?") + out.tokens[0] == rendered.input_ids.tolist()[:-1]


def test_malformed_call_and_failing_tool_become_error_responses():
  bad_json = "<tool_call>\n{not json}\n</tool_call>"
  bad_tool = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
  sampler = ScriptedSampler(turns=[[bad_json, bad_tool, "Sorry."]])
  out = run_tool_loop(sampler, None, [_prompt("x")], tokenizer=TOK, router=default_router(),
                      rng=jax.random.key(0))
  responses = out.text(TOK, 0).split("<tool_response>")[1:]
  assert "Error: malformed tool call" in responses[0] and "Error" in responses[1]
  assert out.num_tool_calls == [2] and out.text(TOK, 0).endswith("Sorry.<|im_end|>")


def test_tool_call_cap():
  sampler = ScriptedSampler(turns=[[CALL, CALL, CALL, "done"]])
  out = run_tool_loop(sampler, None, [_prompt("x")], tokenizer=TOK, router=default_router(),
                      rng=jax.random.key(0), max_tool_calls=2)
  assert out.num_tool_calls == [2]
  assert out.text(TOK, 0).count("<tool_call>") == 3  # the third call is not executed
  assert out.text(TOK, 0).count("<tool_response>") == 2


def test_real_model_pauses_injects_and_resumes_exactly():
  """End to end on a real model through the real KV cache. The model is rigged so that its
  next-token distribution puts most of its mass on `<tool_call>`,
  `</tool_call>` and `<|im_end|>`: it opens calls, ends turns, gets error responses injected
  into its cache, and resumes. Every model token's log-prob must equal a full forward over
  prompt + output (tool turns included), so the injected cache is exactly the one a plain
  forward would build."""
  cfg = get_preset("tiny", vocab_size=1024, max_seq_len=2048)
  model = transformer.create_model(cfg, seed=0)
  d0 = 0
  # A constant direction in the residual stream, which the head row d0 turns into a strong
  # bias; the rest of the hidden state still carries the context (weaker, but far above the
  # 1e-4 tolerance), so a wrong cache would show in the log-probs.
  model.embed[...] = model.embed[...].at[:, d0].add(10.0)
  favoured = [TOK.token_to_id("<tool_call>"), TOK.token_to_id("</tool_call>"), IM_END_ID]
  head = np.full(cfg.vocab_size, -8.0, np.float32)
  head[favoured] = [2.5, 0.5, 0.5]
  model.lm_head[...] = model.lm_head[...].at[d0].set(jnp.asarray(head) / np.sqrt(cfg.embed_dim))
  graphdef, params = nnx.split(model)
  sampler = Sampler(graphdef, cfg, temperature=1.0, stop_ids=(IM_END_ID,))
  prompts = [_prompt("What is 23*19?"), _prompt("Hi"), _prompt("Compute 2+2 please")]
  out = run_tool_loop(sampler, params, prompts, tokenizer=TOK, router=default_router(),
                      rng=jax.random.key(3), max_new_tokens=24, chunk_steps=4,
                      max_tool_calls=2, max_tool_tokens=64)
  assert sum(out.num_tool_calls) >= 1, out.num_tool_calls   # the injection path really ran
  resumed = [m for m in out.tool_mask if m.any() and not m[-1]]
  assert resumed, "no row generated after a tool turn"      # ... and the resume path too
  apply = jax.jit(transformer.apply, static_argnums=0)
  for row, prompt in enumerate(prompts):
    ids = prompt + out.tokens[row]
    logits = apply(graphdef, params, jnp.asarray([ids]))
    logp = jax.nn.log_softmax(logits[0, :-1], -1)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
    model_tokens = out.tool_mask[row] == 0
    np.testing.assert_allclose(out.logprobs[row][model_tokens],
                               np.asarray(logp)[len(prompt) - 1:][model_tokens], atol=1e-4)
    assert model_tokens.sum() <= 24
    if out.num_tool_calls[row]:
      assert "<tool_response>\nError: malform" in out.text(TOK, row)


def test_a_tool_turn_longer_than_its_budget_is_cut_and_never_hangs():
  """Result texts are shortened until the tool turn fits max_tool_tokens; below what the
  markup and "[truncated]" take, the ids are cut at the limit (this once looped forever)."""
  from wakea_jax.sampling.tool_loop import tool_turn
  tok = default_tokenizer()
  calls = [{"name": "calculator", "arguments": {"expression": "123456789*987654321"}}]
  full, errors = tool_turn(calls, default_router(), tok, 10_000)
  assert errors == 0 and tok.decode(full).count("121932631112635269") == 1
  for limit in (len(full) - 3, 12, 4, 1):
    ids, _ = tool_turn(calls, default_router(), tok, limit)
    assert 0 < len(ids) <= limit
  # The loops refuse such a budget up front, naming the setting.
  from wakea_jax.sampling.tool_loop import check_tool_budget
  minimum = len(chat.tool_turn_ids(["[truncated]"], tok))
  check_tool_budget(tok, minimum)
  with pytest.raises(ValueError, match=rf"max_tool_tokens={minimum - 1} is below the {minimum}"):
    check_tool_budget(tok, minimum - 1)
  sampler = ScriptedSampler(turns=[["Hello."]])
  with pytest.raises(ValueError, match="rollout.max_tool_tokens"):
    run_tool_loop(sampler, None, [[1, 2]], tokenizer=tok, router=default_router(),
                  rng=jax.random.key(0), max_tool_tokens=minimum - 1)


def test_the_cache_holds_a_padded_tool_turn_at_a_rows_end():
  """A tool turn is injected `pow2(len)` wide at the row's end index. With max_tool_tokens
  not a power of two the reserve must cover the padded width, or the real cache's write is
  clamped back onto the row's context: prompt 64, max_new 40, one call of max 24 tokens had
  a capacity of 128 (64 + pow2(40 + 24)); the 38-token call turn ends at 102, its 19-token
  tool turn pads to 32: 134 > 128. The scripted sampler's cache gets the capacity the real
  Sampler would (`Sampler.buckets`); the loop refuses a write that would be clamped."""
  from wakea_jax.sampling.tool_loop import tool_reserve

  class SizedCache(ScriptedSampler):
    def start(self, params, prompts, *, max_new_tokens, rng, reserve=0):
      state = super().start(params, prompts, max_new_tokens=max_new_tokens, rng=rng)
      rules = dataclasses.make_dataclass("R", [("min_prompt_bucket", int, 16)])()
      _, _, capacity = Sampler.buckets(rules, max(map(len, prompts)), max_new_tokens + reserve)
      zeros = jnp.zeros((len(prompts), 1, capacity, 2))
      return state.replace(cache=dataclasses.replace(state.cache, keys=(zeros,),
                                                     values=(zeros,)))

  assert tool_reserve(1, 24) == 32 and tool_reserve(3, 24) == 80 and tool_reserve(2, 64) == 128
  assert tool_reserve(0, 24) == 0
  prompt = _prompt("What is 23*19?")
  prompt = prompt[:1] + [prompt[1]] * (64 - len(prompt)) + prompt[1:]   # 64 tokens
  sampler = SizedCache(turns=[[CALL, ""]])
  out = run_tool_loop(sampler, None, [prompt], tokenizer=TOK, router=default_router(),
                      rng=jax.random.key(0), max_new_tokens=40, max_tool_calls=1,
                      max_tool_tokens=24)
  assert len(sampler.injected[0][0]) == 19 and out.num_tool_calls == [1]
  assert out.stop_reason == ["stop_id"] and "437" in out.text(TOK, 0)
