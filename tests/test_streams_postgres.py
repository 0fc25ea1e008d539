"""Live streams across hosts: the PostgreSQL stream store, LISTEN/NOTIFY wake-ups, a worker
writing with SPINE_DATABASE_URL and a reader elsewhere following it live."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import uvicorn

from spine.client.runs import wait_result
from spine.client.stream_server import create_app
from spine.client.testing import free_port, script, start_scripted_run
from spine.observability.streams import (
    NewEvent,
    PostgresStreamStore,
    follow,
    now_iso,
    stream_store_from_env,
)
from tests import test_audit_postgres
from tests.test_streaming import _healthy, _poll, _sse

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")

pg_server = test_audit_postgres.pg_server  # the module-scoped server fixture


def _event(run_id: str, key: str, kind: str = "step", **data: object) -> NewEvent:
    return NewEvent(run_id, key, kind, dict(data), now_iso())


async def test_appends_are_idempotent_and_read_in_order(pg_server) -> None:
    store = PostgresStreamStore(pg_server.dsn)
    run = f"run-{uuid.uuid4().hex[:8]}"
    try:
        await store.append([_event(run, "a", n=1), _event(run, "b", n=2)])
        await store.append([_event(run, "b", n=99), _event(run, "c", "end", n=3)])
        events = await store.read(run)
        assert [e.data["n"] for e in events] == [1, 2, 3]
        assert [e.kind for e in events] == ["step", "step", "end"]
        assert await store.read(run, after=events[1].seq) == events[2:]
        assert await store.read("another-run") == []
    finally:
        await store.close()


async def test_a_reader_on_another_connection_is_woken_by_notify(pg_server) -> None:
    """A reader waiting (up to 30 s) on one store wakes within a fraction of a second when
    another store (another host) appends: NOTIFY, not its one-second poll."""
    writer, reader = PostgresStreamStore(pg_server.dsn), PostgresStreamStore(pg_server.dsn)
    run = f"run-{uuid.uuid4().hex[:8]}"
    try:
        await reader.read(run)  # open the pool (and the schema) first
        woke: list[float] = []

        async def wait_once() -> None:
            await reader.wait(run, 0, 30)
            woke.append(time.monotonic())

        waiting = asyncio.create_task(wait_once())
        await asyncio.sleep(0.5)  # the listener is connected and LISTENing
        sent = time.monotonic()
        await writer.append([_event(run, "x")])
        await asyncio.wait_for(waiting, 5)
        assert woke[0] - sent < 0.5, woke[0] - sent
    finally:
        await writer.close()
        await reader.close()


async def test_a_run_streams_through_postgres_to_a_reader_elsewhere(
    pg_server, client, make_worker, task_queue, worker_config
) -> None:
    """SPINE_DATABASE_URL: the worker writes the run's stream to PostgreSQL; a reader with its
    own store (another host) follows it from its start to its end."""
    settings = {**worker_config.settings, "SPINE_DATABASE_URL": pg_server.dsn}
    reader = stream_store_from_env({"SPINE_DATABASE_URL": pg_server.dsn})
    assert isinstance(reader, PostgresStreamStore)
    turns = script().tool("lookup_order", order_id="o-1395").text("All good with o-1395.")
    try:
        async with make_worker(settings=settings):
            handle = await start_scripted_run(
                client, task_queue, "refund-agent", "look", turns, role="support"
            )
            events = [e async for e in follow(reader, handle.id)]
            assert (await wait_result(handle)).status == "completed"
    finally:
        await reader.close()
    assert events[-1].kind == "end"
    assert "".join(str(e.data["text"]) for e in events if e.kind == "token") == (
        "All good with o-1395."
    )
    assert not (worker_config.state_dir / "streams.db").exists()  # nothing went to SQLite
    # The SSE endpoint, on yet another "host", serves the same stream from PostgreSQL.
    served = await _sse_events(PostgresStreamStore(pg_server.dsn), handle.id)
    assert [seq for seq, _ in served] == [e.seq for e in events]


async def _sse_events(store: PostgresStreamStore, run_id: str) -> list[tuple[int, str]]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store), port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await asyncio.wait_for(_poll(lambda: _healthy(http)), 30)
            return [
                (seq, kind) for seq, kind, _ in await _sse(http, f"/v1/runs/{run_id}/events", {})
            ]
    finally:
        server.should_exit = True
        await serving
