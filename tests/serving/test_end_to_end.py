"""Registry, per-category evaluation, weaknesses and selection on real (tiny, random) models:
a wakea_jax model directory and a Hugging Face directory, evaluated by the RL evaluator."""

import pytest

from wakea_jax import registry as binary
from wakea_jax import trainers
from wakea_jax.checkpoints import export, hf
from wakea_jax.config_files import get_config
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.serving import selection, weakness
from wakea_jax.serving.registry import Registry, RegistryError, load_for_serving

# Eight prompts of every operator, max_operand=9 (all "easy"), greedy only.
EVAL = "task:arithmetic?n=12&seed=777&max_operand=9&tools=0"


def test_register_evaluate_weaknesses_select(tmp_path):
  native, hf_dir = tmp_path / "native", tmp_path / "hf"
  export.save_model_dir(transformer.create_model(
      get_preset("tiny", vocab_size=1024, max_seq_len=256), seed=1), native)
  hf.save_model(transformer.create_model(
      get_preset("tiny", vocab_size=1024, max_seq_len=256), seed=2), hf_dir)
  reg = Registry(tmp_path / "reg")
  assert reg.register("tiny", native, objective="random init") == 1
  assert reg.register("tiny", hf_dir, parent="tiny:1", objective="random init") == 2
  assert (reg.resolve("tiny:1").kind, reg.resolve("tiny:2").kind) == ("native", "hf")

  config = get_config("grpo:test", **{"data.eval_sources": EVAL, "eval.num_samples": 0})
  for ref in ("tiny:1", "tiny:2"):
    printed = binary.run("evaluate", [ref], registry=str(reg.root), config=config,
                         config_name="configs/grpo.py:test")
    assert f"{ref}: overall" in printed and "on 12 prompts (recorded)" in printed
  recorded = reg.resolve("tiny:2").eval
  assert recorded["source"] == "configs/grpo.py:test" and recorded["sources"] == [EVAL]
  cells = {(r["category"], r["difficulty"]): r["n"] for r in recorded["rows"]}
  assert set(cells) == {(c, d) for c in ("addition", "subtraction", "multiplication")
                        for d in ("easy", "all")}
  assert sum(n for (_, d), n in cells.items() if d == "all") == 12
  # The categories add up to the evaluate binary's own greedy accuracy on the same config.
  reference = trainers.evaluate_checkpoint(config, hf_dir)
  assert recorded["overall"]["accuracy"] == pytest.approx(reference["greedy_accuracy"])

  # Random models: every category is weak; targeted prompts for each, and the follow-up.
  found = weakness.find_weaknesses(recorded, reg.resolve("tiny:1").eval, threshold=0.5)
  assert {w.key for w in found} >= {"arithmetic/multiplication/all", "arithmetic/addition/all"}
  summary = weakness.targeted_data(found, tmp_path / "weak.jsonl", n_per_category=4)
  assert summary["records"] == 4 * len(found)
  assert all(w.options == {"max_operand": 9, "tools": 0, "worked": 0, "operands": 2, "cue": 0}
             for w in found)


  # Serving figures measured (sequential sampling, no server), then selection on them.
  for ref in ("tiny:1", "tiny:2"):
    printed = binary.run("measure", [ref], registry=str(reg.root), max_new_tokens=4)
    assert printed.startswith(f"{ref}: serving figures recorded (sequential batch-1")
  figures = reg.resolve("tiny:2").serving
  assert figures["requests"] == len(binary.MEASURE_PROMPTS) and figures["max_new_tokens"] == 4
  assert 0 < figures["p50_latency_ms"] <= figures["p95_latency_ms"]
  assert figures["tokens_per_s"] > 0 and figures["peak_memory_mb"] > 0
  profile = selection.RoleProfile.from_dict({"role": "fast", "criteria": {
      "latency_ms": {"weight": 2, "max": 60_000}, "tokens_per_s": {"weight": 1},
      "accuracy": {"weight": 1}}})
  result = selection.select(reg, profile)
  assert {e["ref"] for e in result.ranking} == {"tiny:1", "tiny:2"}
  json_path, md_path = selection.write_selection(reg, result)
  assert json_path.is_file() and md_path.read_text().startswith("# Model selection: fast")

  # Serving loads a version as sample/evaluate do, and refuses a changed checkpoint.
  model, tokenizer = load_for_serving(reg.resolve("tiny:1"))
  assert model.config.vocab_size == 1024 and tokenizer is not None
  (native / "stray.txt").write_text("x")
  with pytest.raises(RegistryError, match="tiny:1: the files of .* changed since"):
    load_for_serving(reg.resolve("tiny:1"))


def test_follow_up_run_closes_the_loop(tmp_path):
  """Weak categories -> targeted prompts -> a (one-step) GRPO run from the weak version ->
  its export registered as the next version, with the lineage."""
  native = tmp_path / "native"
  export.save_model_dir(transformer.create_model(
      get_preset("tiny", vocab_size=1024, max_seq_len=256), seed=1), native)
  reg = Registry(tmp_path / "reg")
  reg.register("tiny", native)
  reg.record_eval("tiny", 1, [{"task": "arithmetic", "category": "addition", "difficulty": "all",
                               "accuracy": 0.0, "n": 8,
                               "options": {"max_operand": 9, "tools": 0}}])
  found = weakness.find_weaknesses(reg.resolve("tiny:1").eval)
  data = weakness.targeted_data(found, tmp_path / "weak.jsonl", n_per_category=8)["path"]
  workdir = tmp_path / "followup"
  command = weakness.follow_up_command(
      "configs/grpo.py:test", data, init_from=reg.resolve("tiny:1").checkpoint,
      workdir=str(workdir), overrides=["train.steps=1", "train.eval_at_start=False",
                                       "train.eval_every=100", "export.enabled=True"])
  weakness.start_follow_up(command, capture_output=True, timeout=500)
  assert (workdir / "export" / "model" / "model_config.json").is_file()
  version = reg.register("tiny", workdir, parent="tiny:1", data_sources=[data],
                         objective="grpo targeted")
  follow_up = reg.resolve(f"tiny:{version}")
  assert follow_up.parent == "tiny:1" and follow_up.config["data"]["sources"] == data
  assert follow_up.model_dir == str(workdir / "export" / "model")
