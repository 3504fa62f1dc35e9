"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters of requests by endpoint and status, histograms of request latency and time to the
first streamed token, and the engine's own figures (queue depth, active slots, prompt and
generated tokens, generated tokens per second over the last `window_s` seconds). Written by
hand rather than with `prometheus_client`: a dozen lines of formatting do not justify a
dependency and its process-global registry, which tests that start several servers in one
process would share.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from typing import Any

# Seconds; Prometheus' default buckets stretched to the minutes a CPU generation can take.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Histogram:
  def __init__(self, buckets: tuple[float, ...]):
    self.buckets = buckets
    self.counts = [0] * (len(buckets) + 1)
    self.total = 0.0
    self.n = 0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.total += value
    self.n += 1

  def lines(self, name: str, labels: str = "") -> list[str]:
    out, running = [], 0
    sep = "," if labels else ""
    for bound, count in zip(self.buckets, self.counts):
      running += count
      out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {running}')
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
    suffix = f"{{{labels}}}" if labels else ""
    out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]
    return out


class Metrics:
  """Thread-safe request metrics; `render(engine_stats)` gives the /metrics text."""

  def __init__(self, window_s: float = 10.0):
    self._lock = threading.Lock()
    self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
    self.latency: dict[str, _Histogram] = {}
    self.ttft = _Histogram(LATENCY_BUCKETS)
    self.window_s = window_s
    self._samples: collections.deque[tuple[float, int]] = collections.deque()

  def request(self, endpoint: str, status: int, seconds: float) -> None:
    """Counts one finished request and its latency."""
    with self._lock:
      self.requests[(endpoint, status)] += 1
      self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

  def first_token(self, seconds: float) -> None:
    """Records a streamed request's time to its first content."""
    with self._lock:
      self.ttft.observe(seconds)

  def _rate(self, generated: int) -> float:
    """Generated tokens per second over the last window (from the engine's running count)."""
    now = time.monotonic()
    self._samples.append((now, generated))
    while len(self._samples) > 1 and now - self._samples[0][0] > self.window_s:
      self._samples.popleft()
    t0, g0 = self._samples[0]
    return (generated - g0) / (now - t0) if now > t0 else 0.0

  def render(self, engine: dict[str, Any]) -> str:
    """The exposition text, with the engine's counters (`Engine.snapshot()`)."""
    with self._lock:
      lines = ["# HELP wakea_requests_total Requests by endpoint and HTTP status.",
               "# TYPE wakea_requests_total counter"]
      for (endpoint, status), n in sorted(self.requests.items()):
        lines.append(f'wakea_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
      lines += ["# HELP wakea_request_seconds Request latency (a stream: until its last chunk).",
                "# TYPE wakea_request_seconds histogram"]
      for endpoint, hist in sorted(self.latency.items()):
        lines += hist.lines("wakea_request_seconds", f'endpoint="{endpoint}"')
      lines += ["# HELP wakea_time_to_first_token_seconds Streamed requests: first content.",
                "# TYPE wakea_time_to_first_token_seconds histogram"]
      lines += self.ttft.lines("wakea_time_to_first_token_seconds")
      rate = self._rate(int(engine.get("generated_tokens", 0)))
    gauges = {"queue_depth": ("Requests waiting for a slot.", engine.get("queued", 0)),
              "active_slots": ("Slots decoding now.", engine.get("active", 0)),
              "generated_tokens_per_second": (f"Over the last {self.window_s:g} s.", rate)}
    for name, (help_, value) in gauges.items():
      lines += [f"# HELP wakea_{name} {help_}", f"# TYPE wakea_{name} gauge",
                f"wakea_{name} {value:.6g}" if isinstance(value, float) else
                f"wakea_{name} {value}"]
    counters = {"prompt_tokens_total": "prompt_tokens", "generated_tokens_total":
                "generated_tokens", "engine_requests_total": "requests",
                "engine_cancelled_total": "cancelled", "engine_errors_total": "errors"}
    for name, key in counters.items():
      lines += [f"# TYPE wakea_{name} counter", f"wakea_{name} {engine.get(key, 0)}"]
    return "\n".join(lines) + "\n"
