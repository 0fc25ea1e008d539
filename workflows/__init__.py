"""Spine workflows. Deterministic code only: no I/O, clocks or randomness outside Temporal."""
