"""OpenAI-compatible HTTP API over the serving engine (FastAPI on uvicorn).

Endpoints: POST /v1/chat/completions (plain and streamed as server-sent events),
POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text), and the
admin call POST /admin/swap (hot-swap, see `ModelHost`).

Why FastAPI on uvicorn: it is what the OpenAI-compatible servers our users already run are
built on (vLLM, SGLang, TGI's router speak the same API from FastAPI/uvicorn), so its
behaviour under the `openai` client (SSE framing, disconnects, keep-alive) is well trodden;
it is ASGI, so a handler awaits the engine without a thread per request; and Starlette's
`StreamingResponse` turns an async generator into SSE with cancellation when the client goes
away, which is how a dropped stream frees its engine slot.

The event loop never waits on the device: handlers submit to the `Engine` (its own thread)
and await the events it hands back through `loop.call_soon_threadsafe`.

Tools. A request's OpenAI `tools` are rendered into the prompt with the model's chat format;
when the finished turn holds calls in that format they are returned as `tool_calls`
(finish_reason "tool_calls") for the client to run. A server started with its own tool
router (`--tools=calculator,python,...`) runs the calls itself instead when the request
brings no tools: the call's turn and the tool turn are appended to the conversation and the
model continues, up to `max_tool_calls` rounds; the client sees the final answer. While a
tool runs, the request's engine slot serves others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from absl import logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from wakea_jax.data import chat
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data.audio import load_audio
from wakea_jax.data.images import decode_image
from wakea_jax.sampling.media_inputs import MediaInputs
from wakea_jax.sampling.tool_loop import tool_turn
from wakea_jax.serving import guardrails as guard_lib
from wakea_jax.serving.engine import Delta, Done, Engine, EngineClosed, GenerationRequest
from wakea_jax.serving.metrics import Metrics
from wakea_jax.toolbox.router import Router


@dataclasses.dataclass
class ServedModel:
  """One loaded model version behind the API; `users` counts the requests holding it."""
  name: str
  version: str
  engine: Engine
  tokenizer: Any
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  users: int = 0
  # A vision- or audio-language model's preprocessing of image_url / input_audio parts; None
  # for a text model, or (with `media_note` saying why) one whose preprocessor is missing.
  media: MediaInputs | None = None
  media_note: str = ""

  @property
  def label(self) -> str:
    """"name:version" (the version alone when it already is a registry reference)."""
    return self.version if self.version.startswith(f"{self.name}:") else (
        f"{self.name}:{self.version}")


class ModelHost:
  """The model the server answers with, swappable without downtime.

  `swap(load)` builds the new version in the background (`load()` -> ServedModel), runs a
  health check (one short generation that must finish), then switches atomically: requests
  that already hold the old model (`acquire`d it) finish on it, and its engine closes once
  the last of them releases it; new ones go to the new model. If loading or the health check
  fails, the old model stays (rollback) and the error is returned.
  """

  def __init__(self, model: ServedModel):
    self._model = model
    self._lock = threading.Lock()
    self._released = threading.Condition(self._lock)
    self._swapping = threading.Lock()
    self.swaps: list[dict[str, Any]] = []

  @property
  def model(self) -> ServedModel:
    """The model new requests go to."""
    with self._lock:
      return self._model

  def acquire(self) -> ServedModel:
    """The current model, held until `release`: a swap does not close it before then."""
    with self._lock:
      self._model.users += 1
      return self._model

  def release(self, model: ServedModel) -> None:
    """Ends a request's hold on `model`."""
    with self._lock:
      model.users -= 1
      self._released.notify_all()

  def _retire(self, old: ServedModel, timeout: float) -> None:
    """Closes `old`'s engine once no request holds it (or after `timeout`)."""
    with self._lock:
      self._released.wait_for(lambda: old.users == 0, timeout)
    old.engine.close(timeout=timeout)

  def swap(self, load: Callable[[], ServedModel], *, health_timeout: float = 120.0
           ) -> dict[str, Any]:
    """Loads, checks and switches to a new model (blocking; run it off the event loop)."""
    if not self._swapping.acquire(blocking=False):
      return {"ok": False, "error": "a swap is already running"}
    try:
      old = self.model
      started = time.time()
      try:
        new = load()
        health_check(new, timeout=health_timeout)
      except Exception as e:   # rollback: the old model keeps serving
        logging.exception("hot-swap failed; still serving %s", old.label)
        record = {"ok": False, "from": old.label,
                  "error": f"{type(e).__name__}: {e}", "seconds": time.time() - started}
        self.swaps.append(record)
        return record
      with self._lock:
        self._model = new
      threading.Thread(target=self._retire, args=(old, 600.0), name="retire-old-model",
                       daemon=True).start()
      record = {"ok": True, "from": old.label, "to": new.label,
                "seconds": time.time() - started}
      self.swaps.append(record)
      return record
    finally:
      self._swapping.release()


