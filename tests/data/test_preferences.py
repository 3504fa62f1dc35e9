"""Preference pairs: validation with locations, tokenisation, truncation, resumable batches."""

import json
import re

import numpy as np
import pytest

from wakea_jax.data import preferences as pref
from wakea_jax.data import sources
from wakea_jax.data import tokenizer as tokenizer_lib

GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.default_tokenizer()


def _jsonl(tmp_path, records, name="pairs.jsonl"):
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


@pytest.mark.parametrize("bad,field", [
    ({"prompt": "hi", "rejected": "no"}, "chosen"),
    ({"prompt": "hi", "chosen": "", "rejected": "no"}, "chosen"),
    ({"prompt": "hi", "chosen": "yes", "rejected": 3}, "rejected"),
    ({"prompt": "hi", "chosen": "yes", "rejected": "  "}, "rejected"),
    ({"prompt": 7, "chosen": "yes", "rejected": "no"}, "prompt"),
    ({"chosen": "yes", "rejected": "no"}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "chosen": "yes", "rejected": "no"}, "messages"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "no"},
     r"chosen\[0\].role"),
    ({"prompt": "hi", "chosen": {"role": "assistant", "content": 5}, "rejected": "no"},
     "chosen"),
])
def test_validation_errors_name_file_line_and_field(tmp_path, bad, field):
  path = _jsonl(tmp_path, [GOOD, bad])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: field '{field}"):
    pref.load_pairs(path)


def test_invalid_json_and_other_locations(tmp_path):
  path = _jsonl(tmp_path, [GOOD, "{not json"])
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: invalid JSON"):
    pref.load_pairs(path)
  json_path = tmp_path / "pairs.json"
  json_path.write_text(json.dumps([GOOD, {**GOOD, "chosen": None}]))
  with pytest.raises(ValueError, match=rf"{re.escape(str(json_path))}\[1\]: field 'chosen'"):
    pref.load_pairs(json_path)
  with pytest.raises(ValueError, match=r"^records\[1\]: field 'rejected' is missing"):
    pref.load_pairs([GOOD, {"prompt": "x", "chosen": "y"}])


def test_record_forms_and_identical_pairs_are_counted(tok):
  records = [
      GOOD,
      {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"}],
       "chosen": {"role": "assistant", "content": "Hello!"},
       "rejected": [{"role": "assistant", "content": "Go away."}]},
      {"prompt": "Same?", "system": "s", "chosen": "yes", "rejected": "yes"},
  ]
  dataset = pref.load_dataset(records, tok, seq_len=64)
  assert len(dataset) == 3 and dataset.stats["identical"] == 1
  assert dataset.origins == ["records[0]", "records[1]", "records[2]"]


def test_loss_mask_covers_only_the_response(tok):
  records = [{"messages": [{"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "earlier answer"},
                           {"role": "user", "content": "Q2"}],
              "chosen": "good reply", "rejected": "bad"}]
  dataset = pref.load_dataset(records, tok, seq_len=64)
  batch = dataset.batch([0])
  assert batch["input_ids"].shape == (2, 64) and batch["loss_mask"].dtype == np.float32
  for row, text in ((0, "good reply"), (1, "bad")):
    scored = batch["targets"][row][batch["loss_mask"][row] > 0]
    assert tok.decode(scored.tolist()) == text + "<|im_end|>"
    n = int((batch["targets"][row] != 0).sum())
    # next-token convention: targets are input_ids shifted by one
    np.testing.assert_array_equal(batch["input_ids"][row][1:n], batch["targets"][row][:n - 1])


def test_overlength_pairs_are_truncated_or_dropped_and_counted(tok):
  long = " ".join(["word"] * 60)
  records = [GOOD, {"prompt": "Hi", "chosen": long, "rejected": "short"},
             {"prompt": long, "chosen": "a", "rejected": "b"}]
  truncated = pref.load_dataset(records, tok, seq_len=32, overlength="truncate")
  assert truncated.stats == {"pairs": 2, "truncated": 1, "dropped": 1, "identical": 0,
                             "skipped_malformed": 0}
  row = truncated.batch([1])
  assert row["loss_mask"][0].sum() > 0 and row["loss_mask"][0][-1] == 1  # cut, still scored
  dropped = pref.load_dataset(records, tok, seq_len=32, overlength="drop")
  assert dropped.stats == {"pairs": 1, "truncated": 0, "dropped": 2, "identical": 0,
                           "skipped_malformed": 0}
  assert dropped.origins == ["records[0]"]
  with pytest.raises(ValueError, match="no preference pairs left"):
    pref.load_dataset(records[2:], tok, seq_len=32)


def test_iterator_resume_and_epoch_reshuffle(tok):
  dataset = pref.load_dataset("task:arithmetic?n=10&seed=0", tok, seq_len=32)
  it = pref.PreferenceIterator(dataset, batch_size=4, seed=3)
  first_epoch = np.concatenate([next(it)["pair_index"] for _ in range(5)])  # 20 = 2 epochs
  assert sorted(first_epoch[:10]) == list(range(10)) == sorted(first_epoch[10:])
  assert list(first_epoch[:10]) != list(first_epoch[10:])
  state = json.loads(json.dumps(it.get_state()))
  following = [next(it) for _ in range(4)]
  resumed = pref.PreferenceIterator(dataset, batch_size=4, seed=3)
  resumed.set_state(state)
  for a, b in zip(following, [next(resumed) for _ in range(4)]):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert it.stats["epoch"] == resumed.stats["epoch"] >= 2


def test_each_process_feeds_its_rows_of_the_global_batch(tok):
  # Two processes' rows, concatenated in process order, are the one-process batch: process
  # 0 holds the chosen sides of all 4 pairs, process 1 the rejected ones; per-pair fields
  # split by pair. A state saved on one process count resumes on another.
  dataset = pref.load_dataset("task:arithmetic?n=10&seed=0", tok, seq_len=32)
  one = pref.PreferenceIterator(dataset, batch_size=4, seed=3)
  two = [pref.PreferenceIterator(dataset, batch_size=4, seed=3, process_index=p,
                                 process_count=2) for p in range(2)]
  for _ in range(2):
    whole, parts = next(one), [next(it) for it in two]
    assert parts[0]["input_ids"].shape == (4, 32) and parts[0]["pair_index"].shape == (2,)
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  two[1].set_state(json.loads(json.dumps(one.get_state())))
  np.testing.assert_array_equal(next(two[1])["pair_index"], next(one)["pair_index"][2:])
  with pytest.raises(ValueError, match=r"data.batch_size=3 pairs .* divisible by the process "
                                       r"count 2"):
    pref.PreferenceIterator(dataset, batch_size=3, process_index=0, process_count=2)


def test_task_spec_and_files_load_the_same_pairs(tmp_path, tok):
  records = pref.arithmetic_pairs(6, seed=1)
  assert all(r["chosen"] != r["rejected"] for r in records)
  path = tmp_path / "pairs.jsonl"
  sources.write_jsonl(records, path)
  from_file = pref.load_dataset([str(path)], tok, seq_len=32)
  from_task = pref.load_dataset(["task:arithmetic?n=6&seed=1"], tok, seq_len=32)
  for k in from_file.arrays:
    np.testing.assert_array_equal(from_file.arrays[k], from_task.arrays[k])
  assert from_file.origins[2] == f"{path}:3"
