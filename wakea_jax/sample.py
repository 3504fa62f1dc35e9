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

Images and audio (a Hugging Face LLaVA or Qwen2-Audio directory: config.json model_type
"llava" or "qwen2_audio", with its preprocessor_config.json):

  python -m wakea_jax.sample --checkpoint=LLAVA_DIR --image=cat.png --prompt="What is this?"
  python -m wakea_jax.sample --checkpoint=QWEN2_AUDIO_DIR --audio=a.wav --audio=b.wav \
      --prompt="Which clip is louder, <audio> or <audio>?"

Each --image / --audio file goes with every prompt, in order. A prompt without the
placeholder strings (`<image>`, `<audio>`) gets one per file in front of its text; one that
has them must have one per file. The images are preprocessed as the checkpoint's
preprocessor_config.json says (data/images.py), the clips (16-bit PCM WAV at its sampling
rate, at most chunk_length seconds) become Whisper log-mel features (data/audio.py), and the
prompt is prefilled with them fused in (`Sampler.generate(media=)`). --tools defaults to
none with media (the bundled multimodal models were not trained to call tools); given, the
tool loop or search protocol runs on the media prompts as on text ones (a tool turn is text,
appended to the row's cache, which holds the media). Without --image / --audio such a
checkpoint samples text like any other.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from wakea_jax import logs
from wakea_jax.checkpoints import loader
from wakea_jax.data import chat
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data.audio import load_audio
from wakea_jax.data.tasks import multihop as multihop_task
from wakea_jax.data.tokenizer import Tokenizer, tokenizer_from
from wakea_jax.models.multimodal import AudioLanguageModel, VisionLanguageModel
from wakea_jax.rl.rollout import RolloutConfig, protocol_for
from wakea_jax.sampling.batching import ContinuousBatcher
from wakea_jax.sampling.media_inputs import load_checkpoint, media_inputs_for
from wakea_jax.sampling.sampler import Sampler, chat_sampler
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
  flags.DEFINE_list("tools", ["calculator"], "Enabled tools (empty: none; none by default "
                    "with --image / --audio).")
  flags.DEFINE_multi_string("image", [], "Image file for every prompt (repeat for several); "
                            "needs a LLaVA checkpoint (see the docstring).")
  flags.DEFINE_multi_string("audio", [], "16-bit PCM WAV clip for every prompt (repeat for "
                            "several); needs a Qwen2-Audio checkpoint.")
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

def media_inputs(model: nnx.Module, checkpoint: str, image_paths: Sequence[str],
                 audio_paths: Sequence[str]) -> tuple[mm_data.MediaConfig, dict[str, np.ndarray],
                                                      np.ndarray]:
  """The media of one prompt: (MediaConfig, arrays of the per-row layout without the row
  axis: pixel_values [k, 3, H, W] + image_mask [k], or input_features [k, mels, F] +
  feature_attention_mask [k, F], audio token counts [k]). app.UsageError when the model
  does not take that kind of media; errors name the file at fault."""
  if image_paths and not isinstance(model, VisionLanguageModel):
    raise app.UsageError(f"--image needs a vision-language checkpoint (an HF LLaVA directory, "
                         f"config.json model_type 'llava'); {checkpoint} holds a "
                         f"{type(model).__name__}")
  if audio_paths and not isinstance(model, AudioLanguageModel):
    raise app.UsageError(f"--audio needs an audio-language checkpoint (an HF Qwen2-Audio "
                         f"directory, config.json model_type 'qwen2_audio'); {checkpoint} holds "
                         f"a {type(model).__name__}")
  inputs = media_inputs_for(model, checkpoint, "--image" if image_paths else "--audio")
  if inputs.kind == "image":
    return inputs.config, inputs.images(image_paths), np.zeros((0,), np.int64)
  arrays, counts = inputs.clips([(load_audio(path, inputs.features), f"--audio: {path}")
                                 for path in audio_paths])
  return inputs.config, arrays, counts


def media_prompt_ids(text: str, system: str, tokenizer: Tokenizer, config: mm_data.MediaConfig,
                     *, images: int, audio_counts: np.ndarray, where: str = "the prompt",
                     tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
  """Prompt ids of a user message with `images` images and clips of `audio_counts` tokens:
  one placeholder string per item put in front of `text` unless it has them (then the
  counts must match, else app.UsageError naming `where`), placeholders expanded; `tools`:
  schemas rendered into the system turn, as `chat.render` does."""
  for placeholder, count, flag in ((config.image_placeholder, images, "--image"),
                                   (config.audio_placeholder, len(audio_counts), "--audio")):
    found = text.count(placeholder)
    if found == 0 and count:
      text = placeholder * count + "\n" + text
    elif found != count:
      raise app.UsageError(f"{where} has {found} {placeholder!r} placeholder(s) but {count} "
                           f"{flag} file(s) were given; write one per file, or none (they are "
                           "then put first)")
  messages = ([{"role": "system", "content": system}] if system else [])
  messages.append({"role": "user", "content": text})
  ids, mask = mm_data.tokenize(messages, tokenizer, config, tools=tools,
                               add_generation_prompt=True)
  ids, _ = mm_data.expand(ids, mask, config, image_count=images, audio_token_counts=audio_counts)
  return ids.tolist()


def _sample_media(sampler: Sampler, params: nnx.State, prompt_ids: list[list[int]],
                  media: dict[str, np.ndarray], *, seed: int, max_new_tokens: int
                  ) -> ToolLoopOutput:
  """Samples the prompts with their media (the per-row layout); the output in the tool
  loop's form (no tool turns)."""
  out = sampler.generate(params, prompt_ids, max_new_tokens=max_new_tokens,
                         rng=jax.random.key(seed), media=media)
  n = len(prompt_ids)
  return ToolLoopOutput(tokens=out.tokens, logprobs=out.logprobs,
                        tool_mask=[np.zeros(len(t), np.int32) for t in out.tokens],
                        num_tool_calls=[0] * n, tool_errors=[0] * n,
                        stop_reason=list(out.stop_reason))


def run(checkpoint: str, prompts: Sequence[str], *, tokenizer_path: str = "", system: str = "",
        tools: Sequence[str] | None = None, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, max_new_tokens: int = 128, max_tool_calls: int = 2,
        max_tool_tokens: int = 64, tool_schemas_in_prompt: bool = False, seed: int = 0,
        index: str = "", search_k: int = 3, max_searches: int = 4, search_tokens: int = 256,
        image_paths: Sequence[str] = (), audio_paths: Sequence[str] = ()
        ) -> tuple[list[str], ToolLoopOutput]:
  """Samples a reply for each prompt; returns (transcripts, raw output).

  `tools` None: the calculator, or none with media. `image_paths` / `audio_paths` go with
  every prompt (see the module docstring), tools and search protocols included."""
  if not prompts:
    raise ValueError("no prompts given (--prompt or --prompts_file)")
  with_media = bool(image_paths or audio_paths)
  if tools is None:
    tools = () if with_media else ("calculator",)
  protocols = [t for t in tools if t in SEARCH_PROTOCOLS]
  if protocols and (len(protocols) > 1 or len(tools) > 1):
    raise ValueError(f"--tools={','.join(tools)}: {protocols[0]} is a protocol of its own; "
                     "use it alone")
  if (protocols or "retrieve" in tools) and not index:
    raise ValueError(f"--tools={','.join(tools)} needs --index (an index directory or a "
                     "corpus to search)")
  tok = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
  model = load_checkpoint(checkpoint)
  media = media_inputs(model, checkpoint, image_paths, audio_paths) if with_media else None
  graphdef, params = nnx.split(model)
  router = default_router(enabled=tuple(t for t in tools if t not in SEARCH_PROTOCOLS),
                          retrieval_corpus=index or None)
  sampler = chat_sampler(graphdef, model.config, tok, model_source=f"--checkpoint {checkpoint}",
                         temperature=temperature, top_k=top_k, top_p=top_p)
  tool_schemas = (router.tool_schemas() if tools and tool_schemas_in_prompt and not protocols
                  else None)
  if protocols and not system:
    system = multihop_task.SYSTEMS[SEARCH_PROTOCOLS[protocols[0]]]
  rows = None   # the prompts' media in the per-row layout, one row per prompt
  if media is not None:
    media_config, arrays, audio_counts = media
    prompt_ids = [media_prompt_ids(text, system, tok, media_config, images=len(image_paths),
                                   audio_counts=audio_counts, where=f"prompt {i}",
                                   tools=tool_schemas)
                  for i, text in enumerate(prompts)]
    rows = {k: np.broadcast_to(v, (len(prompt_ids),) + v.shape) for k, v in arrays.items()}
  else:
    prompt_ids = []
    for text in prompts:
      messages = ([{"role": "system", "content": system}] if system else [])
      messages.append({"role": "user", "content": text})
      prompt_ids.append(chat.render(messages, tok, tools=tool_schemas,
                                    add_generation_prompt=True).input_ids.tolist())
  if rows is not None and not tools:
    out = _sample_media(sampler, params, prompt_ids, rows, seed=seed,
                        max_new_tokens=max_new_tokens)
  elif protocols:
    config = RolloutConfig(protocol=SEARCH_PROTOCOLS[protocols[0]], index=index,
                           search_k=search_k, max_searches=max_searches,
                           search_tokens=search_tokens)
    out = ContinuousBatcher(sampler, slots=len(prompt_ids)).run_protocol(
        params, prompt_ids, protocol_for(config, tok), rng=jax.random.key(seed),
        max_new_tokens=max_new_tokens, media=rows)
  else:
    out = run_tool_loop(sampler, params, prompt_ids, tokenizer=tok, router=router,
                        rng=jax.random.key(seed), max_new_tokens=max_new_tokens,
                        max_tool_calls=max_tool_calls, max_tool_tokens=max_tool_tokens,
                        media=rows)
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
  # --tools not given: run's default (the calculator, or none with media).
  tools = [t for t in FLAGS.tools if t] if FLAGS["tools"].present else None
  transcripts, out = run(FLAGS.checkpoint, prompts, tokenizer_path=FLAGS.tokenizer,
                         system=FLAGS.system, tools=tools, image_paths=FLAGS.image,
                         audio_paths=FLAGS.audio,
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