def health_check(model: ServedModel, timeout: float = 120.0) -> None:
  """One short greedy generation on `model`'s engine; raises if it does not finish."""
  from wakea_jax.serving.engine import generate_text
  ids = chat.render([{"role": "user", "content": "ping"}], model.tokenizer,
                    add_generation_prompt=True).input_ids.tolist()
  _, done = generate_text(model.engine, GenerationRequest(ids, max_tokens=2, temperature=0.0),
                          timeout=timeout)
  if done.finish_reason not in ("stop", "length"):
    raise RuntimeError(f"health check ended with {done.finish_reason}: {done.error}")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  """What the server enforces and offers besides the model."""
  limits: guard_lib.ServeLimits = guard_lib.ServeLimits()
  router: Router | None = None          # server-side tools
  max_tool_calls: int = 4
  max_tool_tokens: int = 256
  admin_enabled: bool = True


def _auth_headers(status: int) -> dict[str, str]:
  return {"WWW-Authenticate": "Bearer"} if status == 401 else {}


class _APIError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}


def create_app(host: ModelHost, options: ServerOptions = ServerOptions(), *,
               keys: guard_lib.APIKeys | None = None,
               limiter: guard_lib.RateLimiter | None = None,
               audit: guard_lib.AuditLog | None = None,
               output_filter: guard_lib.OutputFilter | None = None):
  """The FastAPI application serving `host` (see the module docstring)."""
  app = FastAPI(title="wakea_jax", docs_url=None, redoc_url=None)
  metrics = Metrics()
  keys = keys or guard_lib.APIKeys()
  limits = options.limits

  def error_response(e: _APIError | guard_lib.RequestError) -> JSONResponse:
    return JSONResponse(guard_lib.error_body(e.status, e.message, e.param, e.code),
                        status_code=e.status, headers=getattr(e, "headers", None))

  async def admit(request: Request, endpoint: str) -> tuple[str, dict[str, Any], bytes]:
    """Auth, rate limit, size limit and JSON parsing -> (key id, body, raw)."""
    auth = keys.check(request.headers.get("authorization"))
    if not auth.ok:
      raise _APIError(auth.status, auth.message, headers=_auth_headers(auth.status))
    if limiter is not None:
      allowed, retry_after = limiter.acquire(auth.key_id)
      if not allowed:
        raise _APIError(429, f"rate limit exceeded for key {auth.key_id}; retry in "
                        f"{retry_after:.1f} s", code="rate_limit_exceeded",
                        headers={"Retry-After": str(max(1, round(retry_after)))})
    raw = await request.body()
    guard_lib.check_body_size(len(raw), limits)
    try:
      body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
      raise _APIError(400, "request body must be a JSON object")
    return auth.key_id, body, raw

  def log(request: Request, *, key_id: str, endpoint: str, status: int, model: str = "",
          prompt_tokens: int = 0, completion_tokens: int = 0, finish_reason: str = "",
          started: float, request_id: str = "") -> None:
    latency = time.perf_counter() - started
    metrics.request(endpoint, status, latency)
    if audit is not None:
      audit.write(request_id=request_id, key_id=key_id, endpoint=endpoint, model=model,
                  status=status, prompt_tokens=prompt_tokens,
                  completion_tokens=completion_tokens, latency_s=round(latency, 4),
                  finish_reason=finish_reason,
                  client=request.client.host if request.client else "")

  @app.get("/health")
  async def health() -> dict[str, Any]:
    model = host.model
    return {"status": "ok", "model": model.name, "version": model.version,
            "in_flight": model.engine.in_flight}

  def refused(request: Request) -> JSONResponse | None:
    """The 401/403 response for a request without a valid key, or None."""
    auth = keys.check(request.headers.get("authorization"))
    return None if auth.ok else error_response(
        _APIError(auth.status, auth.message, headers=_auth_headers(auth.status)))

  @app.get("/v1/models")
  async def list_models(request: Request):
    if (refusal := refused(request)) is not None:
      return refusal
    model = host.model
    return {"object": "list", "data": [{"id": model.name, "object": "model",
                                        "created": model.created, "owned_by": "wakea_jax",
                                        "version": model.version}]}

  @app.get("/metrics")
  async def prometheus() -> PlainTextResponse:
    return PlainTextResponse(metrics.render(host.model.engine.snapshot()),
                             media_type="text/plain; version=0.0.4")

  @app.post("/admin/swap")
  async def admin_swap(request: Request):
    """Body {"checkpoint": DIR or registry reference, "version": "..."}: loads and switches
    (see ModelHost)."""
    if (refusal := refused(request)) is not None:
      return refusal
    if not options.admin_enabled or app.state.loader is None:
      return error_response(_APIError(404, "hot-swap is not enabled on this server"))
    try:
      body = json.loads(await request.body())
      load = app.state.loader(body if isinstance(body, dict) else {})
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      return error_response(_APIError(400, f"bad swap request: {e}", param="checkpoint"))
    record = await asyncio.to_thread(host.swap, load)
    return JSONResponse(record, status_code=200 if record["ok"] else 500)

  app.state.loader = None   # set by the serve binary: body -> (() -> ServedModel)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    started = time.perf_counter()
    key_id, model_name, status, usage, reason = "", "", 200, (0, 0), ""
    request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    streaming = False   # a stream logs itself when it ends
    try:
      key_id, body, raw = await admit(request, "chat")
      req = guard_lib.validate_chat_request(body, limits, body_bytes=len(raw))
      guard_lib.check_model(req.model, [host.model.name])
      served = host.acquire()
      model_name = served.name
      if req.stream:
        streaming = True

        def end(u: tuple[int, int], r: str) -> None:
          host.release(served)
          log(request, key_id=key_id, endpoint="chat", status=200, model=model_name,
              prompt_tokens=u[0], completion_tokens=u[1], finish_reason=r, started=started,
              request_id=request_id)

        stream = _chat_stream(served, req, request_id, options, output_filter)
        return StreamingResponse(
            _logged(stream, end, metrics), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
      try:
        result = await _chat_once(served, req, request_id, options, output_filter, request)
      finally:
        host.release(served)
      usage, reason = (result["usage"]["prompt_tokens"],
                       result["usage"]["completion_tokens"]), result["choices"][0][
                           "finish_reason"]
      return result
    except (guard_lib.RequestError, _APIError) as e:
      status = e.status
      return error_response(e)
    finally:
      if not streaming:
        log(request, key_id=key_id, endpoint="chat", status=status, model=model_name,
            prompt_tokens=usage[0], completion_tokens=usage[1], finish_reason=reason,
            started=started, request_id=request_id)

  @app.post("/v1/completions")
  async def completions(request: Request):
    started = time.perf_counter()
    key_id, status, usage, reason = "", 200, (0, 0), ""
    request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    try:
      key_id, body, raw = await admit(request, "completions")
      req = guard_lib.validate_completion_request(body, limits, body_bytes=len(raw))
      if req.stream:
        raise _APIError(400, "stream is supported on /v1/chat/completions; send stream=false "
                        "here", param="stream")
      guard_lib.check_model(req.model, [host.model.name])
      served = host.acquire()
      try:
        ids = served.tokenizer.encode(req.prompt)
        if not ids:
          raise _APIError(400, "prompt encodes to no tokens", param="prompt")
        text, done, lps, _ = await _generate(served, _engine_request(req, ids, served, limits),
                                             request, limits.request_timeout_s)
      finally:
        host.release(served)
      text, reason = _filtered(text, done.finish_reason, output_filter)
      usage = (done.prompt_tokens, done.completion_tokens)
      choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": reason,
                                "logprobs": None}
      if req.logprobs is not None:
        choice["logprobs"] = {"tokens": [t for t, _ in lps],
                              "token_logprobs": [lp for _, lp in lps]}
      return {"id": request_id, "object": "text_completion", "created": int(time.time()),
              "model": served.name, "choices": [choice],
              "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                        "total_tokens": usage[0] + usage[1]}}
    except (guard_lib.RequestError, _APIError) as e:
      status = e.status
      return error_response(e)
    finally:
      log(request, key_id=key_id, endpoint="completions", status=status,
          model=host.model.name, prompt_tokens=usage[0], completion_tokens=usage[1],
          finish_reason=reason, started=started, request_id=request_id)

  return app


# -----------------------------------------------------------------------------------------
# Generation helpers
# -----------------------------------------------------------------------------------------

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


def _engine_request(req: Any, ids: Sequence[int], served: ServedModel,
                    limits: guard_lib.ServeLimits, media: Any = None) -> GenerationRequest:
  room = served.engine.capacity - len(ids)
  if room < 1:
    raise _APIError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                    f"{served.engine.capacity}", param="messages", code="context_length_exceeded")
  max_tokens = min(req.max_tokens or limits.default_max_tokens, room)
  return GenerationRequest(list(ids), max_tokens=max_tokens, temperature=req.temperature,
                           top_p=req.top_p, stop=tuple(req.stop), seed=req.seed,
                           logprobs=req.logprobs not in (None, False), media=media)


