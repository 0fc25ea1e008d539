"""Spine activities: model calls, tool calls and their stores. Everything here may do I/O."""
