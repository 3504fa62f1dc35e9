"""Tool-augmented decoding: pause a sequence at its tool call, run the tool, inject the result
into that sequence's KV cache, and resume it, while the rest of the batch keeps its state.

The loop drives `Sampler` in chunks. A row stops at the chat format's end-of-turn token
(`<|im_end|>` for ChatML and Qwen, `<|eot_id|>` for Llama 3) or eos; if the assistant turn it
just finished holds tool calls in the format's syntax (`chat.parse_turn_tool_calls`:
`<tool_call>` blocks, or a JSON call turn for Llama 3.1+) and the row has calls left, the host
runs each through the `Router` (a malformed call or a failing tool becomes an `Error: ...`
response the model sees), tokenises the tool turn exactly as `chat.render` would in a whole
conversation (`chat.tool_turn_ids`), for ChatML:

  <|im_end|>  \\n<|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n
  <|im_start|>assistant\\n

and appends it to that row's cache with `Sampler.prefill` under a row mask (other rows do
not move), then clears the row's done flag. Tool tokens are marked in `tool_mask` so that
RL can exclude them from the loss; their log-probs are 0.

Budgets: `max_new_tokens` counts model-generated tokens per row (tool tokens excluded);
`max_tool_calls` caps tool turns per row; each tool turn is cut to `max_tool_tokens` tokens
(the result text is truncated, the closing markup kept). The cache is sized for the prompt,
the generation budget and the tool-turn budget up front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wakea_jax.data import chat
from wakea_jax.data.tokenizer import Tokenizer
from wakea_jax.parallel import multihost
from wakea_jax.sampling.sampler import STOP_NONE, Sampler, round_pow2
from wakea_jax.toolbox.router import Router


@dataclasses.dataclass(frozen=True)
class ToolLoopOutput:
  """Per-row results of `run_tool_loop`: model and tool tokens interleaved in order.

  `logprobs` (float32) and `tool_mask` (int32) have one entry per token; a "capacity" stop
  means the next tool turn would not have fitted in the KV cache.
  """

  tokens: list[list[int]]         # per row: generated and injected tokens, in order
  logprobs: list[np.ndarray]      # per token; 0 for tool tokens
  tool_mask: list[np.ndarray]     # per token: 1 where the token came from a tool turn
  num_tool_calls: list[int]
  tool_errors: list[int]          # per row: tool results that were "Error: ..."
  stop_reason: list[str]          # "stop_id", "length", "capacity"

  def text(self, tokenizer: Tokenizer, row: int) -> str:
    """Decodes row `row`'s tokens, tool turns included, to text."""
    return tokenizer.decode(self.tokens[row])


# Calls run per assistant turn; more are answered with an error without running (a turn of
# hundreds of calls would otherwise run hundreds of sandboxes).
MAX_CALLS_PER_TURN = 8


def _results_for(calls: list[dict], router: Router) -> list[str]:
  results = []
  for index, call in enumerate(calls):
    if index >= MAX_CALLS_PER_TURN:
      results.append(f"Error: more than {MAX_CALLS_PER_TURN} tool calls in one turn; this one "
                     "was not run")
    elif "error" in call:
      results.append(f"Error: malformed tool call: {call['error']}")
    else:
      results.append(router.call_parsed(call).text)
  return results


def tool_turn(calls: list[dict], router: Router, tokenizer: Tokenizer, max_tool_tokens: int
              ) -> tuple[list[int], int]:
  """Runs one assistant turn's calls -> (the tool turn's token ids, cut to `max_tool_tokens`,
  and how many results were errors)."""
  results = _results_for(calls, router)
  errors = sum(r.startswith("Error:") for r in results)
  ids = _truncate_turn(chat.tool_turn_ids(results, tokenizer), results, tokenizer,
                       max_tool_tokens)
  return ids, errors


def last_turn(tokens: Sequence[int], tool_mask: Sequence[int]) -> list[int]:
  """The model tokens generated since the last tool turn (the current assistant turn)."""
  start = len(tokens)
  while start > 0 and not tool_mask[start - 1]:
    start -= 1
  return list(tokens[start:])


