"""Guardrails of the OpenAI-compatible server: keys, rate limits, request and output checks, audit.

Framework-free on purpose (stdlib only, no FastAPI): each piece is tested without a web stack,
and the server only maps results to HTTP: `AuthResult.status`, `RequestError.status` and
`.body()`, `RateLimiter.acquire`'s retry time (the Retry-After header), a blocked output's
finish_reason "content_filter".

Choices, and why:

* API keys are held only as SHA-256 digests, compared with `hmac.compare_digest` against every
  configured key (no early exit), so neither memory dumps nor timing reveal a key. A key is
  named in logs by its `name:` from the key file, or else by the first 8 hex digits of its
  digest; the raw key is never stored, printed or logged. No keys configured = no auth.
* A request above a cap is refused (400 naming the cap's `serve.*` field), never clamped: a
  clamped `max_tokens` would come back as a silently shorter answer.
* Unknown top-level fields are ignored, since OpenAI SDKs send extras (`user`, `metadata`,
  `store` ...). Known fields this server cannot honour are refused when they ask for
  something (`response_format` json, `logit_bias`, penalties, `n` > 1, the old `functions`),
  so a client never silently gets other behaviour than it asked for; their neutral values
  (penalty 0, `{"type": "text"}`, n 1, null) pass. Explicit nulls count as absent.
* Blocked output patterns end the output where the first match starts, and the reply's
  finish_reason is "content_filter" (OpenAI's meaning: "content was omitted"). Replacing the
  match instead would let generation run on past text the operator chose to forbid, and a
  stream cannot take back what it sent; stopping also frees the engine slot. PII is redacted
  in place ("[REDACTED:EMAIL]" ...) and generation goes on.
* A stream is filtered in pieces, so `StreamFilter` holds back the last `hold_back` (64)
  characters: a match of at most that length is caught however the text was split. See there.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

# The router's JSON-type table, so tool arguments mean the same here as in the tool loop
# (a bool is not a number, 2.0 is an integer).
from wakea_jax.toolbox.router import _TYPE_CHECKS, _json_type

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def compile_patterns(patterns: Iterable[str | re.Pattern[str]], where: str = "blocked_patterns"
                     ) -> tuple[re.Pattern[str], ...]:
  """Compiles blocked-output regexes; a bad one (or one matching "") is an error naming it."""
  out = []
  for i, pattern in enumerate(patterns):
    try:
      compiled = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"{where}[{i}] {pattern!r} is not a valid regex: {e}") from None
    if compiled.search("") is not None:
      raise ValueError(f"{where}[{i}] {compiled.pattern!r} matches the empty string, so it "
                       "would block every output")
    out.append(compiled)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class ServeLimits:
  """config.serve: the guardrails' caps, rate limits, output filter, key file and audit log.

  Plain scalars and tuples, so `config_lib.typed(ServeLimits, config.serve, "serve")` builds it
  from `--config.serve.<field>=...`. A rate of 0 means no limit.
  """

  # Tokens one request may ask for (max_tokens / max_completion_tokens); more is a 400.
  max_tokens: int = 1024
  # Used when a request gives no max_tokens; at most max_tokens.
  default_max_tokens: int = 1024
  max_messages: int = 64
  max_body_bytes: int = 1 << 20            # 1 MiB of JSON; more is a 413
  # Characters of text in a request: message contents, tool-call arguments, tool schemas.
  max_total_chars: int = 200_000
  max_tools: int = 128                     # OpenAI's own limit
  # image_url / input_audio content parts per request (a model that takes media only).
  max_media: int = 8
  # Alternatives per token the engine can return (top_logprobs); 0 = only the chosen token's.
  max_top_logprobs: int = 0
  request_timeout_s: float = 120.0
  requests_per_minute: float = 600.0       # per key; 0 = unlimited
  tokens_per_minute: float = 0.0           # generated tokens per key; 0 = unlimited
  # Regexes (Python `re`) that end the output where they match (finish_reason content_filter).
  blocked_patterns: tuple[str, ...] = ()
  redact_pii: bool = False                 # emails, phones, card numbers, IPv4, US SSNs
  api_keys_file: str = ""                  # one key per line, `name:key` or `key`; "" = none
  api_keys_env: str = "WAKEA_API_KEYS"     # comma-separated keys; unset or empty = none
  audit_log: str = ""                      # JSONL path; "" = no audit log
  audit_content_hash: bool = False         # add a SHA-256 of the messages and reply

  def __post_init__(self) -> None:
    for name in ("max_tokens", "default_max_tokens", "max_messages", "max_body_bytes",
                 "max_total_chars"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"serve.{name} must be an integer >= 1, got {value!r}")
    if self.default_max_tokens > self.max_tokens:
      raise ValueError(f"serve.default_max_tokens ({self.default_max_tokens}) is above "
                       f"serve.max_tokens ({self.max_tokens})")
    if not 0 <= self.max_tools:
      raise ValueError(f"serve.max_tools must be >= 0, got {self.max_tools}")
    if not 0 <= self.max_media:
      raise ValueError(f"serve.max_media must be >= 0, got {self.max_media}")
    if not 0 <= self.max_top_logprobs <= 20:
      raise ValueError(f"serve.max_top_logprobs must be in 0..20 (OpenAI's range), got "
                       f"{self.max_top_logprobs}")
    if not self.request_timeout_s > 0:
      raise ValueError(f"serve.request_timeout_s must be > 0, got {self.request_timeout_s}")
    for name in ("requests_per_minute", "tokens_per_minute"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"serve.{name} must be >= 0 (0 = unlimited), got {getattr(self, name)}")
    if isinstance(self.blocked_patterns, str):
      raise ValueError("serve.blocked_patterns must be a list of regexes, got one string")
    compile_patterns(self.blocked_patterns, "serve.blocked_patterns")


# The name the request validators' signatures use: the limits they read are ServeLimits'.
Limits = ServeLimits


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
  """OpenAI's error `type` for an HTTP status."""
  if status >= 500:
    return "server_error"
  return _ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  """The JSON body of an error response, in OpenAI's shape (what its SDKs parse)."""
  return {"error": {"message": message, "type": error_type(status), "param": param,
                    "code": code}}


class RequestError(ValueError):
  """A request the server refuses: HTTP `status`, and `param` / `code` for the error body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.param = param
    self.code = code

  def body(self) -> dict[str, Any]:
    """`error_body` of this error."""
    return error_body(self.status, self.message, self.param, self.code)


# ---------------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------------

_KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclasses.dataclass(frozen=True)
class AuthResult:
  """The outcome of `APIKeys.check`: ok with the caller's key id, or a 401/403 to return."""

  ok: bool
  status: int          # 200, 401 (no or malformed credentials) or 403 (unknown key)
  key_id: str | None   # the key's name or digest prefix; "anonymous" with auth disabled
  message: str = ""

  def body(self) -> dict[str, Any]:
    """`error_body` for a refused request (send `WWW-Authenticate: Bearer` with a 401)."""
    return error_body(self.status, self.message,
                      code="invalid_api_key" if self.status == 403 else "missing_api_key")


