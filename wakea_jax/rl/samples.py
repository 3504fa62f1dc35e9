"""`Sample`: what a reward (or a judge) sees about one completion.

Its own module so that rollouts, rewards, the LLM judge and evaluation share the type
without importing one another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from wakea_jax.rl.answers import final_response


@dataclasses.dataclass(frozen=True)
class Sample:
  """What a reward sees about one completion."""

  prompt: str
  completion: str           # decoded completion text, chat markup included when tools ran
  answer: Any = None        # reference: str, number, or a list of accepted answers
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "tests" for code
  num_tool_calls: int = 0
  tool_errors: int = 0      # tool responses that were "Error: ..."
  truncated: bool = False   # hit the length limit
  num_tokens: int = 0       # completion tokens the model generated (tool responses excluded)
  final_text: str | None = None  # the last assistant turn, when the rollout knows its tokens

  @property
  def final(self) -> str:
    """The model's last assistant turn without markup or tool calls: from the rollout's
    tokens (any chat format) when it set `final_text`, else read from the ChatML text."""
    return final_response(self.final_text if self.final_text is not None else self.completion)
