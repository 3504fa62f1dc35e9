"""Local stand-ins for the real Qwen3, Qwen2.5 and Llama 3.x tokenizers, chat templates and
(tiny-depth) transformers models, so tests can exercise "real model" code paths without a
download (issue 12).

    from real_models import build_tokenizer, build_model   # tests/ is on sys.path under pytest

* `build_tokenizer(kind, directory)` writes a transformers-loadable tokenizer directory whose
  structure is the real one: ByteLevel BPE with the real pre-tokenizer regex, normalizer,
  decoder and post-processor, the real number of regular tokens, the real added tokens at
  their real ids with their real `special` flags, the real bos/eos/pad/unk settings and the
  real chat template (verbatim, from `tests/chat_templates/`).
* `build_model(kind, directory, num_layers=2)` writes a complete local HF model directory
  (config.json, generation_config.json, model.safetensors and the tokenizer files): a seeded
  random `Qwen3ForCausalLM` / `Qwen2ForCausalLM` / `LlamaForCausalLM` of the real width, head
  layout, rope settings, tied embeddings and (padded) vocabulary, but only `num_layers` layers.
* `cached_tokenizer_dir(kind)` / `cached_model_dir(kind)` build once per process into a
  temporary directory (removed at exit) and return it; treat those directories as read-only.

What differs from the real tokenizers (nothing downloadable is bundled):
* The regular vocabulary and merges are synthetic: the 256 ByteLevel byte symbols (ids 0..255
  in GPT-2 order, as in the real files), then the merges a BPE trainer learns from
  `wakea_jax/data/assets/corpus.txt` (pairs seen at least twice) under the real pre-tokenizer,
  then deterministic filler merges (an existing token + one ASCII letter) up to exactly the
  real count. English text therefore splits into multi-character tokens, but the ids of
  ordinary words are not the real ids and the filler tokens are not real words.
* Decoding inverts encoding exactly for any text the normalizer leaves alone: Qwen's real
  tokenizer NFC-normalizes its input (so only NFC text round-trips), and Llama 3's real
  tokenizer_config sets clean_up_tokenization_spaces=true (decode with
  clean_up_tokenization_spaces=False to invert, as with the real one).

Sources of the templates in tests/chat_templates/ (byte-for-byte; keep them verbatim). "llama.cpp"
is the mirror github.com/ye-NX/llama.cpp @ 1eeb523c3e0c7ffbd59469f5463dcbdecba3535e, whose
models/templates/*.jinja files are fetched from the hub's tokenizer_config.json files; "gorilla"
is github.com/ShishirPatil/gorilla, berkeley-function-call-leaderboard/bfcl/model_handler/.
* qwen3.jinja: Qwen/Qwen3-0.6B's chat_template as on the hub after its post-release update
  (`message.content is string` checks, `reasoning_content is string`), JSON-decoded from the
  verbatim copy of that tokenizer_config.json field (cited as .../Qwen/Qwen3-0.6B/blob/main/
  tokenizer_config.json#L230) in github.com/Zerohertz/zerohertz.github.io,
  source/_posts/vllm-openai-2.md @ c6bf3b1c95df5f3aea320a1455ea09bde28fca0a; equal to the copy
  in gorilla local_inference/qwen.py @ d04871ebc4b59fcd8dcb1a7f20b2396e0f471aed (docstring, less
  its 8-space indent). The release-day version (April 2025; the same output for string
  contents) is llama.cpp's models/templates/Qwen-Qwen3-0.6B.jinja.
* qwen2_5.jinja: llama.cpp models/templates/Qwen-Qwen2.5-7B-Instruct.jinja (last changed in
  8b576b6c55bc4e6be898b47522f0ef402b93ef62; Qwen2.5-Instruct shares it across sizes); equal to
  the JSON-decoded "chat_template" line in gorilla local_inference/qwen.py @
  6069becee01b7672ae0b5d579a91fde82b32b48e.
* llama3_1.jinja: llama.cpp models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja (same
  commit; identical to its Llama-3.3-70B-Instruct file); equal to the JSON-decoded
  "chat_template" line in gorilla oss_model/llama.py @ 796385cb020f55d8289c0d6085b4b931bc0465b2.
* llama3_2.jinja: llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja (same
  commit): the Llama-3.2-Instruct template, whose date defaults to strftime_now("%d %b %Y"),
  i.e. today; "llama3" tokenizers use llama3_1.jinja unless `chat_template_name` says otherwise.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

KINDS = ("qwen3", "qwen2_5", "llama3")
TEMPLATES_DIR = Path(__file__).resolve().parent / "chat_templates"
CORPUS_PATH = Path(__file__).resolve().parents[1] / "wakea_jax" / "data" / "assets" / "corpus.txt"

# The real pre-tokenizer regexes (Qwen2's splits digits one by one, Llama 3's in groups of 3).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5 / Qwen3 added tokens from id 151643 on, with their real `special` flags.
_QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),                                      # Qwen2.5 ends here (151664)
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
    ("</think>", False),                                          # Qwen3 ends here (151668)
]
_QWEN_ADDITIONAL_SPECIAL = [t for t, special in _QWEN_ADDED[1:14] if special]


def _llama3_added() -> list[tuple[str, bool]]:
  """Llama 3.1 / 3.2 / 3.3's 256 special tokens, ids 128000..128255, all special."""
  named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
           "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
  reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(named))]
  return [(t, True) for t in named + reserved]