class APIKeys:
  """The server's API keys, held as SHA-256 digests only; `check` reads an Authorization header.

  Keys come from a file (one per line, `#` starts a comment line, `name:key` names a key; a key
  containing ":" must be given a name) and/or an environment variable (comma-separated, the
  same `name:key` form). With no keys at all, authentication is off and every request is
  "anonymous": say so in the server's startup log.
  """

  def __init__(self, keys: Iterable[tuple[str | None, str]] = (), *, _where: Sequence[str] = ()):
    self._entries: list[tuple[bytes, str]] = []
    where_of: dict[bytes, str] = {}
    id_where: dict[str, str] = {}
    for i, (name, key) in enumerate(keys):
      where = _where[i] if i < len(_where) else f"key {i + 1}"
      if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: empty API key")
      if any(c.isspace() for c in key):
        raise ValueError(f"{where}: an API key may not contain whitespace")
      digest = hashlib.sha256(key.encode("utf-8")).digest()
      if digest in where_of:
        raise ValueError(f"{where}: the same key is already given at {where_of[digest]}")
      key_id = name if name is not None else digest.hex()[:8]
      if key_id in id_where:
        raise ValueError(f"{where}: key id {key_id!r} is already used at {id_where[key_id]}")
      where_of[digest] = id_where[key_id] = where
      self._entries.append((digest, key_id))

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> APIKeys:
    """Keys from `path`; an unreadable file or one without keys is an error naming it."""
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    except UnicodeDecodeError as e:
      raise ValueError(f"API key file {path}: not UTF-8 text ({e.reason} at byte {e.start})"
                       ) from None
    except OSError as e:
      raise ValueError(f"cannot read API key file {path}: {e.strerror or e}") from None
    keys, where = [], []
    for number, line in enumerate(lines, 1):
      text = line.strip()
      if not text or text.startswith("#"):
        continue
      keys.append(_parse_key(text, f"{path}:{number}"))
      where.append(f"{path}:{number}")
    if not keys:
      raise ValueError(f"API key file {path} holds no keys (only blank lines and comments); "
                       "add one key per line, or drop the file to serve without auth")
    return cls(keys, _where=where)

  @classmethod
  def from_env(cls, variable: str, environ: Mapping[str, str] | None = None) -> APIKeys:
    """Keys from the comma-separated `variable`; unset or blank gives none."""
    value = (os.environ if environ is None else environ).get(variable, "")
    keys, where = [], []
    for i, item in enumerate(value.split(",")):
      if item.strip():
        keys.append(_parse_key(item.strip(), f"${variable} item {i + 1}"))
        where.append(f"${variable} item {i + 1}")
    return cls(keys, _where=where)

  @classmethod
  def load(cls, path: str | os.PathLike | None = None, variable: str | None = None,
           environ: Mapping[str, str] | None = None) -> APIKeys:
    """The keys of the file (if given) and of the variable (if given) together."""
    sources = ([(str(path), cls.from_file(path))] if path else []) + (
        [(f"${variable}", cls.from_env(variable, environ))] if variable else [])
    merged = cls()
    seen: dict[bytes, str] = {}
    where_id: dict[str, str] = {}
    for where, source in sources:
      for digest, key_id in source._entries:
        if digest in seen:
          raise ValueError(f"{where}: key {key_id!r} is the same key as {seen[digest]}")
        if key_id in where_id:
          raise ValueError(f"{where}: key id {key_id!r} is also used in {where_id[key_id]}")
        seen[digest] = f"key {key_id!r} of {where}"
        where_id[key_id] = where
        merged._entries.append((digest, key_id))
    return merged

  @classmethod
  def from_limits(cls, limits: ServeLimits, environ: Mapping[str, str] | None = None
                  ) -> APIKeys:
    """`load` from serve.api_keys_file and serve.api_keys_env."""
    return cls.load(limits.api_keys_file or None, limits.api_keys_env or None, environ)

  @property
  def enabled(self) -> bool:
    """Whether requests need a key (at least one is configured)."""
    return bool(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"APIKeys({[kid for _, kid in self._entries]})"

  def key_ids(self) -> list[str]:
    """The configured keys' ids (names or digest prefixes), for a startup log line."""
    return [kid for _, kid in self._entries]

  def check(self, authorization: str | None) -> AuthResult:
    """Checks an `Authorization` header value ("Bearer <key>"); None when it is absent."""
    if not self._entries:
      return AuthResult(True, 200, "anonymous", "authentication is disabled")
    if authorization is None or not authorization.strip():
      return AuthResult(False, 401, None,
                        "missing API key: send the header 'Authorization: Bearer <key>'")
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
      return AuthResult(False, 401, None,
                        "malformed Authorization header: expected 'Bearer <key>'")
    digest = hashlib.sha256(parts[1].encode("utf-8", "surrogatepass")).digest()
    found = None
    for known, key_id in self._entries:   # all of them: the time does not depend on which
      if hmac.compare_digest(known, digest):
        found = key_id
    if found is None:
      return AuthResult(False, 403, None, "invalid API key")
    return AuthResult(True, 200, found, "")


def _parse_key(text: str, where: str) -> tuple[str | None, str]:
  """`name:key` or `key` -> (name or None, key). Messages never quote the key."""
  if ":" not in text:
    return None, text
  name, key = (part.strip() for part in text.split(":", 1))
  if not name:
    raise ValueError(f"{where}: nothing before ':' (write 'name:key', or the key alone)")
  if not _KEY_NAME.fullmatch(name):
    raise ValueError(f"{where}: a key name may only hold letters, digits and '_.@-' (at most "
                     "64); a key containing ':' needs a name in front ('name:key')")
  if not key:
    raise ValueError(f"{where}: no key after {name + ':'!r}")
  return name, key


# ---------------------------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Bucket:
  requests: float
  tokens: float
  time: float


class RateLimiter:
  """Per-key token buckets: requests per minute and, optionally, generated tokens per minute.

  A bucket holds at most one minute's allowance (so a quiet key may burst that much) and
  refills continuously. How many tokens a request generates is known only afterwards, so
  `charge_tokens` takes them then and may drive the token bucket below zero: the key is refused
  until it has refilled to one token again. A rate of 0 (or None) is no limit. Thread-safe;
  `clock` (seconds, monotonic) is injectable for tests.
  """

  def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None = None,
               *, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000):
    for name, value in (("requests_per_minute", requests_per_minute),
                        ("tokens_per_minute", tokens_per_minute)):
      if value is not None and not value >= 0:
        raise ValueError(f"{name} must be >= 0 (0 = no limit), got {value}")
    self.requests_per_minute = float(requests_per_minute or 0)
    self.tokens_per_minute = float(tokens_per_minute or 0)
    self._clock = clock
    self._max_keys = max_keys   # idle (full) buckets are dropped beyond this many keys
    self._buckets: dict[str, _Bucket] = {}
    self._lock = threading.Lock()

  @classmethod
  def from_limits(cls, limits: ServeLimits, **kwargs: Any) -> RateLimiter:
    """serve.requests_per_minute and serve.tokens_per_minute."""
    return cls(limits.requests_per_minute, limits.tokens_per_minute, **kwargs)

  def acquire(self, key_id: str) -> tuple[bool, float]:
    """Takes one request from `key_id`'s bucket -> (allowed, seconds to wait when refused)."""
    with self._lock:
      bucket = self._bucket(key_id)
      wait = 0.0
      # The slack lets a caller that waited exactly the returned time in (float rounding).
      if self.requests_per_minute and bucket.requests < 1 - 1e-9:
        wait = (1 - bucket.requests) * 60 / self.requests_per_minute
      if self.tokens_per_minute and bucket.tokens < 1 - 1e-9:
        wait = max(wait, (1 - bucket.tokens) * 60 / self.tokens_per_minute)
      if wait > 0:
        return False, wait
      bucket.requests -= 1
      return True, 0.0

  def charge_tokens(self, key_id: str, tokens: int) -> None:
    """Charges `tokens` generated tokens to `key_id` (after its request)."""
    if tokens < 0:
      raise ValueError(f"tokens must be >= 0, got {tokens}")
    if not self.tokens_per_minute:
      return
    with self._lock:
      self._bucket(key_id).tokens -= tokens

  def _bucket(self, key_id: str) -> _Bucket:
    now = self._clock()
    bucket = self._buckets.get(key_id)
    if bucket is None:
      if len(self._buckets) >= self._max_keys:
        self._drop_idle(now)
      bucket = self._buckets[key_id] = _Bucket(self.requests_per_minute,
                                               self.tokens_per_minute, now)
      return bucket
    self._refill(bucket, now)
    return bucket

  def _refill(self, bucket: _Bucket, now: float) -> None:
    minutes = max(0.0, now - bucket.time) / 60
    bucket.requests = min(self.requests_per_minute,
                          bucket.requests + minutes * self.requests_per_minute)
    bucket.tokens = min(self.tokens_per_minute, bucket.tokens + minutes * self.tokens_per_minute)
    bucket.time = now

  def _drop_idle(self, now: float) -> None:
    """Forgets full buckets: a new bucket is full too, so nothing changes for their keys."""
    for key_id, bucket in list(self._buckets.items()):
      self._refill(bucket, now)
      if (bucket.requests >= self.requests_per_minute
          and bucket.tokens >= self.tokens_per_minute):
        del self._buckets[key_id]


