"""Stormwatch: a streaming detector for runaway LLM spend."""

__version__ = "0.1.0"
