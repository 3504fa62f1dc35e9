r"""Sampling binary: chat with a checkpoint, with tools executed as the model calls them.

  python -m wakea_jax.sample --checkpoint=/tmp/wakea_quickstart/export/model \
      --prompt="What is 23*19? Use the calculator."
  python -m wakea_jax.sample --checkpoint=DIR --prompts_file=prompts.txt --temperature=0.7 \
      --top_p=0.9 --tools=calculator,python --max_new_tokens=256

  python -m wakea_jax.sample --checkpoint=DIR --index=INDEX_DIR --tools=search \
      --prompt="In which city is the organisation that Zorava Kelt works for located?"

--checkpoint is a wakea_jax model directory (model_config.json; e.g. the trainer's
export/model) or a Hugging Face directory (config.json). One prompt per line in
--prompts_file; they are sampled as one batch.

--index is an index directory (`python -m wakea_jax.build_index`) or a corpus file or
directory (BM25). `--tools=search` runs the Search-R1 protocol over it (the model writes
`<search>query</search>`, the passages come back as `<information>...</information>`),
`--tools=rsearch` the R-Search query DAGs (sources "Local" and "BM25"); with the chat tools
(`--tools=retrieve,...`) it is the `retrieve` tool's corpus.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
from absl import app, flags
from flax import nnx

from wakea_jax import logs
from wakea_jax.checkpoints import loader
from wakea_jax.data import chat
from wakea_jax.data.tasks import multihop as multihop_task
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.rl.rollout import RolloutConfig, protocol_for
from wakea_jax.sampling.batching import ContinuousBatcher
from wakea_jax.sampling.sampler import chat_sampler
from wakea_jax.sampling.tool_loop import ToolLoopOutput, run_tool_loop
from wakea_jax.toolbox.registry import default_router

# --tools names that are search protocols (rl/rollout.py) rather than chat tools.
SEARCH_PROTOCOLS = {"search": "search_r1", "rsearch": "rsearch"}

# Flags are defined when run as a binary only: other binaries (convert) define --checkpoint
# too, and tests import both modules into one process.
FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Model directory (ours or Hugging Face).")
  flags.DEFINE_string("tokenizer", "", "Tokenizer path; empty: the bundled one.")
  flags.DEFINE_string("prompt", "", "A single user prompt.")
  flags.DEFINE_string("prompts_file", "", "One user prompt per line.")
  flags.DEFINE_string("system", "", "Optional system message. With --tools=search or rsearch "
                      "and none given: the protocol's prompt the bundled multi-hop task trains "
                      "with (data/tasks/multihop.py SYSTEMS).")
  flags.DEFINE_list("tools", ["calculator"], "Enabled tools (empty: none).")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "0 disables.")
  flags.DEFINE_float("top_p", 1.0, "1 disables.")
  flags.DEFINE_integer("max_new_tokens", 128, "Model tokens per sequence.")
  flags.DEFINE_integer("max_tool_calls", 2, "Tool calls per sequence.")
  flags.DEFINE_integer("max_tool_tokens", 64, "Tokens per injected tool turn.")
  flags.DEFINE_bool("tool_schemas_in_prompt", False,
                    "Render the enabled tools' JSON schemas into the system prompt (Qwen style); "
                    "off for models trained without them.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("index", "", "Index directory or corpus to search (see the docstring).")
  flags.DEFINE_integer("search_k", 3, "Passages per search (search protocols).")
  flags.DEFINE_integer("max_searches", 4, "Searches per reply (search protocols).")
  flags.DEFINE_integer("search_tokens", 256, "Token cap of one injected results block "
                       "(search protocols; the trained rollout.search_tokens).")

def run(checkpoint: str, prompts: Sequence[str], *, tokenizer_path: str = "", system: str = "",
        tools: Sequence[str] = ("calculator",), temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, max_new_tokens: int = 128, max_tool_calls: int = 2,
        max_tool_tokens: int = 64, tool_schemas_in_prompt: bool = False, seed: int = 0,
        index: str = "", search_k: int = 3, max_searches: int = 4, search_tokens: int = 256
        ) -> tuple[list[str], ToolLoopOutput]:
  """Samples a reply for each prompt; returns (transcripts, raw output)."""
  if not prompts:
    raise ValueError("no prompts given (--prompt or --prompts_file)")
  protocols = [t for t in tools if t in SEARCH_PROTOCOLS]
  if protocols and (len(protocols) > 1 or len(tools) > 1):
    raise ValueError(f"--tools={','.join(tools)}: {protocols[0]} is a protocol of its own; "
                     "use it alone")
  if (protocols or "retrieve" in tools) and not index:
    raise ValueError(f"--tools={','.join(tools)} needs --index (an index directory or a "
                     "corpus to search)")
  tok = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
  try:
    model = loader.load_model(checkpoint)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--checkpoint: {e}") from None
  graphdef, params = nnx.split(model)
  router = default_router(enabled=tuple(t for t in tools if t not in SEARCH_PROTOCOLS),
                          retrieval_corpus=index or None)
  sampler = chat_sampler(graphdef, model.config, tok, model_source=f"--checkpoint {checkpoint}",
                         temperature=temperature, top_k=top_k, top_p=top_p)
  tool_schemas = (router.tool_schemas() if tools and tool_schemas_in_prompt and not protocols
                  else None)
  if protocols and not system:
    system = multihop_task.SYSTEMS[SEARCH_PROTOCOLS[protocols[0]]]
  prompt_ids = []
  for text in prompts:
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": text})
    prompt_ids.append(chat.render(messages, tok, tools=tool_schemas,
                                  add_generation_prompt=True).input_ids.tolist())
  if protocols:
    config = RolloutConfig(protocol=SEARCH_PROTOCOLS[protocols[0]], index=index,
                           search_k=search_k, max_searches=max_searches,
                           search_tokens=search_tokens)
    out = ContinuousBatcher(sampler, slots=len(prompt_ids)).run_protocol(
        params, prompt_ids, protocol_for(config, tok), rng=jax.random.key(seed),
        max_new_tokens=max_new_tokens)
  else:
    out = run_tool_loop(sampler, params, prompt_ids, tokenizer=tok, router=router,
                        rng=jax.random.key(seed), max_new_tokens=max_new_tokens,
                        max_tool_calls=max_tool_calls, max_tool_tokens=max_tool_tokens)
  transcripts = [f"user: {p}\nassistant: {out.text(tok, i)}" for i, p in enumerate(prompts)]
  return transcripts, out


def main(argv: Sequence[str]) -> None:
  """Samples and prints a transcript per prompt."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required")
  logs.quiet_library_logs()
  prompts = [FLAGS.prompt] if FLAGS.prompt else []
  if FLAGS.prompts_file:
    lines = pathlib.Path(FLAGS.prompts_file).read_text(encoding="utf-8").splitlines()
    prompts += [line for line in lines if line.strip()]
  transcripts, out = run(FLAGS.checkpoint, prompts, tokenizer_path=FLAGS.tokenizer,
                         system=FLAGS.system, tools=[t for t in FLAGS.tools if t],
                         temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                         max_new_tokens=FLAGS.max_new_tokens, max_tool_calls=FLAGS.max_tool_calls,
                         max_tool_tokens=FLAGS.max_tool_tokens,
                         tool_schemas_in_prompt=FLAGS.tool_schemas_in_prompt, seed=FLAGS.seed,
                         index=FLAGS.index, search_k=FLAGS.search_k,
                         max_searches=FLAGS.max_searches, search_tokens=FLAGS.search_tokens)
  for transcript, calls, reason in zip(transcripts, out.num_tool_calls, out.stop_reason):
    print(transcript)
    print(f"[{calls} tool call(s), stopped: {reason}]\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
