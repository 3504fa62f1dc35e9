"""A real OpenAI-compatible chat-completions server on 127.0.0.1, in a thread of the test.

Shared by the judge tests and the collaboration tests: a test passes `respond(path, body,
headers)`, which returns either the assistant's content (a 200 with one choice) or a
(status, raw payload) pair for the failure cases.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Reply = str | tuple[int, bytes]
Respond = Callable[[str, dict[str, Any], Mapping[str, str]], Reply]


def completion(content: str) -> bytes:
  """The body of a chat-completions reply with one choice holding `content`."""
  return json.dumps({"object": "chat.completion",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}]}
                    ).encode()


@contextlib.contextmanager
def serving(respond: Respond) -> Iterator[str]:
  """Serves `respond` on a free loopback port until the block ends -> the base URL (.../v1)."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
      pass

    def _send(self, status: int, payload: bytes) -> None:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

    def do_POST(self) -> None:
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      reply = respond(self.path, body, self.headers)
      if isinstance(reply, str):
        self._send(200, completion(reply))
      else:
        self._send(*reply)

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  finally:
    httpd.shutdown()
    httpd.server_close()
