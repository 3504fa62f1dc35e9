"""A real uvicorn server on a loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
  """Runs `app` on 127.0.0.1 (a free port) until the block ends -> its base URL."""
  import uvicorn
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(30)
    sock.close()


def request(url: str, body: dict | None = None, *, method: str | None = None,
            headers: dict | None = None, timeout: float = 300) -> tuple[int, dict]:
  """One JSON request with the standard library -> (status, decoded body)."""
  import json
  import urllib.error
  import urllib.request
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as response:
      return response.status, json.loads(response.read() or b"null")
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"null")