def retry_after_header(seconds: float) -> str:
  """The Retry-After header value (whole seconds, rounded up, at least 1)."""
  return str(max(1, math.ceil(seconds)))


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

# `developer` is what newer OpenAI clients send instead of `system`; it is read as `system`.
CHAT_ROLES = ("system", "user", "assistant", "tool")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_STOP = 4                  # stop strings per request (OpenAI's limit)
_SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A checked /v1/chat/completions request.

  `messages` are dicts in the form `data.chat.render` takes: role (system, user, assistant,
  tool), content (a str: text parts joined by "\\n"; "" for an assistant turn that only calls
  tools), and where given name, tool_calls ({"id", "type": "function", "function": {"name",
  "arguments"}}) and tool_call_id. Other message fields are dropped. A user message with
  `image_url` / `input_audio` parts has IMAGE_SLOT / AUDIO_SLOT in its content where they
  were and `media`: [{"kind": "image" | "audio", "data": bytes, "param"}] in that order
  (inline base64 only; the server decodes them for a model that takes media).
  """

  model: str
  messages: tuple[dict[str, Any], ...]
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None   # {"include_usage": bool} when streaming
  logprobs: bool = False
  top_logprobs: int = 0
  tools: tuple[dict[str, Any], ...] = ()         # {"type": "function", "function": {...}}
  tool_choice: str | dict[str, Any] = "none"     # "auto", "none", "required" or a function
  parallel_tool_calls: bool = True
  total_chars: int = 0                           # text counted against serve.max_total_chars

  @property
  def include_usage(self) -> bool:
    """Whether a stream ends with a usage chunk."""
    return bool(self.stream_options and self.stream_options.get("include_usage"))


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  """A checked /v1/completions request. `logprobs` keeps the legacy meaning: None = none, k =
  the chosen token's logprob plus k alternatives."""

  model: str
  prompt: str
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int | None = None
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  logprobs: int | None = None

  @property
  def include_usage(self) -> bool:
    """Whether a stream ends with a usage chunk."""
    return bool(self.stream_options and self.stream_options.get("include_usage"))


def check_body_size(n_bytes: int, limits: ServeLimits) -> None:
  """413 when the raw body is over serve.max_body_bytes (check before parsing it)."""
  if n_bytes > limits.max_body_bytes:
    raise RequestError(413, f"the request body has {n_bytes} bytes; this server accepts at most "
                       f"{limits.max_body_bytes} (serve.max_body_bytes)",
                       code="request_too_large")


def check_model(model: str, available: Collection[str]) -> None:
  """404 model_not_found when `model` is not one of `available`."""
  if model not in available:
    raise RequestError(404, f"the model {model!r} does not exist on this server; available: "
                       f"{', '.join(sorted(available)) or 'none'}", "model", "model_not_found")


def validate_chat_request(body: Any, limits: ServeLimits = ServeLimits(),
                          body_bytes: int | None = None) -> ChatRequest:
  """Checks a chat-completions body -> ChatRequest, or raises RequestError naming the field.

  `body_bytes` is the raw body's length when the server has it (413 above the cap).
  """
  body = _start(body, limits, body_bytes)
  _refuse_unsupported(body, _CHAT_UNSUPPORTED)
  model = _model(body)
  messages, chars = _messages(body.get("messages"), limits)
  tools, tool_chars = _tools(body.get("tools"), limits)
  chars += tool_chars
  if chars > limits.max_total_chars:
    raise RequestError(400, f"the request holds {chars} characters of text (messages and "
                       f"tools); this server accepts at most {limits.max_total_chars} "
                       "(serve.max_total_chars)", "messages", "string_above_max_length")
  logprobs = _optional(body, "logprobs", _is_bool, "a boolean", False)
  top_logprobs = _optional(body, "top_logprobs", _is_int, "an integer", 0)
  if not 0 <= top_logprobs <= 20:
    raise RequestError(400, f"top_logprobs must be between 0 and 20, got {top_logprobs}",
                       "top_logprobs", "invalid_value")
  if top_logprobs and not logprobs:
    raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs",
                       "invalid_value")
  _check_top_logprobs(top_logprobs, "top_logprobs", limits)
  parallel = _optional(body, "parallel_tool_calls", _is_bool, "a boolean", True)
  stream, stream_options = _stream(body)
  return ChatRequest(
      model=model, messages=messages, max_tokens=_max_tokens(body, limits),
      **_sampling(body), stream=stream, stream_options=stream_options, logprobs=logprobs,
      top_logprobs=top_logprobs, tools=tools,
      tool_choice=_tool_choice(body.get("tool_choice"), tools), parallel_tool_calls=parallel,
      total_chars=chars)