def _submit(served: ServedModel, greq: GenerationRequest) -> tuple[Any, asyncio.Queue]:
  """Submits `greq` to `served`'s engine -> (its handle, the queue its events arrive on in
  this event loop). A draining engine is a 503, a request that cannot run a 400."""
  events: asyncio.Queue = asyncio.Queue()
  loop = asyncio.get_running_loop()
  try:
    handle = served.engine.submit(greq, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
  except EngineClosed:
    raise _APIError(503, "the model is being replaced; retry") from None
  except ValueError as e:
    raise _APIError(400, str(e), code="context_length_exceeded") from None
  return handle, events


async def _generate(served: ServedModel, greq: GenerationRequest, request: Any,
                    timeout: float) -> tuple[str, Done, list[tuple[str, float]], list[int]]:
  """Runs one request to the end -> (text, Done, [(token text, logprob)], token ids). Cancels
  the engine request if the client disconnects or the timeout passes."""
  handle, events = _submit(served, greq)
  parts, lps, tokens = [], [], []
  loop = asyncio.get_running_loop()
  deadline = loop.time() + timeout
  try:
    while True:
      try:
        event = await asyncio.wait_for(events.get(), timeout=1.0)
      except TimeoutError:
        if request is not None and await request.is_disconnected():
          handle.cancel()
          raise _APIError(499, "client closed the request") from None
        if loop.time() > deadline:
          handle.cancel()
          raise _APIError(504, f"generation took longer than {timeout:.0f} s") from None
        continue
      parts.append(event.text)
      if isinstance(event, Delta):
        tokens += event.token_ids
      if isinstance(event, Delta) and greq.logprobs:
        lps += [(served.tokenizer.decode([t]), lp)
                for t, lp in zip(event.token_ids, event.logprobs)]
      if isinstance(event, Done):
        if event.finish_reason == "error":
          raise _APIError(500, f"generation failed: {event.error}")
        return "".join(parts), event, lps, tokens
  except asyncio.CancelledError:
    handle.cancel()
    raise


def _filtered(text: str, reason: str, output_filter: guard_lib.OutputFilter | None
              ) -> tuple[str, str]:
  """The output filter applied to a whole text -> (text, finish_reason)."""
  reason = _FINISH.get(reason, reason)
  if output_filter is None:
    return text, reason
  result = output_filter.apply(text)
  return result.text, "content_filter" if result.blocked else reason


def _messages(req: Any) -> list[dict[str, Any]]:
  return [dict(m) for m in req.messages]


def _render(served: ServedModel, messages: list[dict[str, Any]], tools: Any
            ) -> tuple[list[int], dict[str, Any] | None]:
  """The prompt ids of `messages` and, when they hold image or audio parts, the media arrays
  the engine prefills with them (placeholders expanded to each item's tokens)."""
  parts = [p for m in messages for p in m.get("media", ())]
  plain = [{k: v for k, v in m.items() if k != "media"} for m in messages]
  try:
    if not parts:
      return chat.render(plain, served.tokenizer, tools=tools,
                         add_generation_prompt=True).input_ids.tolist(), None
    inputs = served.media
    wrong = [p for p in parts if inputs is None or p["kind"] != inputs.kind]
    if wrong:
      takes = (f"takes {inputs.kind} inputs only" if inputs is not None else
               served.media_note or "takes text only")
      raise _APIError(400, f"{wrong[0]['param']}: model {served.name!r} {takes}, not "
                      f"{wrong[0]['kind']} inputs", param=wrong[0]["param"],
                      code="unsupported_value")
    config = inputs.config
    decoded = [_decode_part(p, inputs) for p in parts]
    counts: Any = ()
    if inputs.kind == "image":
      arrays = inputs.images(decoded)
      slot, placeholder = guard_lib.IMAGE_SLOT, config.image_placeholder
    else:
      arrays, counts = inputs.clips([(c, p["param"]) for c, p in zip(decoded, parts)])
      slot, placeholder = guard_lib.AUDIO_SLOT, config.audio_placeholder
    if placeholder != slot:
      plain = [dict(m, content=m["content"].replace(slot, placeholder)) for m in plain]
    ids, mask = mm_data.tokenize(plain, served.tokenizer, config, tools=tools,
                                 add_generation_prompt=True)
    ids, _ = mm_data.expand(ids, mask, config,
                            image_count=len(parts) if inputs.kind == "image" else 0,
                            audio_token_counts=counts)
    return ids.tolist(), arrays
  except ValueError as e:
    raise _APIError(400, str(e), param="messages") from None


def _decode_part(part: dict[str, Any], inputs: MediaInputs) -> Any:
  """An image part's decoded image, or an audio part's samples at the model's rate; a 400
  naming the part when its data is not a readable image / 16-bit WAV at that rate."""
  try:
    if part["kind"] == "image":
      return decode_image(part["data"], part["param"])
    return load_audio(part["param"], inputs.features, data=part["data"])
  except ValueError as e:
    raise _APIError(400, str(e), param=part["param"]) from None


def _tool_calls(text: str, served: ServedModel) -> list[dict[str, Any]]:
  """The OpenAI tool_calls of a finished turn; [] when none parse."""
  calls = [c for c in chat.parse_turn_tool_calls(text, served.tokenizer) if "error" not in c]
  return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": c["name"],
                                 "arguments": json.dumps(c.get("arguments", {}))}}
                   for c in calls]


