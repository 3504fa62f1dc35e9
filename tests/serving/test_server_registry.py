"""The server follows the registry: started on NAME@production, it hot-swaps to the version
promoted next (the watch), and POST /admin/swap takes a registry reference."""

import time

from tests.serving.live import request, serving
from wakea_jax import serve
from wakea_jax.checkpoints import export
from wakea_jax.models import transformer
from wakea_jax.models.config import get_preset
from wakea_jax.serving.registry import Registry


def _wait_for_version(url, version, seconds=120):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if request(f"{url}/health")[1]["version"] == version:
      return True
    time.sleep(0.2)
  return False


def test_promotion_swaps_the_served_model(tmp_path):
  registry = Registry(tmp_path / "registry")
  for seed in (1, 2):
    model = transformer.create_model(get_preset("tiny", vocab_size=1024, max_seq_len=512),
                                     seed=seed)
    export.save_model_dir(model, tmp_path / f"m{seed}")
    registry.register("tiny", tmp_path / f"m{seed}", objective="sft")
  registry.promote("tiny", 1)
  app, host = serve.build_app("tiny@production", registry=str(tmp_path / "registry"),
                              watch_s=0.2, slots=2, context=256)
  try:
    with serving(app) as url:
      assert request(f"{url}/health")[1] == {"status": "ok", "model": "tiny",
                                             "version": "tiny:1", "in_flight": 0}
      registry.promote("tiny", 2)
      assert _wait_for_version(url, "tiny:2")
      body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 3}
      assert request(f"{url}/v1/chat/completions", body)[0] == 200
      # An admin swap takes a reference too; the watch then brings production back.
      status, record = request(f"{url}/admin/swap", {"checkpoint": "tiny:1"})
      assert status == 200 and record["ok"] and record["to"] == "tiny:1", record
      assert _wait_for_version(url, "tiny:2")
  finally:
    host.model.engine.close()
