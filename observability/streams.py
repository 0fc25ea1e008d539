"""Live streams: a run's model tokens and step events, for clients, outside workflow history.

A run's stream is a sequence of :class:`StreamEvent` numbered by the store (``seq``), keyed by the
workflow id (one stream across continue-as-new):

=============  =================================================================================
kind           data
=============  =================================================================================
model_started  step, attempt, provider, model, fallback_index (the model activity, each attempt)
token          step, attempt, fallback_index, text (a few tokens of the model's answer)
tool_started   step, tool, call_id, purpose (a tool activity was scheduled)
step           seq, kind, step, actor, data: an audit entry of the run as it is decided
end            the run's `run_outcome` audit entry: nothing follows
=============  =================================================================================

Producers: the model activity streams tokens as the provider's SDK yields them; the workflow
publishes each audit entry as it records it and each tool call as it schedules it
(:mod:`spine.observability.live`, replay-aware). Nothing goes through history: history stays as
flat as without streaming. Each event has a key, unique per run, so a re-executed workflow task
or activity attempt never doubles it. A stream is best effort: the audit log, not the stream, is
the record (a store that fails drops events, and says so in the worker's log).

Consumers read what they missed, then the live tail (:func:`follow`): ``spine run --wait``,
``spine status RUN --follow``, and the Server-Sent Events endpoint of ``spine stream-server``.

Stores (:class:`StreamStore`): SQLite in the state directory by default (one host; readers poll
the file), PostgreSQL when ``SPINE_DATABASE_URL=postgresql://...`` (many hosts; readers are woken
by ``LISTEN``/``NOTIFY``). :func:`stream_store_from_env` picks one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, Field

from spine.store import Migration, SQLiteDatabase

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("spine.streams")

JsonObject = dict[str, object]

#: How long a stream is kept after its last event (older events are pruned when a store opens).
RETENTION = timedelta(days=1)
#: Largest text of one token event; longer text is split.
MAX_TOKEN_TEXT = 2000
DATABASE_URL_ENV = "SPINE_DATABASE_URL"


class StreamEvent(BaseModel):
    """One event of a run's live stream."""

    seq: int = Field(description="Position in the store; a reader resumes after the last seen.")
    run_id: str
    kind: str
    at: str = Field(description="ISO 8601 UTC time the producer saw it happen.")
    data: JsonObject = Field(default_factory=dict)


@dataclass(frozen=True)
class NewEvent:
    """An event to append; `key` is unique per run (a repeat with the same key is dropped)."""

    run_id: str
    key: str
    kind: str
    data: JsonObject
    at: str


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class StreamStore(Protocol):
    """Where streams live. Appends are idempotent by (run, key); reads are by seq."""

    async def append(self, events: Sequence[NewEvent]) -> None:
        """Store the events in order (ignoring keys already stored for their run)."""
        ...

    async def read(self, run_id: str, after: int = 0, limit: int = 500) -> list[StreamEvent]:
        """The run's events with seq above `after`, oldest first."""
        ...

    async def wait(self, run_id: str, after: int, timeout: float) -> None:
        """Return when the run may have events after `after`, or after `timeout` seconds."""
        ...

    async def close(self) -> None: ...


async def follow(
    store: StreamStore,
    run_id: str,
    after: int = 0,
    *,
    until: Callable[[], bool] | None = None,
    idle_s: float = 1.0,
) -> AsyncIterator[StreamEvent]:
    """What the run's stream holds after `after`, then its live tail, until its `end` event.

    Also ends once `until()` holds and nothing new came for `idle_s` (a run that closed without
    an `end` event: terminated, or on a worker whose stream went elsewhere).
    """
    quiet_since: float | None = None
    while True:
        events = await store.read(run_id, after)
        for event in events:
            after = event.seq
            yield event
            if event.kind == "end":
                return
        if events:
            quiet_since = None
            continue
        if until is not None and until():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= idle_s:
                return
        await store.wait(run_id, after, 0.25 if until is not None else 1.0)


