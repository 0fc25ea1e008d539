"""Heartbeats from an activity in flight, without a server (Temporal's activity environment)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from temporalio.testing import ActivityEnvironment

from spine.activities.heartbeat import BEATS_PER_TIMEOUT, heartbeating
from tests.helpers import eventually


def _environment(timeout_s: float | None) -> tuple[ActivityEnvironment, list[tuple[object, ...]]]:
    env = ActivityEnvironment()
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    env.info = dataclasses.replace(env.info, heartbeat_timeout=timeout)
    beats: list[tuple[object, ...]] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    return env, beats


async def test_a_long_call_beats_until_it_ends_and_a_short_one_never() -> None:
    env, beats = _environment(0.5)  # a beat every 0.1 s
    done = asyncio.Event()

    async def long_call() -> None:
        async with heartbeating():
            await done.wait()

    running = asyncio.create_task(env.run(long_call))
    try:
        await eventually(_at_least(beats, 3), timeout=60, what="three heartbeats")
    finally:
        done.set()
        await running
    ended_with = len(beats)
    await asyncio.sleep(3 * 0.5 / BEATS_PER_TIMEOUT)
    assert len(beats) == ended_with  # the timer stopped with the block

    short_env, short_beats = _environment(60.0)  # first beat due after 12 s

    async def short_call() -> str:
        async with heartbeating():
            return "done"

    assert await short_env.run(short_call) == "done"
    assert short_beats == []


async def test_a_call_without_a_heartbeat_timeout_does_not_beat() -> None:
    env, beats = _environment(None)

    async def call() -> None:
        async with heartbeating():
            await asyncio.sleep(0.05)

    await env.run(call)
    assert beats == []


def _at_least(beats: list[tuple[object, ...]], count: int):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return len(beats) >= count

    return check