async def _run_turns(served: ServedModel, req: Any, options: ServerOptions, request: Any
                     ) -> tuple[str, Done, list[tuple[str, float]], list[dict], int]:
  """Generates the reply, running server-side tools between turns when enabled ->
  (final text, last Done, logprobs, client tool calls, total completion tokens)."""
  limits = options.limits
  client_tools = (req.tools or None) if req.tool_choice != "none" else None
  messages = _messages(req)
  ids, media = await asyncio.to_thread(_render, served, messages,
                                       client_tools or _server_schemas(options))
  completion_tokens, all_lps = 0, []
  server_tools = options.router is not None and not client_tools
  for round_ in range(options.max_tool_calls + 1):
    text, done, lps, generated = await _generate(
        served, _engine_request(req, ids, served, limits, media), request,
        limits.request_timeout_s)
    completion_tokens += done.completion_tokens
    all_lps += lps
    calls = _tool_calls(text, served) if (client_tools or server_tools) else []
    if not calls or done.finish_reason != "stop":
      return text, done, all_lps, [], completion_tokens
    if client_tools:
      return text, done, all_lps, calls, completion_tokens
    if round_ == options.max_tool_calls:
      break
    parsed = [{"name": c["function"]["name"],
               "arguments": json.loads(c["function"]["arguments"])} for c in calls]
    tool_ids, _ = await asyncio.to_thread(tool_turn, parsed, options.router, served.tokenizer,
                                          options.max_tool_tokens)
    # The turn as generated (it ends with its end-of-turn id), then the tool turn.
    ids = ids + generated + tool_ids
  return text, done, all_lps, [], completion_tokens