# ------------------------------------------------------------------------------------ SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS spine_stream (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    kind   TEXT NOT NULL,
    at     TEXT NOT NULL,
    data   TEXT NOT NULL,
    UNIQUE (run_id, key)
);
CREATE INDEX IF NOT EXISTS spine_stream_run ON spine_stream (run_id, seq);
"""
#: PostgreSQL streams keep their own schema (:class:`PostgresStreamStore`, with its NOTIFY).
_SQLITE_MIGRATIONS = (Migration("streams", 1, sqlite=_SQLITE_SCHEMA, postgresql=""),)


class SQLiteStreamStore:
    """Streams in a SQLite file: one host; readers in other processes poll the file.

    Readers in the same process are woken at once by appends; others look every `poll_s`.
    The file is a :class:`~spine.store.SQLiteDatabase` with commits that are not synced (a
    stream is best effort, the audit log is the record): one connection kept open, no fsync
    per batch (a connection and an fsync per batch cost a worker more CPU than the rest of a
    step's streaming).
    """

    def __init__(self, path: Path | str, *, poll_s: float = 0.05) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self._db = SQLiteDatabase(self.path, synced=False)
        self._ready = False
        self._appends = 0  # appends by this process: wakes its readers at once

    def __str__(self) -> str:
        return f"sqlite:///{self.path}"

    async def _open(self) -> None:
        """The schema, and events older than the retention dropped, once per store."""
        if self._ready:
            return
        await self._db.migrate(_SQLITE_MIGRATIONS)
        cutoff = (datetime.now(UTC) - RETENTION).isoformat()
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM spine_stream WHERE at < ?", (cutoff,))
        self._ready = True

    async def append(self, events: Sequence[NewEvent]) -> None:
        if not events:
            return
        await self._open()
        async with self._db.transaction() as tx:
            await tx.executemany(
                "INSERT OR IGNORE INTO spine_stream (run_id, key, kind, at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                [(e.run_id, e.key, e.kind, e.at, json.dumps(e.data)) for e in events],
            )
        self._appends += 1

    async def read(self, run_id: str, after: int = 0, limit: int = 500) -> list[StreamEvent]:
        await self._open()
        async with self._db.reading() as tx:
            rows = await tx.fetchall(
                "SELECT * FROM spine_stream WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after, limit),
            )
        return [_event(row) for row in rows]

    async def wait(self, run_id: str, after: int, timeout: float) -> None:
        seen = self._appends
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(min(self.poll_s, max(deadline - time.monotonic(), 0)))
            if self._appends != seen:
                return  # an append in this process (maybe of another run: the caller reads)
            if await self.read(run_id, after, limit=1):
                return  # an append by another process

    async def close(self) -> None:
        await self._db.close()


def _event(row: Mapping[str, object]) -> StreamEvent:
    data = row["data"]
    return StreamEvent(
        seq=int(row["seq"]),  # type: ignore[call-overload]  # an integer column
        run_id=str(row["run_id"]),
        kind=str(row["kind"]),
        at=row["at"].isoformat() if isinstance(row["at"], datetime) else str(row["at"]),
        data=json.loads(data) if isinstance(data, str) else dict(data),  # type: ignore[arg-type]  # JSON object column
    )


# -------------------------------------------------------------------------------- PostgreSQL

_PG_CHANNEL = "spine_stream"
_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS spine_stream (
    seq    BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    kind   TEXT NOT NULL,
    at     TEXT NOT NULL,
    data   JSONB NOT NULL,
    UNIQUE (run_id, key)
);
CREATE INDEX IF NOT EXISTS spine_stream_run ON spine_stream (run_id, seq);
"""


class PostgresStreamStore:
    """Streams in PostgreSQL, for workers and readers on many hosts.

    An append commits its rows and ``NOTIFY spine_stream, '<run id>'`` in one transaction; each
    store keeps one ``LISTEN`` connection that wakes its readers of that run. Readers also look
    every second, so a notification lost to a dropped connection delays them, never stops them.
    """

    def __init__(self, dsn: str, *, max_connections: int = 5, timeout_s: float = 10.0) -> None:
        self.dsn = dsn
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._pool: AsyncConnectionPool | None = None
        self._opening = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def __str__(self) -> str:
        from spine.observability.audit import redact_dsn

        return redact_dsn(self.dsn)

    async def _get_pool(self) -> AsyncConnectionPool:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                pool = AsyncConnectionPool(
                    self.dsn,
                    min_size=1,
                    max_size=self.max_connections,
                    timeout=self.timeout_s,
                    open=False,
                    kwargs={"connect_timeout": max(1, int(self.timeout_s)), "autocommit": False},
                )
                await pool.open(wait=False)
                try:
                    async with pool.connection() as conn, conn.transaction():
                        # Serialise schema creation between workers starting together.
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtext(%s))", (_PG_CHANNEL,)
                        )
                        await conn.execute(_PG_SCHEMA)
                        cutoff = (datetime.now(UTC) - RETENTION).isoformat()
                        await conn.execute("DELETE FROM spine_stream WHERE at < %s", (cutoff,))
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
        return self._pool

    async def append(self, events: Sequence[NewEvent]) -> None:
        if not events:
            return
        from psycopg.types.json import Jsonb

        pool = await self._get_pool()
        async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO spine_stream (run_id, key, kind, at, data) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (run_id, key) DO NOTHING",
                [(e.run_id, e.key, e.kind, e.at, Jsonb(e.data)) for e in events],
            )
            for run_id in dict.fromkeys(e.run_id for e in events):
                await cur.execute("SELECT pg_notify(%s, %s)", (_PG_CHANNEL, run_id))

    async def read(self, run_id: str, after: int = 0, limit: int = 500) -> list[StreamEvent]:
        from psycopg.rows import dict_row

        pool = await self._get_pool()
        async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT seq, run_id, kind, at, data FROM spine_stream"
                " WHERE run_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (run_id, after, limit),
            )
            rows = await cur.fetchall()
            await conn.rollback()
        return [_event(row) for row in rows]

    async def wait(self, run_id: str, after: int, timeout: float) -> None:
        self._ensure_listener()
        woken = asyncio.Event()
        self._waiters.setdefault(run_id, set()).add(woken)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(timeout, 1.0))
        finally:
            waiting = self._waiters.get(run_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[run_id]

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="spine stream listener")

    async def _listen(self) -> None:
        """Keep one LISTEN connection; wake the readers of each notified run."""
        from psycopg import AsyncConnection

        while True:
            conn: AsyncConnection | None = None
            try:
                conn = await AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout_s))
                )
                await conn.execute(f"LISTEN {_PG_CHANNEL}")
                async for notice in conn.notifies():
                    for woken in list(self._waiters.get(notice.payload, ())):
                        woken.set()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001  # readers still poll; try again shortly
                log.warning("stream listener lost its connection (%s); reconnecting", err)
                await asyncio.sleep(1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def stream_store_from_env(env: Mapping[str, str], state_dir: Path | str = ".spine") -> StreamStore:
    """PostgreSQL when ``SPINE_DATABASE_URL`` is a ``postgresql://`` URL, else SQLite in
    `state_dir` (``SPINE_STATE_DIR``, default ``.spine``)."""
    url = (env.get(DATABASE_URL_ENV) or "").strip()
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStreamStore(url)
    if url:
        raise ValueError(
            f"{DATABASE_URL_ENV} must be a postgresql:// URL (or unset for SQLite), not "
            f"{url.split('://', 1)[0]!r}"
        )
    return SQLiteStreamStore(Path(env.get("SPINE_STATE_DIR") or state_dir) / "streams.db")


# ------------------------------------------------------------------------------- the sink


class LiveSink:
    """A worker's writer of stream events: producers hand events over from any thread (the
    workflow threads, the activities' loop) without waiting; a task on the worker's loop
    appends them in batches. A store that fails drops the batch and logs one line.

    A hand-over is a deque append; only the first of a batch wakes the worker's loop (a wake-up
    from another thread is a system call, and a step publishes several events).

    Timing: the first event after a quiet spell is written `batch_s` after it came (time to
    first token is what a reader sees); while events keep coming, the sink writes at most once
    every `interval_s`. So a reader sees an event within ``max(batch_s, interval_s)`` of its
    hand-over, and a busy worker pays one store write per interval, not one per step (a write
    costs the worker ~1 ms of CPU; at 20 steps/s, per-step writes were 1.5 ms of a step's ~35).
    """

    def __init__(
        self,
        store: StreamStore,
        *,
        batch_s: float = 0.02,
        interval_s: float = 0.1,
        max_pending: int = 20_000,
    ):
        self.store = store
        self.batch_s = batch_s
        self.interval_s = interval_s
        self.max_pending = max_pending
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[NewEvent] = collections.deque()
        self._ready: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._woken = False  # a wake-up is set or scheduled: later hand-overs need none
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._drain(), name="spine live sink")

    def publish(self, event: NewEvent) -> None:
        """Hand an event over (thread-safe, never blocks; dropped if the sink is not running)."""
        loop, ready = self._loop, self._ready
        if loop is None or ready is None or loop.is_closed():
            return
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        self._pending.append(event)
        if self._woken:
            return  # the drain has not taken the pending events yet: it takes this one too
        self._woken = True
        try:
            if _on_loop(loop):
                ready.set()
            else:
                loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # the loop closed meanwhile
            return

    async def _drain(self) -> None:
        assert self._ready is not None and self._stopped is not None and self._loop is not None
        ready, stopped, pending, loop = self._ready, self._stopped, self._pending, self._loop
        written = float("-inf")  # the loop's time of the last write
        while True:
            await ready.wait()
            ready.clear()
            if not self._stopping:
                # Let a few tokens gather, and keep to one write per interval (a stop cuts it).
                delay = max(self.batch_s, written + self.interval_s - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), delay)
            # Before taking: a hand-over from now on wakes the next round (at worst once
            # needlessly); one before it is taken below.
            self._woken = False
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), 500))]
                await self._write(batch)
            written = loop.time()
            if self._stopping:
                return

    async def _write(self, batch: list[NewEvent]) -> None:
        try:
            await self.store.append(batch)
        except Exception as err:  # noqa: BLE001  # best effort: the audit log is the record
            self.dropped += len(batch)
            log.warning("live stream store failed, %d event(s) dropped: %s", len(batch), err)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is pending (within `timeout_s`), stop, and close the store."""
        task, loop, ready, stopped = self._task, self._loop, self._ready, self._stopped
        self._loop = None  # nothing more is taken
        if task is not None and loop is not None and ready is not None and stopped is not None:
            # Hand-overs already made are in the deque: the drain writes them all, then ends.
            self._stopping = True
            loop.call_soon(ready.set)
            loop.call_soon(stopped.set)  # and does not wait out its interval first
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        await self.store.close()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class TokenWriter:
    """A model call's tokens, batched into `token` events (every `every_s`, or when long)."""

    def __init__(
        self,
        publish: Callable[[NewEvent], None],
        run_id: str,
        *,
        step: int,
        attempt: int,
        fallback_index: int,
        every_s: float = 0.05,
    ) -> None:
        self._publish = publish
        self._run_id = run_id
        self._base = {"step": step, "attempt": attempt, "fallback_index": fallback_index}
        self._prefix = f"tok:{step}:{fallback_index}:{attempt}"
        self._every_s = every_s
        self._buffer: list[str] = []
        self._size = 0
        self._last = time.monotonic()
        self._count = 0

    async def __call__(self, text: str) -> None:
        """Take a delta of the model's text."""
        if not text:
            return
        self._buffer.append(text)
        self._size += len(text)
        now = time.monotonic()
        if self._count == 0 or now - self._last >= self._every_s or self._size >= MAX_TOKEN_TEXT:
            self.flush()  # the first tokens go at once: time to first token is what users see

    def flush(self) -> None:
        if not self._buffer:
            return
        text = "".join(self._buffer)
        self._buffer, self._size, self._last = [], 0, time.monotonic()
        for start in range(0, len(text), MAX_TOKEN_TEXT):
            self._publish(
                NewEvent(
                    self._run_id,
                    f"{self._prefix}:{self._count}",
                    "token",
                    {**self._base, "text": text[start : start + MAX_TOKEN_TEXT]},
                    now_iso(),
                )
            )
            self._count += 1


OnText = Callable[[str], Awaitable[None]]
"""Takes each delta of a streamed model answer's text."""
