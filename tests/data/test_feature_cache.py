"""Stored encoder features in the batch pipeline: each row takes its own record's cached row
(by record index, through shuffle, repeat and resume) and the media are not decoded."""

import json

import numpy as np
import pytest

from wakea_jax.data import audio, feature_cache, media_batches, multimodal
from wakea_jax.data.tokenizer import default_tokenizer

RATE = 8000
FEATURES = audio.FeatureConfig(feature_size=8, sampling_rate=RATE, hop_length=80,
                               chunk_length=1, n_fft=160)
MEDIA = multimodal.MediaConfig(audio=FEATURES, audio_token_id=1024)
TOKENS = 25   # 100 frames -> 50 after the stride-2 conv -> 25 after the pool


def _source(tmp_path, n=6):
  records = []
  for i in range(n):
    t = np.arange(int((0.3 + 0.1 * i) * RATE)) / RATE     # clips of distinct token counts
    audio.write_wav(tmp_path / f"{i}.wav", 0.3 * np.sin(2 * np.pi * 440 * t), RATE)
    records.append({"messages": [{"role": "user", "content": "<audio>Tone?"},
                                 {"role": "assistant", "content": f"tone {i}"}],
                    "audios": [f"{i}.wav"]})
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return multimodal.load_source(tmp_path / "train.jsonl", MEDIA)


def _cache(tmp_path, source):
  """Record i's features are all i; its mask holds its clip's real token count."""
  writer = feature_cache.SplitWriter(tmp_path / "cache", "train", "audio", len(source),
                                     (1, TOKENS, 3), (1, TOKENS))
  for i in range(len(source)):
    frames = multimodal.decode_media(source[i], MEDIA)["feature_attention_mask"]
    mask = np.zeros((1, 1, TOKENS), np.int32)
    mask[0, 0, :multimodal.audio_token_counts(frames, MEDIA)[0]] = 1
    writer.write(i, np.full((1, 1, TOKENS, 3), i, np.float32), mask)
  return writer.finish({"source": source.name})


def test_rows_take_their_records_cached_features_and_resume(tmp_path):
  source = _source(tmp_path)
  cached = _cache(tmp_path, source)
  assert feature_cache.open_split(tmp_path / "cache", "train", len(source)) == cached
  assert feature_cache.open_split(tmp_path / "cache", "eval", len(source)) is None
  with pytest.raises(ValueError, match=r"train.json: the cached split has 6 records"):
    feature_cache.open_split(tmp_path / "cache", "train", 7)
  for i in range(len(source)):                 # the clips decode no more: the cache answers
    (tmp_path / f"{i}.wav").unlink()
  batching = media_batches.MediaBatchConfig(seq_len=48, batch_size=4, max_audios=1, seed=3)
  tokenizer = default_tokenizer()
  first = media_batches.MediaBatchIterator(source, tokenizer, MEDIA, batching, cached=cached)
  seen = set()
  for _ in range(3):                           # 12 rows: two epochs of 6 records, shuffled
    batch = next(first)
    assert set(batch) == set(media_batches.TOKEN_KEYS) | {"audio_tower_features",
                                                          "audio_tower_mask"}
    for row in range(4):
      record = int(batch["audio_tower_features"][row, 0, 0, 0])
      seen.add(record)
      ids = batch["input_ids"][row]
      real = (ids != 1024) & (batch["segment_ids"][row] > 0)
      text = tokenizer.decode([int(t) for t in ids[real]])
      assert f"tone {record}" in text, (record, text)        # the record's own features
      assert (batch["input_ids"][row] == 1024).sum() == batch["audio_tower_mask"][row].sum()
      np.testing.assert_array_equal(batch["audio_tower_mask"][row],
                                    cached.row(record)["audio_tower_mask"])
  assert seen == set(range(6))
  state = first.get_state()
  want = [next(first) for _ in range(2)]
  second = media_batches.MediaBatchIterator(source, default_tokenizer(), MEDIA, batching,
                                            cached=cached)
  second.set_state(state)
  for expected in want:
    got = next(second)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_packed_rows_take_each_records_cached_features_in_segment_order(tmp_path):
  """With packing, a row's cached clips are its segments' own, in order: the features of
  clip k hold the record whose text is in segment k."""
  source = _source(tmp_path)
  cached = _cache(tmp_path, source)
  batching = media_batches.MediaBatchConfig(seq_len=96, batch_size=2, max_audios=3, seed=3,
                                            packing=True)
  tokenizer = default_tokenizer()
  batch = next(media_batches.MediaBatchIterator(source, tokenizer, MEDIA, batching,
                                                cached=cached))
  most = 0
  for row in range(2):
    segments = [s for s in np.unique(batch["segment_ids"][row]) if s > 0]
    most = max(most, len(segments))
    for k, segment in enumerate(segments):
      record = int(batch["audio_tower_features"][row, k, 0, 0])
      ids = batch["input_ids"][row]
      text = tokenizer.decode([int(t) for t in ids[(batch["segment_ids"][row] == segment)
                                                   & (ids != 1024)]])
      assert f"tone {record}" in text, (record, text)
      np.testing.assert_array_equal(batch["audio_tower_mask"][row, k],
                                    cached.row(record)["audio_tower_mask"][0])
    assert not batch["audio_tower_mask"][row, len(segments):].any()
  assert most >= 2
