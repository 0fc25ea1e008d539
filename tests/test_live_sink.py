"""The worker's live-stream sink and its SQLite store, without a Temporal server: every event
handed over lands once and in order, a stop writes what is pending, a failing store loses its
batch and says so, hand-overs from other threads wake the worker's loop once per batch, and the
store keeps one connection."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spine.observability.streams import LiveSink, NewEvent, SQLiteStreamStore
from tests.helpers import eventually

AT = datetime.now(UTC).isoformat()  # within the stores' retention (a day)


def _event(run: str, n: int) -> NewEvent:
    return NewEvent(run_id=run, key=f"k:{n}", kind="step", data={"n": n}, at=AT)


def _counted(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Count the calls of `owner.name` from now on (the list's one item)."""
    calls = [0]
    original = getattr(owner, name)

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def _rows(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT run_id, key FROM spine_stream ORDER BY seq").fetchall()


async def test_events_from_many_threads_land_once_in_order_and_stop_writes_the_rest(
    tmp_path: Path,
) -> None:
    store = SQLiteStreamStore(tmp_path / "streams.db")
    sink = LiveSink(store, batch_s=0.005)
    await sink.start()

    def produce(run: str) -> None:
        for n in range(400):
            sink.publish(_event(run, n))

    threads = [threading.Thread(target=produce, args=(f"run-{t}",)) for t in range(4)]
    for t in threads:
        t.start()
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    for n in range(400, 450):  # and some from the loop itself, right before the stop
        sink.publish(_event("run-0", n))
    await sink.stop()

    rows = _rows(tmp_path / "streams.db")
    assert len(rows) == 4 * 400 + 50 and sink.dropped == 0
    for t in range(4):
        keys = [key for run, key in rows if run == f"run-{t}"]
        assert keys == [f"k:{n}" for n in range(400 + (50 if t == 0 else 0))]
    # A repeated key (a re-executed workflow task) is not stored twice.
    await store.append([_event("run-1", 7)])
    assert len(_rows(tmp_path / "streams.db")) == len(rows)
    await store.close()


async def test_hand_overs_from_another_thread_wake_the_loop_once_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = LiveSink(SQLiteStreamStore(tmp_path / "streams.db"), batch_s=0.05)
    await sink.start()
    wakeups = _counted(monkeypatch, asyncio.get_running_loop(), "call_soon_threadsafe")
    # 300 events in one burst: one wake-up takes them all (the drain waits batch_s first).
    # The few other calls are thread-pool results (the producer thread's, the store's).
    await asyncio.to_thread(lambda: [sink.publish(_event("run", n)) for n in range(300)])
    await sink.stop()
    assert wakeups[0] <= 6, wakeups
    assert len(_rows(tmp_path / "streams.db")) == 300


class _Failing:
    """A store that fails its first append, then works."""

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self.stored: list[NewEvent] = []

    async def append(self, events: Sequence[NewEvent]) -> None:
        if not self.failed.is_set():
            self.failed.set()
            raise OSError("disk full")
        self.stored.extend(events)

    async def close(self) -> None:
        return None


async def test_a_failing_store_drops_its_batch_says_so_and_the_sink_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = _Failing()
    sink = LiveSink(store, batch_s=0.001)  # type: ignore[arg-type]  # append/close only
    await sink.start()
    with caplog.at_level(logging.WARNING, logger="spine.streams"):
        for n in range(3):
            sink.publish(_event("run", n))
        await asyncio.wait_for(store.failed.wait(), 30)
        await asyncio.sleep(0)  # the sink counts the loss right after the store raised
        sink.publish(_event("run", 3))
        await sink.stop()
    assert sink.dropped == 3
    assert [e.key for e in store.stored] == ["k:3"]
    assert "3 event(s) dropped: disk full" in caplog.text


async def test_a_sink_over_its_limit_drops_and_counts_instead_of_growing() -> None:
    class Blocked:
        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.stored = 0

        async def append(self, events: Sequence[NewEvent]) -> None:
            await self.release.wait()
            self.stored += len(events)

        async def close(self) -> None:
            return None

    store = Blocked()
    sink = LiveSink(store, batch_s=0.001, max_pending=100)  # type: ignore[arg-type]
    await sink.start()
    sink.publish(_event("run", 0))
    await asyncio.sleep(0.05)  # the drain takes the first event and blocks in the store
    for n in range(1, 151):
        sink.publish(_event("run", n))
    assert sink.dropped == 50
    store.release.set()
    await sink.stop()
    assert store.stored == 101


async def test_the_sqlite_store_keeps_one_connection_and_readers_elsewhere_see_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = _counted(monkeypatch, sqlite3, "connect")
    writer = SQLiteStreamStore(tmp_path / "streams.db")
    for n in range(20):
        await writer.append([_event("run", n)])
    assert opened == [1]
    assert [e.data["n"] for e in await writer.read("run", after=0, limit=5)] == [0, 1, 2, 3, 4]

    reader = SQLiteStreamStore(tmp_path / "streams.db")  # as another process opens it
    events = await reader.read("run")
    assert [e.data["n"] for e in events] == list(range(20))
    waiting = asyncio.create_task(reader.wait("run", events[-1].seq, timeout=30))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await writer.append([_event("run", 20)])
    await asyncio.wait_for(waiting, 30)  # woken by polling the file
    await writer.close()
    await reader.close()
    # A closed store opens again on its next use.
    await writer.append([_event("run", 21)])
    assert len(await writer.read("run")) == 22
    await writer.close()


class _Timed:
    """A store that keeps what it is given and the loop's time of each append."""

    def __init__(self) -> None:
        self.stored: list[NewEvent] = []
        self.times: list[float] = []

    async def append(self, events: Sequence[NewEvent]) -> None:
        self.times.append(asyncio.get_running_loop().time())
        self.stored.extend(events)

    async def close(self) -> None:
        return None


async def test_a_steady_stream_is_written_at_most_once_per_interval() -> None:
    store = _Timed()
    sink = LiveSink(store, batch_s=0.001, interval_s=0.2)  # type: ignore[arg-type]
    await sink.start()
    stop = threading.Event()

    def produce() -> None:  # an event every 5 ms, as a busy worker's runs hand them over
        n = 0
        while not stop.wait(0.005):
            sink.publish(_event("run", n))
            n += 1

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        await eventually(_writes(store, 6), what="six writes")
    finally:
        stop.set()
        await asyncio.to_thread(producer.join)
    await sink.stop()
    gaps = [b - a for a, b in zip(store.times, store.times[1:-1], strict=False)]  # not the stop's
    assert gaps and min(gaps) >= 0.2 - 0.01, gaps
    assert [e.key for e in store.stored] == [f"k:{n}" for n in range(len(store.stored))]


async def test_the_first_event_after_a_quiet_spell_goes_at_once_and_a_stop_cuts_the_interval() -> (
    None
):
    store = _Timed()
    sink = LiveSink(store, batch_s=0.001, interval_s=3600)  # type: ignore[arg-type]
    await sink.start()
    sink.publish(_event("run", 0))
    await eventually(_stored(store, 1), timeout=30, what="the first event")  # not an hour later
    sink.publish(_event("run", 1))  # within the interval: it waits
    await asyncio.sleep(0.3)
    assert len(store.stored) == 1
    await asyncio.wait_for(sink.stop(timeout_s=30), 30)  # writes it now, not in an hour
    assert [e.key for e in store.stored] == ["k:0", "k:1"] and sink.dropped == 0


def _stored(store: _Timed, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(store.stored) >= count

    return check


def _writes(store: _Timed, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(store.times) >= count

    return check
