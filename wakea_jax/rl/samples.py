"""`Sample`: what a reward (or a judge) sees about one completion.

Its own module so that rollouts, rewards, the LLM judge and evaluation share the type
without importing one another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sample:
  """What a reward sees about one completion."""

  prompt: str
  completion: str           # decoded completion text, ChatML markup included when tools ran
  answer: Any = None        # reference: str, number, or a list of accepted answers
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "tests" for code
  num_tool_calls: int = 0
  tool_errors: int = 0      # tool responses that were "Error: ..."
  truncated: bool = False   # hit the length limit
  num_tokens: int = 0       # completion tokens the model generated (tool responses excluded)
