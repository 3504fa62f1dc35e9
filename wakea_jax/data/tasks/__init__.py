"""Bundled generators of training data: a plain dict from name to generator.

Every generator is `generate(num_examples: int, seed: int = 0) -> list[dict]`, deterministic
in its arguments, returning records `{"messages": [...]}` in the chat format of
`wakea_jax.data.chat`. Data configs name them with a task spec,
`"task:arithmetic?n=2000&seed=0"` (see `wakea_jax.data.sources.load_source`); to get a
file instead, `sources.write_jsonl(TASKS["arithmetic"](2000, 0), "arithmetic.jsonl")`.
"""

from collections.abc import Callable
from typing import Any

from wakea_jax.data.tasks import arithmetic, equations, multihop, smalltalk

TASKS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "arithmetic": arithmetic.generate,
    "smalltalk": smalltalk.generate,
    "multihop": multihop.generate,
    "equations": equations.generate,
}

# Verifiable prompts for RL: `generate(n, seed) -> [{"messages": [...], "answer": ...}]`
# (the conversation up to the assistant's turn, and the reference a reward checks).
PROMPT_TASKS: dict[str, Callable[[int, int], list[dict[str, Any]]]] = {
    "arithmetic": arithmetic.prompts,
    "multihop": multihop.prompts,
    "equations": equations.prompts,
}

# Per-record labels for evaluation breakdowns: `labels(n, seed, **options) -> [{"category",
# "difficulty"}]`, aligned with the records of TASKS[name] and PROMPT_TASKS[name] for the
# same arguments (wakea_jax.serving.tracking reports accuracy per label).
TASK_LABELS: dict[str, Callable[..., list[dict[str, str]]]] = {
    "arithmetic": arithmetic.labels,
    "multihop": multihop.labels,
    "equations": equations.labels,
}
