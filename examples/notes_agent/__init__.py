"""The notes agent, an agent module: ``SPINE_AGENTS=examples.notes_agent``."""

from examples.notes_agent.agent import NOTES_AGENT, register

__all__ = ["NOTES_AGENT", "register"]
