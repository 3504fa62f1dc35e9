"""Tools a model can call during sampling, behind one typed `Router`.

Importing this package loads only the router; `toolbox.registry.default_router` builds a
router with named tools (calculator, python sandbox, retrieval, offline web search), and
each tool module is imported on its own.
"""

from wakea_jax.toolbox.router import ArgumentError, Router, Tool, ToolResult, validate_arguments

__all__ = ["ArgumentError", "Router", "Tool", "ToolResult", "validate_arguments"]