# Per kind: what the real tokenizer directory and model config hold.
SPECS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        model_id="Qwen/Qwen3-0.6B", regex=QWEN2_REGEX, regular=151_643,
        added=_QWEN_ADDED, template="qwen3", eos="<|im_end|>", pad="<|endoftext|>", bos=None,
        generation=dict(bos_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
                        pad_token_id=151643, temperature=0.6, top_k=20, top_p=0.95),
        config=dict(
            architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
            attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, head_dim=128,
            hidden_act="silu", hidden_size=1024, initializer_range=0.02, intermediate_size=3072,
            max_position_embeddings=40960, max_window_layers=28, num_attention_heads=16,
            num_hidden_layers=28, num_key_value_heads=8, rms_norm_eps=1e-6, rope_scaling=None,
            rope_theta=1_000_000.0, sliding_window=None, tie_word_embeddings=True,
            use_cache=True, use_sliding_window=False, vocab_size=151_936)),
    "qwen2_5": dict(
        model_id="Qwen/Qwen2.5-0.5B-Instruct", regex=QWEN2_REGEX, regular=151_643,
        added=_QWEN_ADDED[:22], template="qwen2_5", eos="<|im_end|>", pad="<|endoftext|>",
        bos=None,
        generation=dict(bos_token_id=151643, pad_token_id=151643, do_sample=True,
                        eos_token_id=[151645, 151643], repetition_penalty=1.1,
                        temperature=0.7, top_p=0.8, top_k=20),
        config=dict(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0,
            bos_token_id=151643, eos_token_id=151645, hidden_act="silu", hidden_size=896,
            initializer_range=0.02, intermediate_size=4864, max_position_embeddings=32768,
            max_window_layers=21, num_attention_heads=14, num_hidden_layers=24,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
            sliding_window=32768, tie_word_embeddings=True, use_cache=True,
            use_sliding_window=False, vocab_size=151_936)),
    "llama3": dict(
        model_id="meta-llama/Llama-3.2-1B-Instruct", regex=LLAMA3_REGEX, regular=128_000,
        added=_llama3_added(), template="llama3_1", eos="<|eot_id|>", pad=None,
        bos="<|begin_of_text|>",
        generation=dict(bos_token_id=128000, do_sample=True, eos_token_id=[128001, 128008, 128009],
                        temperature=0.6, top_p=0.9),
        config=dict(
            architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
            attention_dropout=0.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
            head_dim=64, hidden_act="silu", hidden_size=2048, initializer_range=0.02,
            intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False,
            num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8,
            pretraining_tp=1, rms_norm_eps=1e-5,
            rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                              original_max_position_embeddings=8192, rope_type="llama3"),
            rope_theta=500_000.0, tie_word_embeddings=True, use_cache=True,
            vocab_size=128_256)),
}


# No regular token spells an added token (the real vocabularies do not either).
_FORBIDDEN = frozenset(t for spec in SPECS.values() for t, _ in spec["added"])


def _spec(kind: str) -> dict[str, Any]:
  if kind not in SPECS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
  return SPECS[kind]


def added_tokens(kind: str) -> dict[int, str]:
  """The real added (special) tokens of `kind`, by id."""
  spec = _spec(kind)
  return {spec["regular"] + i: t for i, (t, _) in enumerate(spec["added"])}


def chat_template(name: str) -> str:
  """The verbatim chat template `name` ("qwen3", "qwen2_5", "llama3_1", "llama3_2")."""
  path = TEMPLATES_DIR / f"{name}.jinja"
  if not path.is_file():
    names = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
    raise ValueError(f"no chat template {name!r}; have {names}")
  return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------
# The synthetic regular vocabulary
# ------------------------------------------------------------------------------------------

