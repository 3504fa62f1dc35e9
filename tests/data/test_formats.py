"""Data formats users already have: TRL's standard and conversational records, `datasets`
directories (save_to_disk, Hub-style folders), each with errors naming location and field."""

import json
import re
import socket

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wakea_jax.data import pipeline, records, sources
from wakea_jax.data import preferences as pref
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.rl import prompts as prompts_lib


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


# A conversational prompt whose own assistant turn is context, then the completion.
FEW_SHOT = {"prompt": [{"role": "system", "content": "Answer with a number."}, user("1+1?"),
                       assistant("2"), user("2+2?")],
            "completion": [assistant("4")]}
PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.default_tokenizer()


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
  """`datasets` must read directories without the network, even when not told to be offline
  (conftest sets HF_HUB_OFFLINE; it is undone here, so a Hub lookup would reach the socket and
  fail the test); its cache (a lock file per streamed folder) goes to tmp_path, not home."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _jsonl(path, lines):
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return path


def _trained_texts(batch, tok):
  """The decoded runs of trained targets of each row (one string per trained span)."""
  texts = []
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    run: list[int] = []
    for target, m in zip(targets.tolist(), mask.tolist()):
      if m:
        run.append(target)
      elif run:
        texts.append(tok.decode(run))
        run = []
    if run:
      texts.append(tok.decode(run))
  return texts


def _one_batch(spec, tok, **kwargs):
  config = pipeline.PipelineConfig(sources=(pipeline.SourceSpec(str(spec)),), seq_len=96,
                                   batch_size=1, packing=False, shuffle=False, num_epochs=1,
                                   prefetch_batches=0, **kwargs)
  return next(pipeline.build_pipeline(config, tok))


# ---- SFT record formats ------------------------------------------------------------------

def test_trl_standard_prompt_completion_is_a_chat():
  record = records.to_record({"prompt": "2+2?", "completion": "4", "system": "Be brief."}, "x")
  assert record == {"messages": [{"role": "system", "content": "Be brief."}, user("2+2?"),
                                 assistant("4")]}
  # Same as the older prompt/response form; extra Hub columns (ids, scores) are ignored.
  assert (records.to_record({"prompt": "2+2?", "response": "4", "id": 7}, "x")
          == records.to_record({"prompt": "2+2?", "completion": "4", "score": 0.5}, "x"))


def test_conversational_prompt_completion_trains_only_the_completion(tmp_path, tok):
  plain = {"prompt": [user("2+2?")], "completion": [assistant("4")], "tools": None}
  path = _jsonl(tmp_path / "pc.jsonl", [FEW_SHOT, plain])
  source = sources.read_file(path)
  # A prompt with an assistant turn keeps the prompt/completion split; one without is a chat.
  assert source.records == [FEW_SHOT, {"messages": [user("2+2?"), assistant("4")]}]
  assert source[0]["num_prompt_messages"] == 4 and source[1]["num_prompt_messages"] == 0
  assert source[0]["messages"] == FEW_SHOT["prompt"] + FEW_SHOT["completion"]
  sources.write_jsonl(source.records, tmp_path / "again.jsonl")
  assert sources.read_file(tmp_path / "again.jsonl").records == source.records

  # The prompt's assistant turn "2" is context: only the completion (and its <|im_end|>) is
  # trained on. The same conversation as "messages" trains both assistant turns.
  assert _trained_texts(_one_batch(path, tok), tok) == ["4<|im_end|>"]
  chat_path = _jsonl(tmp_path / "chat.jsonl",
                     [{"messages": FEW_SHOT["prompt"] + FEW_SHOT["completion"]}])
  assert _trained_texts(_one_batch(chat_path, tok), tok) == ["2<|im_end|>", "4<|im_end|>"]


def test_string_and_conversational_completions_give_the_same_tokens(tmp_path, tok):
  standard = _jsonl(tmp_path / "s.jsonl", [{"prompt": "2+2?", "completion": "4"}])
  conversational = _jsonl(tmp_path / "c.jsonl",
                          [{"prompt": [user("2+2?")], "completion": [assistant("4")]}])
  a, b = _one_batch(standard, tok), _one_batch(conversational, tok)
  for key in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(a[key], b[key])
  assert _trained_texts(a, tok) == ["4<|im_end|>"]


@pytest.mark.parametrize("record,match", [
    ({"prompt": [user("q")], "completion": [user("x")]},
     r"field 'completion\[0\].role' must be 'assistant'"),
    ({"prompt": [user("q"), assistant("a")], "completion": "x"},
     r"field 'prompt' must end before the assistant's answer"),
    ({"prompt": [{"role": "user", "content": 5}], "completion": "x"},
     r"field 'prompt\[0\].content' must be a string, got int"),
    ({"prompt": [{"role": "user", "contnet": "q"}], "completion": "x"},
     r"field 'prompt\[0\].contnet' is not a message field"),
    ({"prompt": [user("q"), 3], "completion": "x"},
     r"field 'prompt\[1\]' must be a message object"),
    ({"prompt": [], "completion": "x"}, r"field 'prompt' must be a non-empty list"),
    ({"prompt": 3, "completion": "x"}, r"field 'prompt' must be a string or a list of messages"),
    ({"prompt": "q", "completion": [assistant("a<|im_end|>")]},
     r"field 'completion\[0\].content' contains the turn delimiter"),
    ({"prompt": "q", "completion": [assistant("a"), {"role": "tool", "content": "r"},
                                    assistant("b")]},
     r"field 'completion\[1\]': tool result 1 answers no call"),
    ({"prompt": "q", "completion": [assistant("a"), user("u"), assistant("b")]},
     r"field 'completion\[1\].role' must be 'assistant' or 'tool' inside a response"),
    ({"prompt": "q", "completion": [{"role": "assistant", "content": "",
                                     "tool_calls": [{"arguments": {}}]}]},
     r"field 'completion\[0\].tool_calls\[0\].name'"),
    ({"prompt": "q", "completion": ""}, r"field 'completion' must be a non-empty string"),
    ({"prompt": "q", "completion": 3}, r"field 'completion' must be a non-empty string, an "
                                       r"assistant message or a list of messages, got int"),
    ({"prompt": "q", "completion": "a", "response": "b"},
     r"give field 'completion' or field 'response', not both"),
    ({"prompt": [user("q")], "system": "s", "completion": "a"},
     r"field 'system' goes with a string 'prompt'"),
    ({"completion": "a"}, r"field 'prompt' is missing"),
    ({"prompt": "q"}, r"field 'completion' \(or 'response'\) is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, r"a preference pair .* is not an SFT record"),
    ({"text": "The sky is blue."}, r"field 'text' \(TRL's standard language-modeling form\)"),
    ({"question": "q", "answer": "a"},
     r"matches no record schema \(fields \['answer', 'question'\]\); accepted: 'messages' "
     r"\(\+ 'tools'\); 'prompt' \+ 'completion'"),
])
def test_bad_prompt_completion_records_name_line_and_field(tmp_path, record, match):
  path = _jsonl(tmp_path / "bad.jsonl", [FEW_SHOT, record])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: {match}"):
    sources.read_file(path)


def test_skip_and_count_covers_the_new_formats(tmp_path):
  path = _jsonl(tmp_path / "mixed.jsonl", [FEW_SHOT, {"prompt": "q", "completion": ""},
                                           {"prompt": "q", "completion": "a"}, {"text": "x"}])
  source = sources.read_file(path, on_error="skip_and_count")
  assert source.origins == [f"{path}:1", f"{path}:3"]
  assert [s.split(": field")[0] for s in source.skipped] == [f"{path}:2", f"{path}:4"]


# ---- `datasets` directories ----------------------------------------------------------------

ROWS = [FEW_SHOT, {"prompt": [user("3+3?")], "completion": [assistant("6")]},
        {"prompt": "5+5?", "completion": "10"}]


def _with_bad(rows, bad, at):
  return rows[:at] + [bad] + rows[at:]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
  single = tmp_path / "single"
  # One column type per field: the string-prompt row goes to its own dataset below.
  datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(single))
  loaded = sources.load_source(str(single))
  assert loaded.records == sources.read_file(_jsonl(tmp_path / "x.jsonl", ROWS[:2])).records
  assert loaded.origins == [f"{single}[0]", f"{single}[1]"]

  both = tmp_path / "dict"
  datasets.DatasetDict({
      "train": datasets.Dataset.from_list(ROWS[2:] * 3),
      "test": datasets.Dataset.from_list(_with_bad([ROWS[2]], {"prompt": "q", "completion": " "},
                                                   1))}).save_to_disk(str(both))
  train = sources.load_source(str(both))  # the "train" split by default
  assert len(train) == 3 and train.origins[2] == f"{both}[train][2]"
  assert train.name == str(both)
  with pytest.raises(ValueError, match=rf"^{re.escape(str(both))}\[test\]\[1\]: field "
                                       r"'completion' must be a non-empty string"):
    sources.load_source(f"{both}?split=test")
  test = sources.load_source(f"{both}?split=test", on_error="skip_and_count")
  assert test.origins == [f"{both}[test][0]"] and len(test.skipped) == 1

  for spec, match in [
      (f"{single}?split=test", "a Dataset saved with save_to_disk has no splits"),
      (f"{both}?split=dev", r"no split 'dev'; splits: \['train', 'test'\]"),
      (f"{both}?config=x", "has no configs"),
      (f"{both}?shard=1", r"unknown option\(s\) \['shard'\]"),
      (f"{both}?split=a&split=b", "option 'split' must be given once"),
  ]:
    with pytest.raises(ValueError, match=match):
      sources.load_source(spec)


CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]}
WITH_TOOLS = {"prompt": [user("2+2?")],
              "completion": [CALL, {"role": "tool", "content": "4"}, assistant("It is 4.")]}


def test_hub_style_parquet_folder(tmp_path):
  folder = tmp_path / "hub"
  (folder / "data").mkdir(parents=True)
  # Arrow gives every message every key (tool_calls: null on most); the nulls are dropped.
  pq.write_table(pa.Table.from_pylist(ROWS[:2] + [WITH_TOOLS]),
                 folder / "data" / "train-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist(_with_bad(ROWS[1:2], {"prompt": [user("q")],
                                                            "completion": [user("x")]}, 0)),
                 folder / "data" / "test-00000-of-00001.parquet")
  train = sources.load_source(str(folder))
  assert train.records == sources.read_file(_jsonl(tmp_path / "x.jsonl",
                                                   ROWS[:2] + [WITH_TOOLS])).records
  assert train.origins == [f"{folder}[train][{i}]" for i in range(3)]
  with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}\[test\]\[0\]: field "
                                       r"'completion\[0\].role' must be 'assistant'"):
    sources.load_source(f"{folder}?split=test")


def test_hub_style_jsonl_folder_with_readme_configs(tmp_path):
  folder = tmp_path / "cards"
  (folder / "shards").mkdir(parents=True)
  (folder / "README.md").write_text(
      "---\nconfigs:\n- config_name: default\n  data_files:\n"
      "  - split: validation\n    path: shards/val-*.jsonl\n"
      "  - split: test\n    path: holdout.jsonl\n---\n# A dataset card\n")
  _jsonl(folder / "shards" / "val-0.jsonl", [ROWS[2], ROWS[2]])
  _jsonl(folder / "shards" / "val-1.jsonl", [{"prompt": "q", "completion": "a<|im_end|>"}])
  _jsonl(folder / "holdout.jsonl", [ROWS[2]])
  with pytest.raises(ValueError, match=r"splits \['validation', 'test'\] and none is 'train'; "
                                       r"choose one with '.*cards\?split=NAME'"):
    sources.load_source(str(folder))
  assert len(sources.load_source(f"{folder}?split=test")) == 1
  # Rows count across the split's files: the third row is the first of val-1.jsonl.
  with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}\[validation\]\[2\]: field "
                                       r"'completion' contains the turn delimiter"):
    sources.load_source(f"{folder}?split=validation")


def test_unreadable_directories_and_specs(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"empty: cannot load the data folder with "
                                       r"datasets.load_dataset"):
    sources.load_source(str(empty))
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "state.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"damaged: cannot load the saved dataset"):
    sources.load_source(str(damaged))
  (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
  with pytest.raises(ValueError, match=r"a.jsonl\?split=test: options such as '\?split=' are "
                                       "for dataset directories"):
    sources.load_source(f"{tmp_path / 'a.jsonl'}?split=test")
  with pytest.raises(FileNotFoundError, match=r"nowhere: data source does not exist"):
    sources.load_source(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"nowhere: data source does not exist"):
    sources.load_source(f"{tmp_path / 'nowhere'}?split=train")


def test_a_loading_script_in_a_data_folder_is_never_run(tmp_path):
  folder = tmp_path / "evil"
  folder.mkdir()
  marker = tmp_path / "ran"
  (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
  _jsonl(folder / "train.jsonl", [ROWS[2]])
  with pytest.raises(ValueError, match="cannot load the data folder"):
    sources.load_source(str(folder))
  assert not marker.exists()


def test_config_data_sources_can_name_dataset_directories(tmp_path, tok):
  from wakea_jax import config_lib
  from wakea_jax.config_files import get_config
  saved = tmp_path / "saved"
  datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[2:] * 4),
                        "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(saved))
  config = get_config("sft:test", **{"data.sources": ((str(saved), 1.0),),
                                     "data.eval_sources": ((f"{saved}?split=test", 1.0),)})
  data = config_lib.run_config(config).data
  assert data.sources == ((str(saved), 1.0),)
  batch = next(pipeline.build_pipeline(pipeline.pipeline_config(data), tok))
  assert batch["loss_mask"].sum() > 0
  evals = pipeline.make_eval_batches(pipeline.pipeline_config(data, eval_split=True), tok)
  assert len(evals) == 1 and evals[0]["loss_mask"].sum() > 0


# ---- preference pairs ----------------------------------------------------------------------

def test_preference_formats_give_the_same_pair():
  expected = {"prompt": [user("2+2?")], "chosen": [assistant("4")],
              "rejected": [assistant("5")]}
  forms = [
      PAIR,  # standard, explicit prompt
      {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
      {"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
      # UltraFeedback-binarized: a string prompt and "messages" beside whole conversations.
      {"prompt": "2+2?", "messages": [user("2+2?"), assistant("4")], "score_chosen": 9.0,
       "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
  ]
  for form in forms:
    assert pref.to_pair(form, "x") == expected, form


def test_implicit_prompt_extraction():
  system = {"role": "system", "content": "s"}
  call = {"role": "assistant", "content": "",
          "tool_calls": [{"name": "calculator", "arguments": {"expression": "2+2"}}]}
  result = {"role": "tool", "content": "4"}
  # Multi-turn: the prompt is everything up to the first differing message.
  prompt, responses = pref.extract_prompt(
      [system, user("a"), assistant("b"), user("c"), assistant("good")],
      [system, user("a"), assistant("b"), user("c"), assistant("bad")], "x")
  assert prompt == [system, user("a"), assistant("b"), user("c")]
  assert responses == {"chosen": [assistant("good")], "rejected": [assistant("bad")]}
  # A shared tool call and its result are prompt (context), as in TRL.
  prompt, responses = pref.extract_prompt([user("q"), call, result, assistant("It is 4.")],
                                          [user("q"), call, result, assistant("Five.")], "x")
  assert prompt == [user("q"), call, result]
  assert responses == {"chosen": [assistant("It is 4.")], "rejected": [assistant("Five.")]}
  # A prefix ending with an assistant turn is cut before it: that turn starts both responses.
  prompt, responses = pref.extract_prompt([user("q"), call, result, assistant("It is 4.")],
                                          [user("q"), call, {**result, "content": "5"},
                                           assistant("It is 5.")], "x")
  assert prompt == [user("q")]
  assert responses["chosen"] == [call, result, assistant("It is 4.")]
  # Identical conversations: a pair without a preference, counted by the dataset.
  prompt, responses = pref.extract_prompt([user("q"), assistant("a")],
                                          [user("q"), assistant("a")], "x")
  assert prompt == [user("q")] and responses["chosen"] == responses["rejected"]


@pytest.mark.parametrize("record,match", [
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]},
     r"fields 'chosen' and 'rejected' differ from their first message"),
    ({"chosen": [user("q")], "rejected": [user("q"), assistant("b")]},
     r"field 'chosen' has no response after the prompt it shares"),
    ({"chosen": [user("q"), assistant("a"), user("u1"), assistant("b")],
      "rejected": [user("q"), assistant("a"), user("u2"), assistant("c")]},
     r"field 'chosen\[2\].role' must be 'assistant' or 'tool' inside a response"),
    ({"chosen": [user("q"), assistant("a"), 7], "rejected": [user("q"), assistant("b")]},
     r"field 'chosen\[2\]' must be a message object"),
    ({"prompt": [user("q")], "chosen": [user("q"), assistant("a")],
      "rejected": [user("q"), assistant("b")]}, r"field 'prompt' is a message list"),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     r"field 'prompt' is missing \(string or single-turn"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "x", "rejected": "y"},
     r"field 'prompt' must end before the assistant's answer"),
    ({"prompt": [user("q")], "chosen": [assistant("a"), user("x"), assistant("b")],
      "rejected": "y"}, r"field 'chosen\[1\].role' must be 'assistant' or 'tool'"),
    ({"chosen": [user("q"), {"role": "assistant", "content": "a<|im_end|>"}],
      "rejected": [user("q"), assistant("b")]}, r"field 'chosen' \(with the prompt\)"),
])
def test_bad_preference_records_name_line_and_field(tmp_path, record, match):
  path = _jsonl(tmp_path / "pairs.jsonl", [PAIR, record])
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: {match}"):
    pref.load_pairs(path)


def test_implicit_prompt_masks_only_the_responses(tok):
  record = {"chosen": [user("q"), assistant("shared"), user("again"), assistant("good one")],
            "rejected": [user("q"), assistant("shared"), user("again"), assistant("bad")]}
  dataset = pref.load_dataset([record, {**record, "rejected": record["chosen"]}], tok,
                              seq_len=64)
  assert dataset.stats["identical"] == 1
  batch = dataset.batch([0])
  for row, text in ((0, "good one"), (1, "bad")):
    scored = batch["targets"][row][batch["loss_mask"][row] > 0]
    assert tok.decode(scored.tolist()) == text + "<|im_end|>"


def test_preference_pairs_from_dataset_directories_and_skip_and_count(tmp_path, tok):
  conversational = [{"chosen": [user(f"{i}+{i}?"), assistant(str(2 * i))],
                     "rejected": [user(f"{i}+{i}?"), assistant(str(2 * i + 1))]}
                    for i in range(4)]
  saved = tmp_path / "pairs"
  datasets.DatasetDict({"train": datasets.Dataset.from_list(conversational)}).save_to_disk(
      str(saved))
  pairs, origins, skipped = pref.load_pairs(str(saved))
  assert len(pairs) == 4 and origins[3] == f"{saved}[train][3]" and not skipped
  assert pairs[1]["prompt"] == [user("1+1?")] and pairs[1]["rejected"] == [assistant("3")]

  folder = tmp_path / "hub"
  (folder / "data").mkdir(parents=True)
  bad = {"chosen": [user("q"), assistant("a")], "rejected": [user("x"), assistant("b")]}
  pq.write_table(pa.Table.from_pylist(_with_bad(conversational, bad, 2)),
                 folder / "data" / "train-00000-of-00001.parquet")
  with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}\[train\]\[2\]: fields "
                                       r"'chosen' and 'rejected' differ"):
    pref.load_pairs(str(folder))
  dataset = pref.load_dataset([str(folder)], tok, seq_len=32, on_error="skip_and_count")
  assert len(dataset) == 4 and dataset.stats["skipped_malformed"] == 1


# ---- RL prompts ----------------------------------------------------------------------------

def test_rl_prompt_only_records_standard_conversational_and_from_directories(tmp_path):
  rows = [{"prompt": "2+2?", "answer": "4"},
          {"prompt": [{"role": "system", "content": "s"}, user("3+3?")], "answer": "6",
           "level": 1}]
  path = _jsonl(tmp_path / "prompts.jsonl", rows)
  loaded = prompts_lib.load_prompts(str(path))
  assert loaded[1].messages == tuple(rows[1]["prompt"]) and loaded[1].answer == "6"
  assert loaded[1].meta == {"level": 1}
  saved = tmp_path / "saved"
  datasets.Dataset.from_list(rows[1:] * 2).save_to_disk(str(saved))
  from_dir = prompts_lib.load_prompts(str(saved))
  assert [r.origin for r in from_dir] == [f"{saved}[0]", f"{saved}[1]"]
  assert from_dir[0].messages == loaded[1].messages
  bad = _jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": [user("q"), assistant("a")]}])
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'prompt' must end before"):
    prompts_lib.load_prompts(str(bad))
  assert len(prompts_lib.load_prompts(str(bad), on_error="skip_and_count")) == 1
