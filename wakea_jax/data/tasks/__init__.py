"""Bundled generators of training data: name -> function(num_examples, seed) -> records.

Each record is `{"messages": [...]}` in the chat format of `wakea_jax.data.chat`. Sources name
them as `task:NAME?n=1000&seed=0` (see `wakea_jax.data.sources.load_source`).
"""

from collections.abc import Callable

from wakea_jax.data.tasks import arithmetic, smalltalk

TASKS: dict[str, Callable[[int, int], list[dict]]] = {
    "arithmetic": arithmetic.generate,
    "smalltalk": smalltalk.generate,
}
