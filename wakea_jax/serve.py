r"""Serving binary: an OpenAI-compatible HTTP API for a checkpoint.

  python -m wakea_jax.serve --checkpoint=/tmp/wakea_quickstart/export/model --port=8000
  python -m wakea_jax.serve --checkpoint=DIR --api_keys_file=keys.txt --rpm=120 \
      --tools=calculator,python --audit_log=/var/log/wakea/audit.jsonl
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model": "model", "messages": [{"role": "user", "content": "Hi"}]}'

--checkpoint is a wakea_jax model directory (model_config.json) or a Hugging Face directory
(config.json), as for `python -m wakea_jax.sample` (a LLaVA or Qwen2-Audio directory takes
image_url / input_audio content parts, base64 inline); or, with --registry=ROOT, a registered
version ('NAME', 'NAME:3', 'NAME@production'; `python -m wakea_jax.registry`). With
--watch_s the server re-resolves that reference every so many seconds and hot-swaps to the
version it points to when that changes (promote a version and the server follows); the admin
call POST /admin/swap {"checkpoint": DIR or reference} does the same on demand. Requests
share one continuous-batching engine (`--slots` rows decoding together, `--context` tokens
each). See
`wakea_jax/serving/server.py` for the API and README "Serving" for the guardrails.
"""

from __future__ import annotations

import pathlib
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from flax import nnx