def _truncate_turn(ids: list[int], results: list[str], tokenizer: Tokenizer, limit: int
                   ) -> list[int]:
  """Cuts result texts until the tool turn fits `limit` tokens (markup is kept whole), then
  cuts the ids at `limit` when even "[truncated]" results do not fit (a small limit: the
  loop stops once no result can get shorter, where it used to spin forever)."""
  while len(ids) > limit and any(results):
    longest = max(range(len(results)), key=lambda i: len(results[i]))
    keep = max(0, len(results[longest]) * limit // len(ids) - 16)
    cut = results[longest][:keep] + " [truncated]" if keep else "[truncated]"
    if len(cut) >= len(results[longest]):
      break
    results[longest] = cut
    ids = chat.tool_turn_ids(results, tokenizer)
  return ids[:limit]


def tool_reserve(max_tool_calls: int, max_tool_tokens: int) -> int:
  """Cache slots (and decode columns) kept for a row's tool turns: each holds at most
  `max_tool_tokens` tokens, but the last is written `round_pow2` wide at the row's end
  index, so it needs the padded width (max_tool_calls x max_tool_tokens fell short when
  max_tool_tokens is not a power of two, and that write was clamped onto the row's context)."""
  if max_tool_calls <= 0:
    return 0
  return (max_tool_calls - 1) * max_tool_tokens + round_pow2(max_tool_tokens, 1)


def check_tool_budget(tokenizer: Tokenizer, max_tool_tokens: int) -> None:
  """ValueError unless a tool turn of `max_tool_tokens` holds the chat markup around a
  truncated result: below that, the turn would be cut inside its markup (losing the end of
  the tool message and the next generation prompt) and the model would go on writing inside
  the tool's message."""
  minimum = len(chat.tool_turn_ids(["[truncated]"], tokenizer))
  if max_tool_tokens < minimum:
    raise ValueError(f"max_tool_tokens={max_tool_tokens} is below the {minimum} tokens this "
                     "tokenizer's tool-turn markup takes around a truncated result; raise it "
                     "(rollout.max_tool_tokens, or --max_tool_tokens)")


def run_tool_loop(sampler: Sampler, params: nnx.State, prompts: Sequence[Sequence[int]], *,
                  tokenizer: Tokenizer, router: Router, rng: jax.Array,
                  max_new_tokens: int = 256, max_tool_calls: int = 4,
                  max_tool_tokens: int = 128, chunk_steps: int = 16,
                  media: Mapping[str, Any] | None = None) -> ToolLoopOutput:
  """Samples completions of `prompts` (ids ending with the assistant generation prompt),
  executing tool calls as they complete. See the module docstring. `media`: the prompts'
  images or audio (`Sampler.start(media=)`); tool turns are text, so only the prefill
  takes them."""
  turn_end = chat.end_of_turn_id(tokenizer)
  if turn_end not in sampler.stop_ids:
    raise ValueError(f"the sampler's stop_ids {sampler.stop_ids} must include the chat format's "
                     f"end-of-turn id {turn_end} (use chat.chat_stop_ids(tokenizer))")
  if max_tool_calls > 0:
    check_tool_budget(tokenizer, max_tool_tokens)
  batch = len(prompts)
  reserve = tool_reserve(max_tool_calls, max_tool_tokens)
  if isinstance(sampler, Sampler):   # (test doubles stand in for it) pack once, not per chunk
    sampler, params = sampler.with_packed_weights(params)
  # Only with media: samplers that take text alone (test doubles) keep their signature.
  state = sampler.start(params, prompts, max_new_tokens=max_new_tokens, reserve=reserve,
                        rng=rng, **({} if media is None else {"media": media}))
  rows = len(multihost.to_host(state.done))   # this process's rows, fillers included
  capacity = state.cache.capacity
  chunk = jnp.asarray(min(chunk_steps, state.tokens.shape[1]), jnp.int32)

  tokens: list[list[int]] = [[] for _ in range(batch)]
  logprobs: list[list[float]] = [[] for _ in range(batch)]
  tool_mask: list[list[int]] = [[] for _ in range(batch)]
  calls = [0] * batch
  errors = [0] * batch
  reason = [""] * batch
  # Every host decision below is this process's, about its own rows; the jitted calls are
  # collective, so whether to make one is agreed across processes (multihost.all_true).
  host = multihost.to_host({"done": state.done, "counts": state.num_generated})
  while True:
    was_active, before = ~host["done"][:batch], host["counts"][:batch]
    state = sampler.decode(params, state, chunk)
    host = multihost.to_host({"done": state.done, "counts": state.num_generated,
                              "tokens": state.tokens, "logprobs": state.logprobs,
                              "codes": state.stop_code, "end": state.cache.end_index})
    after = host["counts"][:batch]
    for row in np.nonzero(was_active)[0]:
      d = int(after[row] - before[row])   # an active row writes columns 0..d-1 of the chunk
      tokens[row] += host["tokens"][row, :d].tolist()
      logprobs[row] += host["logprobs"][row, :d].tolist()
      tool_mask[row] += [0] * d
    done, codes = host["done"][:batch], host["codes"][:batch]
    resume_rows, injections = [], []
    for row in np.nonzero(was_active & done)[0]:
      stopped_on_turn_end = (codes[row] != STOP_NONE and tokens[row]
                             and tokens[row][-1] == turn_end)
      turn = tokenizer.decode(last_turn(tokens[row], tool_mask[row]))
      found = chat.parse_turn_tool_calls(turn, tokenizer) if stopped_on_turn_end else []
      if not found:
        reason[row] = "stop_id" if codes[row] != STOP_NONE else "length"
        continue
      if calls[row] >= max_tool_calls or after[row] >= max_new_tokens:
        reason[row] = "length" if after[row] >= max_new_tokens else "stop_id"
        continue
      ids, failed = tool_turn(found, router, tokenizer, max_tool_tokens)
      errors[row] += failed
      if int(host["end"][row]) + len(ids) + (max_new_tokens - after[row]) > capacity:
        reason[row] = "capacity"
        continue
      calls[row] += 1
      tokens[row] += ids
      logprobs[row] += [0.0] * len(ids)
      tool_mask[row] += [1] * len(ids)
      resume_rows.append(row)
      injections.append(ids)
    if not multihost.all_true(not resume_rows):
      longest = multihost.global_max(max(map(len, injections), default=1))
      width = round_pow2(longest, 1)   # bucketed: few compiles
      # inject writes `width` slots at a resumed row's end index; past the capacity the write
      # would be clamped back onto the row's own context (tool_reserve sizes the cache so
      # that it never is).
      for row in resume_rows:
        if int(host["end"][row]) + width > capacity:
          raise RuntimeError(f"tool loop: row {row}'s tool turn ({width} slots at end index "
                             f"{int(host['end'][row])}) does not fit the cache of {capacity}")
      inject = np.full((rows, width), sampler.pad_id, np.int32)
      mask = np.zeros((rows, width), np.int32)
      for row, ids in zip(resume_rows, injections):
        inject[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
      state = sampler.inject(params, state, sampler.to_device(inject), sampler.to_device(mask))
      host["done"] = multihost.to_host(state.done)
    if multihost.all_true(host["done"].all()):
      break
    # Each chunk's columns are harvested above, so the buffers are reused from column 0 (a
    # row's keys follow its generated count, which goes on growing).
    state = state.replace(step=jnp.zeros((), jnp.int32))
  return ToolLoopOutput(
      tokens=tokens, logprobs=[np.asarray(lp, np.float32) for lp in logprobs],
      tool_mask=[np.asarray(m, np.int32) for m in tool_mask], num_tool_calls=calls,
      tool_errors=errors, stop_reason=[r or "length" for r in reason])
