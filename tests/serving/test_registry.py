"""The model registry: register / resolve / promote / compare, atomic writes, clear errors."""

import concurrent.futures
import json
import os

import pytest

from wakea_jax import registry as binary
from wakea_jax.serving import registry as registry_lib
from wakea_jax.serving.registry import Registry, RegistryError
from wakea_jax.serving.results import RecordError


def fake_checkpoint(path, kind="native", content="a"):
  """A directory the loader would take for a checkpoint (enough for the registry)."""
  path.mkdir(parents=True)
  (path / ("model_config.json" if kind == "native" else "config.json")).write_text("{}")
  (path / "weights.bin").write_text(content)
  return path


ROWS = [{"task": "arithmetic", "category": "addition", "difficulty": "medium", "accuracy": 0.9,
         "n": 10},
        {"task": "arithmetic", "category": "multiplication", "difficulty": "medium",
         "accuracy": 0.3, "n": 10}]


def test_register_resolve_and_lineage(tmp_path):
  reg = Registry(tmp_path / "reg")
  ck1 = fake_checkpoint(tmp_path / "ck1")
  assert reg.register("tiny", ck1, objective="sft", data_sources=["task:arithmetic?n=10"],
                      config={"seed": 1}, notes="first") == 1
  # A run workdir: the loader's export/model, and the run's config.json as the config.
  work = tmp_path / "run"
  fake_checkpoint(work / "export" / "model", content="b")
  (work / "config.json").write_text(json.dumps({"objective": "grpo", "seed": 7}))
  assert reg.register("tiny", work, parent="tiny:1", objective="grpo") == 2
  hf_dir = fake_checkpoint(tmp_path / "hf", kind="hf", content="c")
  assert reg.register("other", hf_dir) == 1

  v1, v2 = reg.resolve("tiny:1"), reg.resolve("tiny")
  assert (v1.version, v2.version) == (1, 2)
  assert v1.kind == "native" and v1.checkpoint == str(ck1) and v1.model_dir == str(ck1)
  assert v1.config == {"seed": 1} and v1.data_sources == ("task:arithmetic?n=10",)
  assert v1.fingerprint == registry_lib.fingerprint(ck1) and len(v1.fingerprint) == 64
  assert v2.parent == "tiny:1" and v2.config == {"objective": "grpo", "seed": 7}
  assert v2.checkpoint == str(work) and v2.model_dir == str(work / "export" / "model")
  assert reg.resolve("other").kind == "hf"
  assert [v.ref for v in reg.list()] == ["other:1", "tiny:1", "tiny:2"]
  # Parents may be named any way; the manifest stores name:version.
  reg.promote("tiny", 1, "production")
  assert reg.register("tiny", ck1, parent="tiny@production") == 3
  assert reg.resolve("tiny:3").parent == "tiny:1"


def test_fingerprint_changes_with_content(tmp_path):
  ck = fake_checkpoint(tmp_path / "ck")
  before = registry_lib.fingerprint(ck)
  (ck / "weights.bin").write_text("changed")
  assert registry_lib.fingerprint(ck) != before
  (ck / "weights.bin").write_text("a")
  assert registry_lib.fingerprint(ck) == before
  (ck / "extra").write_text("")
  assert registry_lib.fingerprint(ck) != before


def test_copy_checkpoint(tmp_path):
  reg = Registry(tmp_path / "reg")
  ck = fake_checkpoint(tmp_path / "ck")
  reg.register("tiny", ck, copy=True)
  v = reg.resolve("tiny:1")
  assert v.copied and v.checkpoint.startswith(str(reg.root))
  assert (tmp_path / "reg/models/tiny/1/checkpoint/weights.bin").read_text() == "a"
  assert v.fingerprint == registry_lib.fingerprint(ck)
  # An HF directory's own tokenizer files travel with the copy.
  hf_dir = fake_checkpoint(tmp_path / "hf", kind="hf")
  (hf_dir / "tokenizer.json").write_text("{}")
  reg.register("withtok", hf_dir, copy=True)
  assert reg.resolve("withtok").tokenizer == str(reg.models / "withtok/1/checkpoint")
  assert reg.register("withtok", hf_dir) == 2 and reg.resolve("withtok").tokenizer == str(hf_dir)


def test_promote_and_stages(tmp_path):
  reg = Registry(tmp_path / "reg")
  for i in range(2):
    reg.register("tiny", fake_checkpoint(tmp_path / f"ck{i}", content=str(i)))
  reg.promote("tiny", 1)
  assert reg.resolve("tiny@production").version == 1
  reg.promote("tiny", 2)
  reg.promote("tiny", 1, stage="staging")
  assert reg.resolve("tiny@production").version == 2
  assert reg.stages("tiny") == {"production": 2, "staging": 1}
  assert reg.resolve("tiny:2").stages == ("production",)
  aliases = json.loads((reg.models / "tiny" / "aliases.json").read_text())
  assert aliases["production"]["previous"] == 1