@functools.cache
def _byte_symbols() -> tuple[str, ...]:
  """GPT-2's ByteLevel symbols in vocab order: the printable bytes, then the rest (256+n)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in printable]
  return tuple([chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))])


@functools.cache
def _regular_bpe(regex: str, count: int, forbidden: frozenset[str]
                 ) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
  """(tokens by id, merges by rank) of a `count`-token ByteLevel BPE (see the module doc)."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trainer = trainers.BpeTrainer(vocab_size=count, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([CORPUS_PATH.read_text(encoding="utf-8")], trainer=trainer)
  learned = json.loads(tok.to_str())["model"]["merges"]

  tokens = list(_byte_symbols())
  known = set(tokens)
  merges: list[tuple[str, str]] = []

  def add(a: str, b: str) -> None:
    merges.append((a, b))
    if a + b not in known:
      known.add(a + b)
      tokens.append(a + b)

  for merge in learned:
    a, b = merge.split(" ") if isinstance(merge, str) else merge
    if len(tokens) < count and a in known and b in known and a + b not in forbidden:
      add(a, b)
  # Filler: extend tokens (learned ones first, then the filler itself) by one ASCII letter.
  letters = [chr(c) for c in [*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1)]]
  i = len(_byte_symbols())
  while len(tokens) < count:
    base = tokens[i]
    for c in letters:
      if len(tokens) == count:
        break
      if base + c not in known and base + c not in forbidden:
        add(base, c)
    i += 1
  return tuple(tokens), tuple(merges)


# ------------------------------------------------------------------------------------------
# Tokenizer directories
# ------------------------------------------------------------------------------------------

def _added_entry(content: str, special: bool, token_id: int | None = None) -> dict[str, Any]:
  entry = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False, "special": special}
  if token_id is None:
    return entry
  # tokenizer.json's field order.
  return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
          "rstrip": False, "normalized": False, "special": special}


def _bytelevel(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict[str, Any]:
  return {"type": "ByteLevel", "add_prefix_space": add_prefix_space,
          "trim_offsets": trim_offsets, "use_regex": use_regex}


@functools.cache
def _tokenizer_json(kind: str) -> str:
  """The tokenizer.json text of `kind`: the real pipeline around the synthetic BPE."""
  spec = _spec(kind)
  tokens, merges = _regular_bpe(spec["regex"], spec["regular"], _FORBIDDEN)
  added = [_added_entry(t, s, spec["regular"] + i) for i, (t, s) in enumerate(spec["added"])]
  split = {"type": "Split", "pattern": {"Regex": spec["regex"]}, "behavior": "Isolated",
           "invert": False}
  vocab = {t: i for i, t in enumerate(tokens)}
  merge_strings = [f"{a} {b}" for a, b in merges]
  if kind.startswith("qwen"):
    pipeline = {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence",
                          "pretokenizers": [split, _bytelevel(False, False, False)]},
        "post_processor": _bytelevel(False, False, False),
        "decoder": _bytelevel(False, False, False),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                  "merges": merge_strings}}
  else:
    bos = spec["bos"]
    bos_id = spec["regular"]
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    pipeline = {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence",
                          "pretokenizers": [split, _bytelevel(False, True, False)]},
        "post_processor": {"type": "Sequence",
                           "processors": [_bytelevel(True, False, True), template]},
        "decoder": _bytelevel(True, True, True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merge_strings}}
  doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         **pipeline}
  return json.dumps(doc, ensure_ascii=False, indent=2)


