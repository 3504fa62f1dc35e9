"""The sample binary's run(): loads a checkpoint (ours or HF), renders prompts, samples."""

import pytest

from wakea_jax import sample
from wakea_jax.checkpoints import export, hf
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
