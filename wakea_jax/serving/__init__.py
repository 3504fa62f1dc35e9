"""Serving and model management: the server and its engine, guardrails, the model registry,
per-category performance tracking and weakness detection, and role-based model selection.

Nothing is imported here, so `import wakea_jax.serving.registry` stays cheap for tools that
only read the registry.
"""