def _tokenizer_config(kind: str, template: str) -> dict[str, Any]:
  spec = _spec(kind)
  decoder = {str(spec["regular"] + i): _added_entry(t, s) for i, (t, s) in
             enumerate(spec["added"])}
  if kind.startswith("qwen"):
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(_QWEN_ADDITIONAL_SPECIAL), "bos_token": None,
        "chat_template": template, "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"], "errors": "replace", "model_max_length": 131072,
        "pad_token": spec["pad"], "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
  return {
      "added_tokens_decoder": decoder, "bos_token": spec["bos"], "chat_template": template,
      "clean_up_tokenization_spaces": True, "eos_token": spec["eos"],
      "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
      "tokenizer_class": "PreTrainedTokenizerFast"}


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build_tokenizer(kind: str, directory: str | Path, *, chat_template_name: str | None = None,
                    write_vocab_files: bool = True) -> Path:
  """Writes the tokenizer files of `kind` ("qwen3", "qwen2_5", "llama3") into `directory`.

  tokenizer.json, tokenizer_config.json (with the chat template: the kind's own unless
  `chat_template_name` names another file of tests/chat_templates/) and generation_config.json;
  Qwen kinds also get vocab.json and merges.txt (unless `write_vocab_files` is False), the
  Llama kind special_tokens_map.json, as in the real repositories. Returns the directory.
  """
  spec = _spec(kind)
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  text = _tokenizer_json(kind)
  (directory / "tokenizer.json").write_text(text, encoding="utf-8")
  template = chat_template(chat_template_name or spec["template"])
  _write_json(directory / "tokenizer_config.json", _tokenizer_config(kind, template))
  _write_json(directory / "generation_config.json", spec["generation"])
  if kind.startswith("qwen"):
    if write_vocab_files:
      tokens, merges = _regular_bpe(spec["regex"], spec["regular"], _FORBIDDEN)
      (directory / "vocab.json").write_text(
          json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False,
                     separators=(",", ":")), encoding="utf-8")
      (directory / "merges.txt").write_text(
          "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  else:
    entry = lambda t: {k: v for k, v in _added_entry(t, True).items() if k != "special"}
    _write_json(directory / "special_tokens_map.json",
                {"bos_token": entry(spec["bos"]), "eos_token": entry(spec["eos"])})
  return directory


# ------------------------------------------------------------------------------------------
# Model directories
# ------------------------------------------------------------------------------------------

def model_config(kind: str, *, num_layers: int = 2, **overrides: Any) -> dict[str, Any]:
  """The real config.json fields of `kind`'s model with `num_layers` layers (and overrides)."""
  config = json.loads(json.dumps(_spec(kind)["config"]))
  config["num_hidden_layers"] = num_layers
  config.update(overrides)
  return config


def build_model(kind: str, directory: str | Path, *, num_layers: int = 2, seed: int = 0,
                dtype: str = "float32", tokenizer: bool = True, **config_overrides: Any) -> Path:
  """Writes a random `num_layers`-layer model of `kind`'s real shape, like a downloaded one.

  The model is Qwen3-0.6B ("qwen3"), Qwen2.5-0.5B-Instruct ("qwen2_5") or Llama-3.2-1B-Instruct
  ("llama3") in width, heads, rope (Llama 3.2's "llama3" rope scaling included), tied
  embeddings and vocab_size, saved with `save_pretrained` (safetensors, `dtype`) next to the
  tokenizer files of `build_tokenizer` (unless `tokenizer` is False). Every parameter is drawn
  from a `seed`ed generator: matrices and biases N(0, 0.02), norm weights 1 + N(0, 0.02), so
  that a wrongly mapped tensor changes the logits. Returns the directory.
  """
  import torch
  import transformers

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  values = model_config(kind, num_layers=num_layers, **config_overrides)
  model_type = values.pop("model_type")
  values.pop("architectures")
  config = transformers.AutoConfig.for_model(model_type, **values)
  torch_dtype = getattr(torch, dtype)
  try:
    from transformers.initialization import no_init_weights
  except ImportError:  # older transformers: initialise twice, slower but the same result
    import contextlib
    no_init_weights = contextlib.nullcontext
  with no_init_weights():
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
  model.tie_weights()
  generator = torch.Generator().manual_seed(seed)
  std = float(values.get("initializer_range", 0.02))
  with torch.no_grad():
    for name, param in model.named_parameters():  # tied parameters come once
      param.normal_(0.0, std, generator=generator)
      if name.endswith("norm.weight"):
        param.add_(1.0)
  if tokenizer:
    build_tokenizer(kind, directory)
  # After the tokenizer: save_pretrained's generation_config.json (with its version) wins.
  model.generation_config = transformers.GenerationConfig(**_spec(kind)["generation"])
  model.save_pretrained(directory)
  return directory


# ------------------------------------------------------------------------------------------
# Per-process caches
# ------------------------------------------------------------------------------------------

@functools.cache
def _cache_root() -> Path:
  root = Path(tempfile.mkdtemp(prefix="wakea_real_models_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return root


@functools.cache
def cached_tokenizer_dir(kind: str) -> Path:
  """`build_tokenizer(kind, ...)` once per process, in a temporary directory (read-only)."""
  return build_tokenizer(kind, _cache_root() / f"tokenizer-{kind}")


@functools.cache
def cached_model_dir(kind: str, num_layers: int = 2, seed: int = 0) -> Path:
  """`build_model(kind, ...)` once per process, in a temporary directory (read-only)."""
  return build_model(kind, _cache_root() / f"model-{kind}-{num_layers}-{seed}",
                     num_layers=num_layers, seed=seed)