def _server_schemas(options: ServerOptions) -> Any:
  return options.router.tool_schemas() if options.router is not None else None


async def _chat_once(served: ServedModel, req: Any, request_id: str, options: ServerOptions,
                     output_filter: guard_lib.OutputFilter | None, request: Any
                     ) -> dict[str, Any]:
  text, done, lps, calls, completion_tokens = await _run_turns(served, req, options, request)
  text, reason = _filtered(text, done.finish_reason, output_filter)
  message: dict[str, Any] = {"role": "assistant", "content": text}
  if calls and not _check_calls(calls, req.tools):
    # The text before the calls (ChatML: before the first <tool_call>; a JSON call turn
    # is all call), or null as OpenAI sends it.
    content = text.split("<tool_call>")[0].strip() if "<tool_call>" in text else ""
    message.update(content=content or None, tool_calls=calls)
    reason = "tool_calls"
  choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason,
                            "logprobs": None}
  if req.logprobs:
    choice["logprobs"] = {"content": [{"token": t, "logprob": lp, "top_logprobs": []}
                                      for t, lp in lps]}
  return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
          "model": served.name, "choices": [choice],
          "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": done.prompt_tokens + completion_tokens}}


def _check_calls(calls: list[dict], tools: Sequence[dict] | None) -> list[str]:
  """Problems of the model's calls against the request's tool schemas (output validation):
  an unknown function or arguments that break its JSON schema. Calls with problems are not
  returned as tool_calls (the text is returned as content instead)."""
  schemas = {t["function"]["name"]: t["function"].get("parameters") or {}
             for t in tools or ()}
  problems = []
  for call in calls:
    name = call["function"]["name"]
    if name not in schemas:
      problems.append(f"unknown function {name!r}")
      continue
    problems += guard_lib.validate_tool_arguments(call["function"]["arguments"], schemas[name])
  return problems