def validate_completion_request(body: Any, limits: ServeLimits = ServeLimits(),
                                body_bytes: int | None = None) -> CompletionRequest:
  """Checks a (legacy) completions body -> CompletionRequest, or raises RequestError."""
  body = _start(body, limits, body_bytes)
  _refuse_unsupported(body, _COMPLETION_UNSUPPORTED)
  model = _model(body)
  prompt = body.get("prompt")
  if prompt is None:
    raise RequestError(400, "prompt is required", "prompt", "missing_required_parameter")
  if isinstance(prompt, list):
    if prompt and all(_is_int(p) for p in prompt) or any(isinstance(p, list) for p in prompt):
      raise RequestError(400, "token-id prompts are not supported; send the prompt as text",
                         "prompt", "unsupported_value")
    if len(prompt) != 1:
      raise RequestError(400, f"prompt is a list of {len(prompt)} prompts; this server takes "
                         "one prompt per request (a string, or a list of one string)",
                         "prompt", "unsupported_value")
    if not isinstance(prompt[0], str):
      raise _type_error("prompt[0]", "a string", prompt[0])
    prompt = prompt[0]
  if not isinstance(prompt, str):
    raise _type_error("prompt", "a string or a list of one string", prompt)
  _check_text(prompt, "prompt")
  if len(prompt) > limits.max_total_chars:
    raise RequestError(400, f"prompt has {len(prompt)} characters; this server accepts at most "
                       f"{limits.max_total_chars} (serve.max_total_chars)", "prompt",
                       "string_above_max_length")
  logprobs = _optional(body, "logprobs", _is_int, "an integer (0 to 5) on /v1/completions",
                       None)
  if logprobs is not None:
    if not 0 <= logprobs <= 5:
      raise RequestError(400, f"logprobs must be between 0 and 5, got {logprobs}", "logprobs",
                         "invalid_value")
    _check_top_logprobs(logprobs, "logprobs", limits)
  stream, stream_options = _stream(body)
  return CompletionRequest(model=model, prompt=prompt, max_tokens=_max_tokens(body, limits),
                           **_sampling(body), stream=stream, stream_options=stream_options,
                           logprobs=logprobs)