def test_errors_list_what_exists(tmp_path):
  reg = Registry(tmp_path / "reg")
  reg.register("tiny", fake_checkpoint(tmp_path / "ck"))
  with pytest.raises(RegistryError, match=r"no model named 'nope'.*registered: tiny"):
    reg.resolve("nope")
  with pytest.raises(RegistryError, match=r"'tiny' has no version 5; versions: 1"):
    reg.resolve("tiny:5")
  with pytest.raises(RegistryError, match=r"'tiny' has no stage 'production'; stages: none"):
    reg.resolve("tiny@production")
  with pytest.raises(RegistryError, match="bad version in 'tiny:x'"):
    reg.resolve("tiny:x")
  for bad in ("", "a b", "../up", "x:y:z", "-lead"):
    with pytest.raises(RegistryError):
      reg.resolve(bad)
  with pytest.raises(RegistryError, match="invalid model name 'a/b'"):
    reg.register("a/b", tmp_path / "ck")
  with pytest.raises(RegistryError, match="checkpoint_dir: .*no such checkpoint directory"):
    reg.register("tiny", tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(RegistryError, match="neither a wakea_jax model directory"):
    reg.register("tiny", tmp_path / "empty")
  with pytest.raises(RegistryError, match="has no version 9"):
    reg.promote("tiny", 9)
  with pytest.raises(RegistryError, match="invalid stage"):
    reg.promote("tiny", 1, stage="prod uction")
  with pytest.raises(RegistryError, match="no model named 'ghost'"):
    reg.register("tiny", tmp_path / "ck", parent="ghost:1")
  with pytest.raises(RecordError, match=r"rows\[0\]: field 'accuracy' must be in \[0, 1\]"):
    reg.record_eval("tiny", 1, [{"category": "a", "accuracy": 2.0, "n": 1}])
  with pytest.raises(RecordError, match=r"rows\[0\]: field\(s\) \['n'\] missing"):
    reg.record_eval("tiny", 1, [{"category": "a", "accuracy": 0.5}])
  with pytest.raises(RecordError, match="at least one of p50_latency_ms"):
    reg.record_serving("tiny", 1, {"speed": 3})
  with pytest.raises(RecordError, match="'tokens_per_s' must be a number >= 0"):
    reg.record_serving("tiny", 1, {"tokens_per_s": "fast"})
  # A failed registration leaves no half-made version behind.
  assert reg.versions("tiny") == [1]


def test_atomic_writes_keep_the_old_manifest(tmp_path, monkeypatch):
  reg = Registry(tmp_path / "reg")
  reg.register("tiny", fake_checkpoint(tmp_path / "ck"))
  reg.record_eval("tiny", 1, ROWS)
  manifest = reg.models / "tiny" / "1" / "manifest.json"
  before = manifest.read_text()

  def crash(fd):
    raise OSError("disk gone mid-write")

  monkeypatch.setattr(registry_lib.os, "fsync", crash)
  with pytest.raises(OSError, match="disk gone"):
    reg.record_serving("tiny", 1, {"p95_latency_ms": 12.0})
  with pytest.raises(OSError, match="disk gone"):
    reg.promote("tiny", 1)
  assert manifest.read_text() == before
  assert not (reg.models / "tiny" / "aliases.json").exists()
  assert sorted(os.listdir(manifest.parent)) == ["manifest.json"]   # no temporary left
  # A registration that crashes while writing its manifest leaves no version either.
  with pytest.raises(OSError, match="disk gone"):
    reg.register("tiny", tmp_path / "ck")
  monkeypatch.undo()
  assert reg.versions("tiny") == [1] and reg.resolve("tiny").serving is None
  assert reg.register("tiny", tmp_path / "ck") == 2


def test_eval_serving_and_compare(tmp_path):
  reg = Registry(tmp_path / "reg")
  for i in range(2):
    reg.register("tiny", fake_checkpoint(tmp_path / f"ck{i}", content=str(i)))
  reg.record_eval("tiny", 1, ROWS)
  better = [dict(ROWS[0], accuracy=0.8), dict(ROWS[1], accuracy=0.6)]
  reg.record_eval("tiny", 2, {"rows": better, "overall": {"accuracy": 0.7, "n": 20}})
  reg.record_serving("tiny", 1, {"p50_latency_ms": 10, "p95_latency_ms": 20.0,
                                 "tokens_per_s": 100.0, "peak_memory_mb": 50.0,
                                 "machine": "test cpu"})
  reg.record_serving("tiny", 2, {"p95_latency_ms": 30.0, "tokens_per_s": 80.0})
  v1 = reg.resolve("tiny:1")
  assert v1.eval["overall"] == {"accuracy": pytest.approx(0.6), "n": 20}
  assert v1.serving["machine"] == "test cpu"
  rows = {(r.section, r.metric): r for r in reg.compare("tiny:1", "tiny:2")}
  assert rows[("eval", "overall accuracy")].delta == pytest.approx(0.1)
  assert rows[("eval", "arithmetic/multiplication/medium")].delta == pytest.approx(0.3)
  assert rows[("eval", "arithmetic/addition/medium")].delta == pytest.approx(-0.1)
  assert rows[("serving", "p95_latency_ms")].delta == pytest.approx(10.0)
  assert rows[("serving", "peak_memory_mb")].b is None
  assert rows[("serving", "peak_memory_mb")].delta is None
  text = binary.format_table(["metric", "a", "b"], [["x", 1.0, None]])
  assert text.splitlines() == ["metric  a      b", "------  -----  -", "x       1.000  -"]


def test_concurrent_writers_lose_nothing(tmp_path):
  reg = Registry(tmp_path / "reg")
  ck = fake_checkpoint(tmp_path / "ck")
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    versions = list(pool.map(lambda _: Registry(reg.root).register("tiny", ck), range(6)))
  assert sorted(versions) == [1, 2, 3, 4, 5, 6] == reg.versions("tiny")
  # An evaluation and serving figures recorded at once on one version: both kept (the
  # per-model lock serialises the read-modify-write of the manifest).
  jobs = [lambda: Registry(reg.root).record_eval("tiny", 1, ROWS),
          lambda: Registry(reg.root).record_serving("tiny", 1, {"tokens_per_s": 5.0})] * 4
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda job: job(), jobs))
  v1 = reg.resolve("tiny:1")
  assert v1.eval is not None and v1.serving["tokens_per_s"] == 5.0
