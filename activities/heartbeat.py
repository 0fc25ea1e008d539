"""Heartbeats while an activity is in flight, so a worker that dies is noticed in seconds.

Without them Temporal retries a call that was running on a SIGKILLed worker only when its
start-to-close timeout expires; with them, when its heartbeat timeout does. The workflow sets the
heartbeat timeout when it schedules the call; the activity reads it from
``activity.info().heartbeat_timeout`` and beats :data:`BEATS_PER_TIMEOUT` times per timeout, so the
two never drift apart. A call scheduled without one (a local activity, a short tool) does not beat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from temporalio import activity

#: Heartbeats per heartbeat timeout: a few may be lost or throttled before the server gives up.
BEATS_PER_TIMEOUT = 5


async def _beat(every_s: float) -> None:
    while True:
        # Not at once: a call that finishes within `every_s` costs no heartbeat RPC at all.
        await asyncio.sleep(every_s)
        activity.heartbeat()


@contextlib.asynccontextmanager
async def heartbeating() -> AsyncIterator[None]:
    """Heartbeat until the block ends, as often as the call's heartbeat timeout asks."""
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        yield
        return
    beating = asyncio.create_task(_beat(timeout.total_seconds() / BEATS_PER_TIMEOUT))
    try:
        yield
    finally:
        beating.cancel()
