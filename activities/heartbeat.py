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


@contextlib.asynccontextmanager
async def heartbeating() -> AsyncIterator[None]:
    """Heartbeat until the block ends, as often as the call's heartbeat timeout asks.

    A timer on the loop, not a task: the first beat is due only after `every_s`, so a call that
    finishes sooner costs no heartbeat RPC and no task (most calls; a task per call was a
    measurable part of a busy worker's CPU). The timer's callback runs in the activity's
    context (asyncio copies it when the timer is set), where ``activity.heartbeat`` works.
    """
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        yield
        return
    loop = asyncio.get_running_loop()
    every_s = timeout.total_seconds() / BEATS_PER_TIMEOUT

    def beat() -> None:
        nonlocal timer
        activity.heartbeat()
        timer = loop.call_later(every_s, beat)

    timer = loop.call_later(every_s, beat)
    try:
        yield
    finally:
        timer.cancel()
