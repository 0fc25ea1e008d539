"""Heartbeats while an activity is in flight, so a worker that dies is noticed in seconds.

Without them Temporal retries a call that was running on a SIGKILLed worker only when its
start-to-close timeout expires; with them, when the heartbeat timeout does (the workflow sets
it: see ``MODEL_HEARTBEAT_TIMEOUT`` and ``TOOL_HEARTBEAT_TIMEOUT`` in ``workflows/agent.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity


async def _beat(every_s: float) -> None:
    while True:
        # Not at once: a call that finishes within `every_s` costs no heartbeat RPC at all.
        await asyncio.sleep(every_s)
        activity.heartbeat()


@contextlib.asynccontextmanager
async def heartbeating(every_s: float) -> AsyncIterator[None]:
    """Heartbeat every `every_s` seconds until the block ends (the SDK throttles the RPCs)."""
    beating = asyncio.create_task(_beat(every_s))
    try:
        yield
    finally:
        beating.cancel()
