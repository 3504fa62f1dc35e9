"""The search RL demonstration's pipeline end to end, shrunk (configs/search_demo.py:test): the
index, the teacher data of four prompt formats, the task tokenizer, SFT, GRPO with each search
protocol, the held-out evaluation of every arm and the table; a re-run skips what is done.

The learning figures come from the full run documented in the README (minutes, not a test).
"""

import json

import pytest

from configs import search_demo as search_demo_config
from wakea_jax import search_demo
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.rl import prompts as prompts_lib
from wakea_jax.rl import rollout as rollout_lib


@pytest.mark.slow
def test_search_demo_pipeline(tmp_path, capsys):
  config = search_demo_config.get_config("test")
  results = search_demo.run(config, tmp_path)
  arms = [r["arm"] for r in results["rows"]]
  assert arms == ["direct", "rag", "sft_search_r1", "sft_rsearch", "grpo_search_r1",
                  "grpo_rsearch"]
  for row in results["rows"]:
    assert 0.0 <= row["accuracy"] <= 1.0 and row["questions"] == 4
  # Every searching arm, SFT and GRPO alike, reads as many passages per search as the
  # teacher's dialogues showed (the rollout config's default is another number).
  assert config.search_k != rollout_lib.RolloutConfig().search_k
  assert [r.get("search_k") for r in results["rows"]] == [None, None] + [config.search_k] * 4
  for row in results["rows"]:   # the R-Search arms report the three components
    if row["arm"].endswith("rsearch"):
      assert {"dag_validity", "dag_format", "answer_accuracy"} <= set(row)
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
  table = (tmp_path / "results.md").read_text()
  assert "| (d) GRPO, Search-R1 | 0 |" in table and "vs (b) RAG" in table
  assert "(d) GRPO, Search-R1" in capsys.readouterr().out
  assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")

  # The task tokenizer spells the task's words in fewer pieces than the bundled one.
  text = "Brejan Bran was born in the city of Nobei."
  assert (len(tokenizer_from(str(tmp_path / "tokenizer.model")).encode(text))
          < len(tokenizer_from("").encode(text)))
  # The held-out prompts of every format ask the same questions, in the same order.
  prepared = search_demo.prepare(config, tmp_path)
  formats = {fmt: prompts_lib.load_prompts(spec) for fmt, spec in prepared.eval_prompts.items()}
  questions = {fmt: [(p.messages[-1]["content"].splitlines()[-1], p.answer) for p in records]
               for fmt, records in formats.items()}
  assert len(questions["rag"]) == 4 and all(p.meta["hop_type"] == "two_hop"
                                            for p in formats["rag"])
  assert all(q == questions["rag"] for q in questions.values())
  # The SFT run's evaluation data are teacher dialogues for those same held-out questions, so
  # its eval loss measures copying unseen names, not memorising training ones.
  sft_eval = [json.loads(line) for line in open(prepared.sft_eval, encoding="utf-8")]
  assert [r["messages"][1]["content"] for r in sft_eval] == [q for q, _ in questions["rag"]]
  sft_config = json.loads((tmp_path / "sft" / "config.json").read_text())
  assert sft_config["data"]["eval_sources"] == [[prepared.sft_eval, 1.0]]

  # Re-running trains nothing again (every stage's checkpoint is there).
  logged = {run: (tmp_path / run / "metrics.jsonl").read_text()
            for run in ("sft", "search_r1_seed0", "rsearch_seed0")}
  again = search_demo.run(config, tmp_path)
  assert all((tmp_path / run / "metrics.jsonl").read_text() == text
             for run, text in logged.items())
  assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in results["rows"]]
  # and keeps the wall times of the run that trained (demo_app.StageTimes), not the skips'.
  assert all(again["timing_s"][k] == results["timing_s"][k]
             for k in ("sft", "search_r1_seed0", "rsearch_seed0"))

  # A workdir prepared with other settings is refused, not silently reused.
  config.eval_questions = 5
  with pytest.raises(ValueError, match="eval_questions"):
    search_demo.run(config, tmp_path)
