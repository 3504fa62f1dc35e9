"""Serving and model management: the server and its engine, guardrails, the model registry,
per-category performance tracking and weakness detection, and role-based model selection.

Nothing is imported here: a tool that needs the registry does not pull in the server's web
stack, and the server does not pull in the evaluation.
"""