from wakea_jax import logs
from wakea_jax.checkpoints import loader
from wakea_jax.data.tokenizer import tokenizer_from
from wakea_jax.sampling.media_inputs import load_checkpoint, media_inputs_for, media_kind
from wakea_jax.sampling.sampler import chat_sampler
from wakea_jax.serving import guardrails as guard_lib
from wakea_jax.serving import registry as registry_lib
from wakea_jax.serving.engine import Engine
from wakea_jax.serving.server import ModelHost, ServedModel, ServerOptions, create_app
from wakea_jax.toolbox.registry import default_router

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Model directory (ours or Hugging Face), or with "
                      "--registry a registered version (NAME, NAME:V, NAME@STAGE).")
  flags.DEFINE_string("registry", "", "Model registry root (wakea_jax.registry).")
  flags.DEFINE_float("watch_s", 0.0, "Poll the registry reference this often and hot-swap "
                     "when it resolves to another version (0: off).")
  flags.DEFINE_string("tokenizer", "", "Tokenizer path; empty: the checkpoint's or bundled.")
  flags.DEFINE_string("model_name", "", "The model id clients use; empty: the directory name.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
  flags.DEFINE_integer("port", 8000, "Port (0: any free port, printed at start).")
  flags.DEFINE_integer("slots", 8, "Rows decoding together (continuous batching).")
  flags.DEFINE_integer("context", 1024, "KV cache tokens per slot: prompt + max_tokens.")
  flags.DEFINE_integer("chunk_steps", 8, "Decode steps between harvests (stream granularity).")
  flags.DEFINE_list("tools", [], "Server-side tools run for requests without their own.")
  flags.DEFINE_string("api_keys_file", "", "One key per line (name:key allowed); empty: none.")
  flags.DEFINE_string("api_keys_env", "WAKEA_API_KEYS", "Environment variable of keys.")
  flags.DEFINE_float("rpm", 0.0, "Requests per minute per key (0: no limit).")
  flags.DEFINE_string("audit_log", "", "JSONL audit log path; empty: none.")
  flags.DEFINE_list("blocked_patterns", [], "Regexes that block an output.")
  flags.DEFINE_bool("redact_pii", False, "Redact emails, phones, cards, IPs, SSNs in outputs.")
  flags.DEFINE_integer("max_tokens_cap", 1024, "Largest max_tokens a request may ask for.")


def load_served(checkpoint: str, *, tokenizer_path: str = "", name: str = "",
                version: str = "", slots: int = 8, context: int = 1024,
                chunk_steps: int = 8, registry: str = "") -> ServedModel:
  """Loads `checkpoint` (a directory, or a reference into `registry`) into a started engine."""
  if registry and not pathlib.Path(checkpoint).is_dir():
    found = registry_lib.Registry(registry).resolve(checkpoint)
    model, tok = registry_lib.load_for_serving(found)
    name, version, checkpoint = name or found.name, found.ref, found.checkpoint
    if tokenizer_path:
      tok = tokenizer_from(tokenizer_path)
  else:
    tok = tokenizer_from(tokenizer_path or loader.tokenizer_path(checkpoint))
    model = load_checkpoint(checkpoint)    # a LLaVA / Qwen2-Audio directory takes media
  media, media_note = None, ""
  if media_kind(model):
    try:
      media = media_inputs_for(model, checkpoint, "--checkpoint")
    except FileNotFoundError as e:       # its text path still serves
      media_note = str(e)
      logging.warning("%s: serving text only", e)
  graphdef, params = nnx.split(model)
  sampler = chat_sampler(graphdef, model.config, tok, model_source=f"--checkpoint {checkpoint}",
                         per_row=True)
  context = min(context, sampler.config.max_seq_len)
  engine = Engine(sampler, params, tok, slots=slots, chunk_steps=chunk_steps,
                  capacity=context, name=name or pathlib.Path(checkpoint).name)
  return ServedModel(name=name or pathlib.Path(checkpoint).name, version=version or checkpoint,
                     engine=engine, tokenizer=tok, media=media, media_note=media_note)


def build_app(checkpoint: str, **settings: Any):
  """The app for `checkpoint` with the flags' settings (tests call it directly)."""
  engine_settings = dict(slots=settings.get("slots", 8), context=settings.get("context", 1024),
                         chunk_steps=settings.get("chunk_steps", 8),
                         registry=settings.get("registry", ""),
                         tokenizer_path=settings.get("tokenizer", ""))
  served = load_served(checkpoint, name=settings.get("model_name", ""), **engine_settings)
  host = ModelHost(served)
  tools = [t for t in settings.get("tools", ()) if t]
  cap = settings.get("max_tokens_cap", 1024)
  limits = guard_lib.ServeLimits(max_tokens=cap, default_max_tokens=cap)
  options = ServerOptions(limits=limits, router=default_router(enabled=tuple(tools))
                          if tools else None)
  keys = guard_lib.APIKeys.load(path=settings.get("api_keys_file") or None,
                                variable=settings.get("api_keys_env") or None)
  rpm = settings.get("rpm", 0.0)
  limiter = guard_lib.RateLimiter(requests_per_minute=rpm) if rpm else None
  audit = guard_lib.AuditLog(settings["audit_log"]) if settings.get("audit_log") else None
  patterns = list(settings.get("blocked_patterns", ()))
  output_filter = (guard_lib.OutputFilter(blocked_patterns=patterns,
                                          redact_pii=settings.get("redact_pii", False))
                   if patterns or settings.get("redact_pii") else None)
  app_ = create_app(host, options, keys=keys, limiter=limiter, audit=audit,
                    output_filter=output_filter)

  def loader_for(body: dict[str, Any]):
    path = body.get("checkpoint")
    if not isinstance(path, str) or not path:
      raise ValueError("body field 'checkpoint' must be a model directory")
    return lambda: load_served(path, name=served.name, version=str(body.get("version", "")),
                               **engine_settings)

  app_.state.loader = loader_for
  watch = settings.get("watch_s", 0.0)
  if watch and settings.get("registry"):
    threading.Thread(target=_watch, args=(host, checkpoint, settings["registry"], watch,
                                          lambda: load_served(checkpoint, name=served.name,
                                                              **engine_settings)),
                     name="registry-watch", daemon=True).start()
  return app_, host


def _watch(host: ModelHost, reference: str, root: str, every_s: float, load) -> None:
  """Hot-swaps `host` whenever `reference` resolves to another version than it serves."""
  registry = registry_lib.Registry(root)
  while True:
    time.sleep(every_s)
    try:
      wanted = registry.resolve(reference).ref
    except Exception as e:   # a registry being edited: try again next time
      logging.warning("registry watch: %s", e)
      continue
    if wanted != host.model.version:
      record = host.swap(load)
      logging.info("registry watch: %s -> %s", reference, record)


def main(argv: Sequence[str]) -> None:
  """Loads the checkpoint and serves until interrupted."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required")
  logs.quiet_library_logs()
  import uvicorn
  app_, host = build_app(
      FLAGS.checkpoint, tokenizer=FLAGS.tokenizer, model_name=FLAGS.model_name,
      slots=FLAGS.slots, context=FLAGS.context, chunk_steps=FLAGS.chunk_steps,
      tools=FLAGS.tools, registry=FLAGS.registry, watch_s=FLAGS.watch_s,
      api_keys_file=FLAGS.api_keys_file, api_keys_env=FLAGS.api_keys_env,
      rpm=FLAGS.rpm, audit_log=FLAGS.audit_log, blocked_patterns=FLAGS.blocked_patterns,
      redact_pii=FLAGS.redact_pii, max_tokens_cap=FLAGS.max_tokens_cap)
  sock = socket.socket(socket.AF_INET6 if ":" in FLAGS.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((FLAGS.host, FLAGS.port))
  sock.listen(2048)   # connections queue from now on, before uvicorn starts accepting
  port = sock.getsockname()[1]
  # One line a launcher (or a test) can wait for.
  print(f"serving {host.model.name} on http://{FLAGS.host}:{port}", flush=True)
  logging.info("serving %s on %s:%d", host.model.name, FLAGS.host, port)
  server = uvicorn.Server(uvicorn.Config(app_, log_level="warning", access_log=False))
  try:
    server.run(sockets=[sock])
  finally:
    host.model.engine.close(timeout=30.0)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
