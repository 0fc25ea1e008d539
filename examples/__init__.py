"""Example agents built on Spine's SDK layer; each package is an agent module for SPINE_AGENTS."""
