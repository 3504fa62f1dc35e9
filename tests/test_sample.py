"""The sample binary's run(): loads a checkpoint (ours or HF), renders prompts, samples."""

import pytest

from wakea_jax import sample
from wakea_jax.checkpoints import export, hf
from wakea_jax.data.tasks import multihop
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_sample_run_from_checkpoint(tmp_path, kind):
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512), seed=1)
  (export.save_model_dir if kind == "native" else hf.save_model)(model, tmp_path / "ckpt")
  transcripts, out = sample.run(str(tmp_path / "ckpt"), ["What is 2+2?", "Hi"],
                                max_new_tokens=6)
  assert len(transcripts) == 2 and transcripts[0].startswith("user: What is 2+2?\nassistant: ")
  assert all(len(t) >= 1 for t in out.tokens) and all(n.sum() <= 6 for n in
                                                        (1 - m for m in out.tool_mask))
  # Greedy is deterministic.
  again, _ = sample.run(str(tmp_path / "ckpt"), ["What is 2+2?", "Hi"], max_new_tokens=6)
  assert again == transcripts


def test_sample_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a wakea_jax model directory"):
    sample.run(str(tmp_path), ["x"])
  with pytest.raises(ValueError, match="no prompts"):
    sample.run(str(tmp_path), [])


def test_sample_searches_an_index(tmp_path, monkeypatch):
  """--index with --tools=search (Search-R1 over the corpus) or the retrieve tool; the
  protocol's mechanics are tested in tests/rl/test_rollout.py and sampling/test_protocols."""
  model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=1024),
                                   seed=1)
  export.save_model_dir(model, tmp_path / "ckpt")
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"id": "Mirvale", "text": "Zorava Kelt was born in Mirvale."}\n')
  with pytest.raises(ValueError, match="needs --index"):
    sample.run(str(tmp_path / "ckpt"), ["x"], tools=("search",))
  with pytest.raises(ValueError, match="use it alone"):
    sample.run(str(tmp_path / "ckpt"), ["x"], tools=("search", "calculator"),
               index=str(corpus))
  rendered = []
  render = sample.chat.render
  monkeypatch.setattr(sample.chat, "render",
                      lambda messages, *a, **k: (rendered.append(messages), render(
                          messages, *a, **k))[1])
  for tools in (("search",), ("rsearch",), ("retrieve",)):
    transcripts, out = sample.run(str(tmp_path / "ckpt"), ["Where was Zorava Kelt born?"],
                                  tools=tools, index=str(corpus), max_new_tokens=6,
                                  max_searches=1, search_tokens=64)
    assert transcripts[0].startswith("user: Where was Zorava Kelt born?\nassistant: ")
    assert len(out.tokens[0]) >= 1
  # A search protocol without --system gets the prompt the bundled task trains it with.
  assert [m[0]["content"] for m in rendered[:2]] == [multihop.SYSTEMS["search_r1"],
                                                     multihop.SYSTEMS["rsearch"]]
  assert rendered[2][0]["role"] == "user"