def _sse(payload: Any) -> str:
  return f"data: {json.dumps(payload)}\n\n"


async def _chat_stream(served: ServedModel, req: Any, request_id: str,
                       options: ServerOptions, output_filter: guard_lib.OutputFilter | None
                       ) -> AsyncIterator[tuple[str, tuple[int, int], str]]:
  """SSE chunks of a streamed chat completion, each with (usage so far, finish reason).

  Without tools the text streams as it is generated (through the streaming output filter);
  with tools (the client's or the server's) the reply is produced whole first, since a tool
  call's markup must not reach the client as content, and then sent as chunks.
  """
  created = int(time.time())

  def chunk(delta: dict[str, Any], reason: str | None = None, usage: Any = None) -> str:
    payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
               "model": served.name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
    if usage is not None:
      payload["usage"] = usage
    return _sse(payload)

  include_usage = bool((req.stream_options or {}).get("include_usage"))
  yield chunk({"role": "assistant", "content": ""}), (0, 0), ""
  if req.tools or options.router is not None:
    result = await _chat_once(served, req, request_id, options, output_filter, None)
    choice, usage = result["choices"][0], result["usage"]
    message = choice["message"]
    if message.get("content"):
      yield chunk({"content": message["content"]}), (0, 0), ""
    if message.get("tool_calls"):
      yield chunk({"tool_calls": [dict(c, index=i) for i, c in
                                  enumerate(message["tool_calls"])]}), (0, 0), ""
    u = (usage["prompt_tokens"], usage["completion_tokens"])
    yield chunk({}, choice["finish_reason"]), u, choice["finish_reason"]
    if include_usage:
      yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                  "model": served.name, "choices": [], "usage": usage}), u, ""
    yield "data: [DONE]\n\n", u, choice["finish_reason"]
    return

  ids, media = await asyncio.to_thread(_render, served, _messages(req), None)
  handle, events = _submit(served, _engine_request(req, ids, served, options.limits, media))
  stream_filter = output_filter.stream() if output_filter is not None else None
  blocked = False
  try:
    while True:
      event = await asyncio.wait_for(events.get(), timeout=options.limits.request_timeout_s)
      text = event.text
      if stream_filter is not None:
        text, hit = stream_filter.feed(text, final=isinstance(event, Done))
        blocked = blocked or hit
      if text:   # when blocked: the safe part before the match
        yield chunk({"content": text}), (len(ids), 0), ""
      if blocked:
        handle.cancel()
      if isinstance(event, Done) or blocked:
        done = event if isinstance(event, Done) else None
        reason = "content_filter" if blocked else _FINISH.get(done.finish_reason, "stop")
        u = (len(ids), done.completion_tokens if done else 0)
        yield chunk({}, reason), u, reason
        if include_usage:
          usage = {"prompt_tokens": u[0], "completion_tokens": u[1], "total_tokens": sum(u)}
          yield _sse({"id": request_id, "object": "chat.completion.chunk",
                      "created": created, "model": served.name, "choices": [],
                      "usage": usage}), u, ""
        yield "data: [DONE]\n\n", u, reason
        return
  finally:   # the client went away (the generator is closed) or we are done
    handle.cancel()


async def _logged(stream: AsyncIterator[tuple[str, tuple[int, int], str]],
                  on_end: Callable[[tuple[int, int], str], None], metrics: Metrics
                  ) -> AsyncIterator[str]:
  """The SSE text of `stream`, logging the request once it ends (or the client leaves)."""
  usage, reason = (0, 0), "cancelled"
  first = True
  started = time.perf_counter()
  try:
    async for text, u, r in stream:
      if first and u != (0, 0):
        metrics.first_token(time.perf_counter() - started)
        first = False
      usage, reason = u, r or reason
      yield text
  except _APIError as e:
    yield _sse(guard_lib.error_body(e.status, e.message, e.param, e.code))
    reason = "error"
  finally:
    on_end(usage, reason)