# Known fields this server cannot honour -> (accepts the value as neutral, hint).
_Neutral = dict[str, tuple[Callable[[Any], bool], str]]
_COMMON_UNSUPPORTED: _Neutral = {
    "n": (lambda v: v == 1 and not isinstance(v, bool),
          "this server returns one choice per request; send n: 1 (or omit it) and make "
          "separate requests"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported; omit it or send 0"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported; omit it or send 0"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported; omit it"),
}
_CHAT_UNSUPPORTED: _Neutral = {
    **_COMMON_UNSUPPORTED,
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") == "text",
                        "only {'type': 'text'} is supported (no JSON mode or schemas)"),
    "functions": (lambda v: False, "the deprecated 'functions' is not supported; send 'tools'"),
    "function_call": (lambda v: False,
                      "the deprecated 'function_call' is not supported; send 'tool_choice'"),
    "modalities": (lambda v: v == ["text"], "this server produces text only"),
    "audio": (lambda v: False, "this server produces text only"),
    "prediction": (lambda v: False, "predicted outputs are not supported; omit it"),
}
_COMPLETION_UNSUPPORTED: _Neutral = {
    **_COMMON_UNSUPPORTED,
    "best_of": (lambda v: v == 1 and not isinstance(v, bool),
                "best_of > 1 is not supported; omit it or send 1"),
    "echo": (lambda v: v is False, "echo is not supported; omit it or send false"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported; omit it"),
}


def _start(body: Any, limits: ServeLimits, body_bytes: int | None) -> dict[str, Any]:
  if body_bytes is not None:
    check_body_size(body_bytes, limits)
  if not isinstance(body, dict):
    raise RequestError(400, f"the request body must be a JSON object, got {_describe(body)}",
                       code="invalid_type")
  return body


def _refuse_unsupported(body: dict[str, Any], table: _Neutral) -> None:
  for name, (neutral, hint) in table.items():
    value = body.get(name)
    if value is not None and not neutral(value):
      raise RequestError(400, f"{name}={_short(value)} is not supported: {hint}", name,
                         "unsupported_parameter")


def _model(body: dict[str, Any]) -> str:
  model = body.get("model")
  if model is None:
    raise RequestError(400, "model is required", "model", "missing_required_parameter")
  if not isinstance(model, str) or not model.strip():
    raise _type_error("model", "a non-empty string", model)
  return model


def _max_tokens(body: dict[str, Any], limits: ServeLimits) -> int:
  given = {}
  for name in ("max_completion_tokens", "max_tokens"):
    value = _optional(body, name, _is_int, "an integer", None)
    if value is None:
      continue
    if value < 1:
      raise RequestError(400, f"{name} must be >= 1, got {value}", name, "invalid_value")
    if value > limits.max_tokens:
      raise RequestError(400, f"{name}={value} is above this server's cap of "
                         f"{limits.max_tokens} tokens per request (serve.max_tokens); ask for "
                         f"at most {limits.max_tokens} (it is refused rather than cut, so a "
                         "shorter answer never comes back unannounced)", name, "invalid_value")
    given[name] = value
  if len(set(given.values())) > 1:
    raise RequestError(400, f"max_tokens ({given['max_tokens']}) and max_completion_tokens "
                       f"({given['max_completion_tokens']}) disagree; send one of them",
                       "max_tokens", "invalid_value")
  return next(iter(given.values()), limits.default_max_tokens)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
  temperature = _optional(body, "temperature", _is_number, "a number", 1.0)
  if not 0 <= temperature <= 2:
    raise RequestError(400, f"temperature must be between 0 and 2, got {temperature}",
                       "temperature", "invalid_value")
  top_p = _optional(body, "top_p", _is_number, "a number", 1.0)
  if not 0 < top_p <= 1:
    raise RequestError(400, f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
  seed = _optional(body, "seed", _is_int, "an integer", None)
  if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
    raise RequestError(400, f"seed must fit in 64 bits, got {seed}", "seed", "invalid_value")
  return {"temperature": float(temperature), "top_p": float(top_p), "stop": _stop(body),
          "seed": seed}


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
    params = ["stop"]
  elif isinstance(stop, list):
    if len(stop) > MAX_STOP:
      raise RequestError(400, f"stop holds {len(stop)} strings; at most {MAX_STOP} are allowed",
                         "stop", "array_above_max_length")
    params = [f"stop[{i}]" for i in range(len(stop))]
  else:
    raise _type_error("stop", "a string or a list of strings", stop)
  for param, item in zip(params, stop):
    if not isinstance(item, str):
      raise _type_error(param, "a string", item)
    if not item:
      raise RequestError(400, f"{param} is empty; a stop string needs at least one character",
                         param, "invalid_value")
    _check_text(item, param)
  return tuple(stop)


def _stream(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
  stream = _optional(body, "stream", _is_bool, "a boolean", False)
  options = body.get("stream_options")
  if options is None:
    return stream, ({"include_usage": False} if stream else None)
  if not isinstance(options, dict):
    raise _type_error("stream_options", "an object", options)
  if not stream:
    raise RequestError(400, "stream_options is only allowed with stream: true",
                       "stream_options", "invalid_value")
  include = _optional(options, "include_usage", _is_bool, "a boolean", False,
                      "stream_options.include_usage")
  return stream, {"include_usage": include}


def _check_top_logprobs(value: int, param: str, limits: ServeLimits) -> None:
  if value > limits.max_top_logprobs:
    if limits.max_top_logprobs == 0:
      what = "does not return alternative tokens (only the chosen token's logprob)"
    else:
      what = f"returns at most {limits.max_top_logprobs} alternatives per token"
    raise RequestError(400, f"{param}={value}: this server {what} "
                       f"(serve.max_top_logprobs={limits.max_top_logprobs})", param,
                       "unsupported_value")


def _messages(raw: Any, limits: ServeLimits) -> tuple[tuple[dict[str, Any], ...], int]:
  """-> (normalised messages, characters of text in them)."""
  if raw is None:
    raise RequestError(400, "messages is required", "messages", "missing_required_parameter")
  if not isinstance(raw, list):
    raise _type_error("messages", "a list of messages", raw)
  if not raw:
    raise RequestError(400, "messages is empty; send at least one message", "messages",
                       "empty_array")
  if len(raw) > limits.max_messages:
    raise RequestError(400, f"messages holds {len(raw)} messages; this server accepts at most "
                       f"{limits.max_messages} (serve.max_messages)", "messages",
                       "array_above_max_length")
  out, chars, media_count = [], 0, 0
  for i, message in enumerate(raw):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise _type_error(where, "an object", message)
    role = message.get("role")
    if role is None:
      raise RequestError(400, f"{where}.role is required", f"{where}.role",
                         "missing_required_parameter")
    if role == "developer":
      role = "system"
    if role not in CHAT_ROLES:
      raise RequestError(400, f"{where}.role must be one of {', '.join(map(repr, CHAT_ROLES))}, "
                         f"got {_short(role)}", f"{where}.role", "invalid_value")
    normal: dict[str, Any] = {"role": role}
    calls = message.get("tool_calls")
    if calls is not None:
      if role != "assistant":
        raise RequestError(400, f"{where}.tool_calls is only allowed on assistant messages",
                           f"{where}.tool_calls", "invalid_value")
      normal["tool_calls"], n = _message_tool_calls(calls, f"{where}.tool_calls")
      chars += n
    media: list[dict[str, Any]] = []
    content = _content(message.get("content"), f"{where}.content", media)
    if media:
      if role != "user":
        raise RequestError(400, f"{media[0]['param']}: image and audio parts are only allowed "
                           f"in user messages, not {role} ones", media[0]["param"],
                           "invalid_value")
      media_count += len(media)
      if media_count > limits.max_media:
        raise RequestError(400, f"{media[-1]['param']}: more than {limits.max_media} image and "
                           f"audio parts in one request (serve.max_media)", media[-1]["param"],
                           "array_above_max_length")
      normal["media"] = media
    if content is None:
      if role == "assistant" and normal.get("tool_calls"):
        content = ""
      else:
        raise RequestError(400, f"{where}.content is required for a {role} message",
                           f"{where}.content", "missing_required_parameter")
    normal["content"] = content
    chars += len(content)
    name = message.get("name")
    if name is not None:
      if not isinstance(name, str):
        raise _type_error(f"{where}.name", "a string", name)
      normal["name"] = name
    call_id = message.get("tool_call_id")
    if role == "tool":
      if call_id is None:
        raise RequestError(400, f"{where}.tool_call_id is required for a tool message",
                           f"{where}.tool_call_id", "missing_required_parameter")
      if not isinstance(call_id, str):
        raise _type_error(f"{where}.tool_call_id", "a string", call_id)
      normal["tool_call_id"] = call_id
    out.append(normal)
  return tuple(out), chars


def _content(content: Any, where: str, media: list[dict[str, Any]] | None = None
             ) -> str | None:
  """A message's content as one string (text parts joined by "\\n"); None when absent.
  `image_url` and `input_audio` parts become the placeholders IMAGE_SLOT / AUDIO_SLOT in
  the text, their decoded data appended to `media` in order (`_media_part`)."""
  if content is None or isinstance(content, str):
    if content is not None:
      _check_text(content, where)
    return content
  if not isinstance(content, list):
    raise _type_error(where, "a string or a list of content parts", content)
  texts = []
  for j, part in enumerate(content):
    param = f"{where}[{j}]"
    if not isinstance(part, dict):
      raise _type_error(param, "an object", part)
    kind = part.get("type")
    if kind in MEDIA_PARTS and media is not None:
      media.append(_media_part(part, kind, param))
      texts.append(MEDIA_PARTS[kind])
      continue
    if kind != "text":
      if not isinstance(kind, str):
        raise _type_error(f"{param}.type", "a string", kind)
      raise RequestError(400, f"{param}.type {kind!r} is not supported: this server takes "
                         "text, image_url and input_audio parts", f"{param}.type",
                         "unsupported_value")
    text = part.get("text")
    if not isinstance(text, str):
      raise _type_error(f"{param}.text", "a string", text)
    _check_text(text, f"{param}.text")
    texts.append(text)
  return "\n".join(texts)


# Content part type -> the placeholder string it becomes in the message text (a vision- or
# audio-language model's chat format expands it to the item's tokens).
IMAGE_SLOT = "<image>"
AUDIO_SLOT = "<audio>"
MEDIA_PARTS = {"image_url": IMAGE_SLOT, "input_audio": AUDIO_SLOT}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?;base64,(?P<data>.*)", re.DOTALL)


def _media_part(part: dict[str, Any], kind: str, param: str) -> dict[str, Any]:
  """An `image_url` ({"url": "data:image/png;base64,..."}) or `input_audio` ({"data": base64,
  "format": "wav"}) part -> {"kind": "image" | "audio", "data": bytes, "param"}. The server
  fetches nothing: only inline base64 data is taken."""
  body = part.get(kind)
  if kind == "image_url":
    if isinstance(body, str):
      body = {"url": body}
    if not isinstance(body, dict):
      raise _type_error(f"{param}.image_url", "an object", body)
    url = body.get("url")
    if not isinstance(url, str):
      raise _type_error(f"{param}.image_url.url", "a string", url)
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
      raise RequestError(400, f"{param}.image_url.url must be a base64 data URL "
                         "(data:image/png;base64,...); this server does not fetch URLs",
                         f"{param}.image_url.url", "invalid_value")
    encoded, field, what = match["data"], f"{param}.image_url.url", "image"
  else:
    if not isinstance(body, dict):
      raise _type_error(f"{param}.input_audio", "an object", body)
    fmt = body.get("format")
    if fmt != "wav":
      raise RequestError(400, f"{param}.input_audio.format must be 'wav' (16-bit PCM), got "
                         f"{_short(fmt)}", f"{param}.input_audio.format", "unsupported_value")
    encoded, field, what = body.get("data"), f"{param}.input_audio.data", "audio"
    if not isinstance(encoded, str):
      raise _type_error(field, "a base64 string", encoded)
  try:
    data = base64.b64decode(encoded, validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(400, f"{field} is not valid base64", field, "invalid_value") from None
  if not data:
    raise RequestError(400, f"{field} holds no data", field, "invalid_value")
  return {"kind": what, "data": data, "param": param}


def _message_tool_calls(calls: Any, where: str) -> tuple[list[dict[str, Any]], int]:
  if not isinstance(calls, list):
    raise _type_error(where, "a list", calls)
  out, chars = [], 0
  for j, call in enumerate(calls):
    param = f"{where}[{j}]"
    if not isinstance(call, dict):
      raise _type_error(param, "an object", call)
    if call.get("type", "function") != "function":
      raise RequestError(400, f"{param}.type must be 'function', got {_short(call['type'])}",
                         f"{param}.type", "invalid_value")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
      raise _type_error(f"{param}.id", "a string", call_id)
    function = call.get("function")
    if not isinstance(function, dict):
      raise _type_error(f"{param}.function", "an object", function)
    name = function.get("name")
    if not isinstance(name, str) or not name:
      raise _type_error(f"{param}.function.name", "a non-empty string", name)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
      try:
        parsed = json.loads(arguments)
      except ValueError as e:
        raise RequestError(400, f"{param}.function.arguments is not valid JSON ({e})",
                           f"{param}.function.arguments", "invalid_value") from None
      if not isinstance(parsed, dict):
        raise _type_error(f"{param}.function.arguments", "a JSON object", parsed)
      text = arguments
    elif isinstance(arguments, dict):
      text = json.dumps(arguments, ensure_ascii=False)
    else:
      raise _type_error(f"{param}.function.arguments", "a JSON string", arguments)
    _check_text(text, f"{param}.function.arguments")
    chars += len(text)
    normal = {"type": "function", "function": {"name": name, "arguments": text}}
    if call_id is not None:
      normal["id"] = call_id
    out.append(normal)
  return out, chars


def _tools(raw: Any, limits: ServeLimits) -> tuple[tuple[dict[str, Any], ...], int]:
  """-> (normalised tools, characters of their JSON)."""
  if raw is None:
    return (), 0
  if not isinstance(raw, list):
    raise _type_error("tools", "a list", raw)
  if len(raw) > limits.max_tools:
    raise RequestError(400, f"tools holds {len(raw)} tools; this server accepts at most "
                       f"{limits.max_tools} (serve.max_tools)", "tools", "array_above_max_length")
  out, names = [], set()
  for j, tool in enumerate(raw):
    where = f"tools[{j}]"
    if not isinstance(tool, dict):
      raise _type_error(where, "an object", tool)
    if tool.get("type") != "function":
      raise RequestError(400, f"{where}.type must be 'function', got {_short(tool.get('type'))}",
                         f"{where}.type", "invalid_value")
    function = tool.get("function")
    if not isinstance(function, dict):
      raise _type_error(f"{where}.function", "an object", function)
    name = function.get("name")
    if not isinstance(name, str):
      raise _type_error(f"{where}.function.name", "a string", name)
    if not _FUNCTION_NAME.fullmatch(name):
      raise RequestError(400, f"{where}.function.name {name!r} must be 1 to 64 letters, digits, "
                         "'_' or '-'", f"{where}.function.name", "invalid_value")
    if name in names:
      raise RequestError(400, f"{where}.function.name {name!r} is given twice",
                         f"{where}.function.name", "invalid_value")
    names.add(name)
    normal: dict[str, Any] = {"name": name}
    description = function.get("description")
    if description is not None:
      if not isinstance(description, str):
        raise _type_error(f"{where}.function.description", "a string", description)
      normal["description"] = description
    parameters = function.get("parameters")
    if parameters is None:
      parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
      raise _type_error(f"{where}.function.parameters", "a JSON schema object", parameters)
    if parameters.get("type", "object") != "object":
      raise RequestError(400, f"{where}.function.parameters must be a schema of type 'object', "
                         f"got type {_short(parameters['type'])}", f"{where}.function.parameters",
                         "invalid_value")
    _check_schema(parameters, f"{where}.function.parameters")
    normal["parameters"] = parameters
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
      raise _type_error(f"{where}.function.strict", "a boolean", strict)
    out.append({"type": "function", "function": normal})
  return tuple(out), len(json.dumps(out, ensure_ascii=False))


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
  """The structure `validate_tool_arguments` reads: known types, and the right shapes."""
  if depth > 32:
    raise RequestError(400, f"{where} is nested more than 32 levels deep", where,
                       "invalid_value")
  if not isinstance(schema, dict):
    raise _type_error(where, "a JSON schema object", schema)
  types = schema.get("type")
  if types is not None:
    for t in [types] if isinstance(types, str) else types if isinstance(types, list) else [types]:
      if t not in _TYPE_CHECKS:
        raise RequestError(400, f"{where}.type {_short(t)} is not a JSON schema type "
                           f"({', '.join(_TYPE_CHECKS)})", f"{where}.type", "invalid_value")
  properties = schema.get("properties")
  if properties is not None:
    if not isinstance(properties, dict):
      raise _type_error(f"{where}.properties", "an object", properties)
    for name, sub in properties.items():
      _check_schema(sub, f"{where}.properties.{name}", depth + 1)
  required = schema.get("required")
  if required is not None and not (isinstance(required, list)
                                   and all(isinstance(r, str) for r in required)):
    raise _type_error(f"{where}.required", "a list of strings", required)
  for key in ("items", "additionalProperties"):
    sub = schema.get(key)
    if sub is not None and not isinstance(sub, bool):
      _check_schema(sub, f"{where}.{key}", depth + 1)
  enum = schema.get("enum")
  if enum is not None and not isinstance(enum, list):
    raise _type_error(f"{where}.enum", "a list", enum)


def _tool_choice(raw: Any, tools: tuple[dict[str, Any], ...]) -> str | dict[str, Any]:
  if raw is None:
    return "auto" if tools else "none"
  if isinstance(raw, str):
    if raw not in ("auto", "none", "required"):
      raise RequestError(400, f"tool_choice must be 'auto', 'none', 'required' or a function, "
                         f"got {raw!r}", "tool_choice", "invalid_value")
    if raw != "none" and not tools:
      raise RequestError(400, f"tool_choice {raw!r} needs tools", "tool_choice",
                         "invalid_value")
    return raw
  if not isinstance(raw, dict):
    raise _type_error("tool_choice", "a string or an object", raw)
  if raw.get("type") != "function":
    raise RequestError(400, f"tool_choice.type must be 'function', got {_short(raw.get('type'))}",
                       "tool_choice.type", "invalid_value")
  function = raw.get("function")
  name = function.get("name") if isinstance(function, dict) else None
  if not isinstance(name, str):
    raise _type_error("tool_choice.function.name", "a string", name)
  known = [t["function"]["name"] for t in tools]
  if name not in known:
    raise RequestError(400, f"tool_choice names the function {name!r}, which is not in tools "
                       f"({', '.join(known) or 'none given'})", "tool_choice.function.name",
                       "invalid_value")
  return {"type": "function", "function": {"name": name}}


def _is_bool(v: Any) -> bool:
  return isinstance(v, bool)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], expected: str,
              default: Any, param: str | None = None) -> Any:
  """`body[name]` if present and not null (checked), else `default`."""
  value = body.get(name)
  if value is None:
    return default
  if not check(value):
    raise _type_error(param or name, expected, value)
  return value


def _check_text(text: str, param: str) -> None:
  """Lone surrogates ("\\ud800" in the JSON) cannot be tokenised: a 400, not a crash later."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise RequestError(400, f"{param} holds an unpaired UTF-16 surrogate (not valid Unicode)",
                       param, "invalid_value") from None


def _type_error(param: str, expected: str, value: Any) -> RequestError:
  return RequestError(400, f"{param} must be {expected}, got {_describe(value)}", param,
                      "invalid_type")


def _describe(value: Any) -> str:
  kind = _json_type(value) if value is not None else "null"
  return kind if value is None else f"{kind} {_short(value)}"


def _short(value: Any, limit: int = 40) -> str:
  text = json.dumps(value, default=repr, ensure_ascii=False)
  return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Output: tool arguments
# ---------------------------------------------------------------------------------------------

MAX_PROBLEMS = 20


def validate_tool_arguments(arguments_json: str | Mapping[str, Any],
                            parameters_schema: Mapping[str, Any] | None) -> list[str]:
  """Problems of a model-written tool call's arguments against the tool's JSON schema.

  [] means valid. Checks the subset OpenAI function schemas use: type, properties, required,
  enum, items, additionalProperties (false or a schema), minimum / maximum (and exclusive),
  minLength / maxLength, minItems / maxItems; other keywords are not checked. Unlike the
  router's `validate_arguments` (for our own tools, where an unlisted field is a mistake), an
  absent additionalProperties allows extra fields, as JSON Schema says, since the schema is
  the client's; and every problem is listed (at most 20), not only the first.
  """
  if isinstance(arguments_json, str):
    try:
      arguments = json.loads(arguments_json)
    except ValueError as e:
      return [f"arguments are not valid JSON ({e})"]
  else:
    arguments = arguments_json
  if not isinstance(arguments, dict):
    return [f"arguments must be a JSON object, got {_json_type(arguments)}"]
  problems: list[str] = []
  _schema_problems(parameters_schema or {}, arguments, "arguments", problems)
  return problems[:MAX_PROBLEMS]


def _schema_problems(schema: Any, value: Any, path: str, out: list[str]) -> None:
  if len(out) >= MAX_PROBLEMS:
    return
  if schema is False:
    out.append(f"{path}: not allowed")
    return
  if not isinstance(schema, Mapping):
    return
  types = schema.get("type")
  if types is not None:
    types = [types] if isinstance(types, str) else list(types)
    unknown = [t for t in types if t not in _TYPE_CHECKS]
    if unknown:
      out.append(f"{path}: the schema has the unsupported type {unknown[0]!r}")
      return
    if not any(_TYPE_CHECKS[t](value) for t in types):
      out.append(f"{path}: expected {' or '.join(types)}, got {_json_type(value)}")
      return
  if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
    out.append(f"{path}: {_short(value)} is not one of {_short(schema['enum'], 80)}")
  if _is_number(value):
    for key, bad in (("minimum", lambda v, b: v < b), ("maximum", lambda v, b: v > b),
                     ("exclusiveMinimum", lambda v, b: v <= b),
                     ("exclusiveMaximum", lambda v, b: v >= b)):
      bound = schema.get(key)
      if _is_number(bound) and bad(value, bound):
        out.append(f"{path}: {value} breaks {key} {bound}")
  if isinstance(value, str):
    _length(schema, len(value), path, "minLength", "maxLength", "characters", out)
  if isinstance(value, list):
    _length(schema, len(value), path, "minItems", "maxItems", "items", out)
    items = schema.get("items")
    if items is not None:
      for i, item in enumerate(value):
        _schema_problems(items, item, f"{path}[{i}]", out)
  if isinstance(value, dict):
    properties = schema.get("properties") or {}
    for name in schema.get("required") or ():
      if name not in value:
        out.append(f"{path}: missing required field {name!r}")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
      if name in properties:
        _schema_problems(properties[name], item, f"{path}.{name}", out)
      elif extra is False:
        allowed = ", ".join(sorted(properties)) or "none"
        out.append(f"{path}: unknown field {name!r} (allowed: {allowed})")
      elif isinstance(extra, Mapping):
        _schema_problems(extra, item, f"{path}.{name}", out)


def _length(schema: Mapping[str, Any], n: int, path: str, low: str, high: str, unit: str,
            out: list[str]) -> None:
  if _is_int(schema.get(low)) and n < schema[low]:
    out.append(f"{path}: {n} {unit}, fewer than {low} {schema[low]}")
  if _is_int(schema.get(high)) and n > schema[high]:
    out.append(f"{path}: {n} {unit}, more than {high} {schema[high]}")


def _same(a: Any, b: Any) -> bool:
  """JSON equality: true is not 1 (Python's == says it is)."""
  return a == b and isinstance(a, bool) == isinstance(b, bool)


# ---------------------------------------------------------------------------------------------
# Output: blocked patterns and PII
# ---------------------------------------------------------------------------------------------


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# (kind, regex, check on the matched text). Each regex starts only where a run begins (the
# lookbehinds), so scanning stays linear on long text. Phone numbers need separators or a
# "+": a bare 10-digit number in an answer is more often arithmetic than a phone.
_PII: tuple[tuple[str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("EMAIL", re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                         r"\.[A-Za-z]{2,}(?![\w-])"), None),
    ("CREDIT_CARD", re.compile(r"(?<![\d.-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}"
                               r"(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{5})(?!\d|[.-]\d)"),
     lambda text: _luhn_ok(re.sub(r"\D", "", text))),
    ("SSN", re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
     None),
    ("PHONE", re.compile(r"(?<![\w+])(?:(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}"
                         r"[ .-]\d{4}|\+\d{1,3}(?:[ .-]?\d){6,14})(?!\w|[.-]\d)"), None),
    ("IPV4", re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\d|\.\d)"), None),
)
PII_KINDS = tuple(kind for kind, _, _ in _PII)


def _luhn_ok(digits: str) -> bool:
  """The Luhn checksum every payment card number satisfies (13 to 19 digits)."""
  if not 13 <= len(digits) <= 19:
    return False
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = int(ch) * (2 if i % 2 else 1)
    total += d - 9 if d > 9 else d
  return total % 10 == 0


def _pii_spans(text: str) -> list[tuple[int, int, str]]:
  """Non-overlapping (start, end, kind) of the PII in `text`; the earlier, then longer, wins."""
  spans = []
  for kind, pattern, check in _PII:
    for match in pattern.finditer(text):
      if check is None or check(match.group()):
        spans.append((match.start(), match.end(), kind))
  spans.sort(key=lambda s: (s[0], s[0] - s[1]))
  kept: list[tuple[int, int, str]] = []
  for span in spans:
    if not kept or span[0] >= kept[-1][1]:
      kept.append(span)
  return kept


class Finding(NamedTuple):
  """What the filter did: kind BLOCKED (detail: the pattern) or a PII kind such as EMAIL.

  Never the matched text, so findings can be logged.
  """

  kind: str
  detail: str = ""


class FilterResult(NamedTuple):
  """Filtered text and what was found; `blocked` -> finish_reason "content_filter"."""

  text: str
  findings: list[Finding]

  @property
  def blocked(self) -> bool:
    """Whether a blocked pattern ended the text."""
    return any(f.kind == "BLOCKED" for f in self.findings)

  @property
  def finish_reason(self) -> str | None:
    """"content_filter" when blocked, else None (keep the generation's own reason)."""
    return "content_filter" if self.blocked else None


class OutputFilter:
  """Blocked patterns end the output at the first match; PII is redacted as [REDACTED:KIND].

  Patterns are Python regexes matched on the raw text (before redaction), e.g. "(?i)secret
  project". Redaction covers EMAIL, PHONE (with separators or a leading +), CREDIT_CARD
  (13-19 digits, plain or in groups of 4, Luhn-checked), IPV4 and SSN (ddd-dd-dddd).
  """

  def __init__(self, blocked_patterns: Iterable[str | re.Pattern[str]] = (),
               redact_pii: bool = False):
    self.patterns = compile_patterns(blocked_patterns)
    self.redact_pii = redact_pii

  @classmethod
  def from_limits(cls, limits: ServeLimits) -> OutputFilter:
    """serve.blocked_patterns and serve.redact_pii."""
    return cls(limits.blocked_patterns, limits.redact_pii)

  @property
  def active(self) -> bool:
    """Whether this filter can change any text (else streams pass through unheld)."""
    return bool(self.patterns) or self.redact_pii

  def apply(self, text: str) -> FilterResult:
    """The whole output filtered -> (text, findings); see FilterResult.blocked."""
    findings: list[Finding] = []
    cut = len(text)
    block = self._first_block(text, 0)
    if block is not None:
      cut = block[0]
      findings.append(Finding("BLOCKED", block[1]))
    out, found = self._redact(text, 0, cut)   # PII cut by the block is still redacted
    return FilterResult(out, found + findings)

  def stream(self, hold_back: int | None = None) -> StreamFilter:
    """A StreamFilter with this filter's rules."""
    return StreamFilter(self) if hold_back is None else StreamFilter(self, hold_back)

  def _first_block(self, text: str, after: int) -> tuple[int, str] | None:
    """(start, pattern) of the earliest match that ends after `after`, or None."""
    best = None
    for pattern in self.patterns:
      for match in pattern.finditer(text):
        if match.end() > after:
          if best is None or match.start() < best[0]:
            best = (match.start(), pattern.pattern)
          break
    return best

  def _redact(self, text: str, start: int, end: int,
              spans: list[tuple[int, int, str]] | None = None) -> tuple[str, list[Finding]]:
    """text[start:end] with the PII spans inside it replaced (spans found on all of `text`)."""
    if not self.redact_pii:
      return text[start:end], []
    if spans is None:
      spans = _pii_spans(text)
    parts, findings, pos = [], [], start
    for s, e, kind in spans:
      if e <= start or s >= end:
        continue
      parts.append(text[pos:max(s, start)])
      parts.append(f"[REDACTED:{kind}]")
      findings.append(Finding(kind))
      pos = min(e, end)
    parts.append(text[pos:end])
    return "".join(parts), findings


DEFAULT_HOLD_BACK = 64


class StreamFilter:
  """`OutputFilter` over a stream of chunks: `feed` returns what is safe to send now.

  It holds back the last `hold_back` characters (64 by default: longer than a card number in
  groups, a phone number, an IPv4 address or an SSN, and than most emails), so any match of
  at most that many characters is caught however the text was split; a longer one is caught
  when it falls within the held text. A complete PII match across the cut is held whole. Text
  already sent stays visible to later matches as context (lookbehinds, \\b). With nothing to
  filter, chunks pass straight through. When a pattern is blocked, `feed` returns the text up
  to the match and `blocked` True; stop generating and send finish_reason "content_filter".
  """

  def __init__(self, output_filter: OutputFilter, hold_back: int = DEFAULT_HOLD_BACK):
    if hold_back < 1:
      raise ValueError(f"hold_back must be >= 1, got {hold_back}")
    self.filter = output_filter
    self.hold_back = hold_back
    self.findings: list[Finding] = []
    self.blocked = False
    self._pending = ""     # received, not sent
    self._context = ""     # the last hold_back characters sent (raw)
    self._done = False

  def feed(self, chunk: str, final: bool = False) -> tuple[str, bool]:
    """Adds `chunk` -> (text to send now, blocked). `final=True` flushes (the stream's end)."""
    if self._done:
      if self.blocked:
        return "", True
      raise RuntimeError("StreamFilter.feed after the final chunk")
    if not self.filter.active:
      self._done = final
      return chunk, False
    self._pending += chunk
    out = self._emit(final)
    self._done = final or self.blocked
    return out, self.blocked

  def finish(self) -> str:
    """The held-back rest, filtered (the stream ended)."""
    return self.feed("", final=True)[0]

  @property
  def finish_reason(self) -> str | None:
    """"content_filter" once blocked, else None."""
    return "content_filter" if self.blocked else None

  def _emit(self, final: bool) -> str:
    text = self._context + self._pending
    base = len(self._context)
    block = self.filter._first_block(text, base)
    if block is not None:
      cut = max(block[0], base)
      self.blocked = True
      self.findings.append(Finding("BLOCKED", block[1]))
      final = True
    elif final:
      cut = len(text)
    else:
      cut = len(text) - self.hold_back
    spans = _pii_spans(text) if self.filter.redact_pii else []
    if not final and len(self._pending) <= 8 * self.hold_back:
      for s, e, _ in spans:      # do not cut through a match (unless it keeps growing)
        if s < cut < e:
          cut = s
    if cut <= base:
      return ""
    out, found = self.filter._redact(text, base, cut, spans)
    self.findings += found
    self._context = text[:cut][-self.hold_back:]
    self._pending = text[cut:]
    return out


# ---------------------------------------------------------------------------------------------
# Audit log
# ---------------------------------------------------------------------------------------------


class AuditLog:
  """One JSON line per request, appended under a lock (and O_APPEND), file mode 0600.

  Records hold the key's id, never the key or the Authorization header: `write` takes named
  fields only, so nothing else can slip in. Message content is not logged; with
  `content_hash=True` a SHA-256 of it is, so a record can be matched to a conversation someone
  holds without the log holding the text.
  """

  def __init__(self, path: str | os.PathLike, *, content_hash: bool = False,
               clock: Callable[[], float] = time.time):
    self.path = os.fspath(path)
    self.content_hash = content_hash
    self._clock = clock
    self._lock = threading.Lock()
    try:
      self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
      raise ValueError(f"cannot open the audit log {self.path}: {e.strerror or e}") from None

  @classmethod
  def from_limits(cls, limits: ServeLimits) -> AuditLog | None:
    """serve.audit_log (None when "") with serve.audit_content_hash."""
    if not limits.audit_log:
      return None
    return cls(limits.audit_log, content_hash=limits.audit_content_hash)

  def write(self, *, request_id: str, key_id: str | None, endpoint: str, status: int,
            model: str = "", prompt_tokens: int = 0, completion_tokens: int = 0,
            latency_s: float = 0.0, finish_reason: str | None = None, client: str = "",
            error_code: str | None = None, content: Any = None) -> dict[str, Any]:
    """Appends one request's record and returns it. `content` (the messages and the reply, in
    any JSON-able form) is only hashed, and only with content_hash=True."""
    now = self._clock()
    record = {
        "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request_id, "key_id": key_id, "endpoint": endpoint, "model": model,
        "status": status, "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens, "latency_s": round(latency_s, 4),
        "finish_reason": finish_reason, "client": client,
    }
    if error_code is not None:
      record["error_code"] = error_code
    if self.content_hash and content is not None:
      text = content if isinstance(content, str) else json.dumps(
          content, sort_keys=True, ensure_ascii=False, default=repr)
      record["content_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")
                                                ).hexdigest()
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
    with self._lock:
      if self._fd is None:
        raise ValueError(f"the audit log {self.path} is closed")
      view = memoryview(data)
      while view:
        view = view[os.write(self._fd, view):]
    return record

  def close(self) -> None:
    """Closes the file; later writes are errors."""
    with self._lock:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> AuditLog:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
