"""A client for OpenAI-compatible chat-completions endpoints, standard library only.

Shared by the LLM judge (rl/judge.py) and the collaboration's `openai` backend
(rl/backends.py), so that retries, timeouts and the API-key rule live in one place. The key
is read from the environment variable named in the config at request time; only the
variable's name is ever stored or logged. Failures raise `ChatError` with a `kind` the
callers count ("http_error", "network_error", "bad_response", "missing_api_key").
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Statuses worth another try: timeouts, conflicts, rate limits and transient server errors.
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatError(Exception):
  """A failed request; `kind` names the failure class, the message says what happened."""

  def __init__(self, kind: str, detail: str) -> None:
    super().__init__(detail)
    self.kind = kind


class ChatClient:
  """POSTs chat-completions requests to `{url}/chat/completions`.

  A network error or a status in RETRY_STATUS is retried `retries` times, the k-th retry after
  `backoff_s * 2**k` seconds; `on_retry` is called before each retry (the judge counts them).
  Other HTTP errors (401, 400, ...) are not retried: asking again cannot fix them.
  """

  def __init__(self, url: str, model: str, *, api_key_env: str | None = None,
               timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 1.0,
               on_retry: Callable[[], None] | None = None) -> None:
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"url must start with http:// or https://, got {url!r}")
    if not model:
      raise ValueError("model is empty")
    self.model = model
    self.endpoint = url.rstrip("/") + "/chat/completions"
    self.api_key_env = api_key_env
    self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
    self._on_retry = on_retry

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    name = self.api_key_env
    if name:
      key = os.environ.get(name)
      if not key:
        raise ChatError("missing_api_key", f"environment variable {name} is not set")
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def post(self, body: bytes) -> dict[str, Any]:
    """The decoded JSON reply to one request body, with retries (see the class docstring)."""
    last: ChatError | None = None
    for attempt in range(self.retries + 1):
      if attempt:
        if self._on_retry is not None:
          self._on_retry()
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      request = urllib.request.Request(self.endpoint, data=body, headers=self._headers(),
                                       method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          raw = response.read()
      except urllib.error.HTTPError as e:
        last = ChatError("http_error", f"HTTP {e.code} from {self.endpoint}")
        if e.code in RETRY_STATUS:
          continue
        raise last from None
      except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timeout
        last = ChatError("network_error", f"{type(e).__name__} for {self.endpoint}: {e}")
        continue
      try:
        return json.loads(raw)
      except ValueError:
        raise ChatError("bad_response", f"non-JSON reply from {self.endpoint}") from None
    assert last is not None
    raise last

  def complete(self, messages: Sequence[Mapping[str, str]], *, temperature: float,
               max_tokens: int) -> str:
    """The assistant's reply (choices[0].message.content) to `messages`."""
    body = json.dumps({"model": self.model, "messages": [dict(m) for m in messages],
                       "temperature": temperature, "max_tokens": max_tokens}).encode("utf-8")
    reply = self.post(body)
    try:
      content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise ChatError("bad_response", "reply lacks choices[0].message.content") from None
    if not isinstance(content, str):
      raise ChatError("bad_response", "choices[0].message.content is not a string")
    return content
