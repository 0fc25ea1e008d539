"""The audit log on a real PostgreSQL server, started by the tests from the installed binaries
(`spine.client.testing.postgres_server`).

Skipped, with the reason, when psycopg or the server binaries (Debian: ``apt-get install -y
postgresql``, found under ``/usr/lib/postgresql/*/bin``) are missing; under ``CI=true`` that
fails instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest

from spine.activities.errors import DependencyUnavailable
from spine.client.testing import PostgresServer, free_port
from spine.observability.audit import AuditConflict, AuditGap, PostgresAuditStore, verify
from spine.payloads import AuditEntry
from tests.helpers import require_module
from tests.test_audit import batch, one_error_line, spine_audit, story

psycopg = require_module("psycopg", "psycopg is not installed (pip install psycopg)")


@pytest.fixture(scope="module")
def pg_server(postgres: PostgresServer) -> PostgresServer:
    """A database of this module's own on the session's PostgreSQL server."""
    return dataclasses.replace(postgres, dsn=postgres.database("audit_tests"))


@pytest.fixture
async def store(pg_server: PostgresServer) -> AsyncIterator[PostgresAuditStore]:
    store = PostgresAuditStore(pg_server.dsn)
    try:
        yield store
    finally:
        await store.close()


def run_id() -> str:
    return f"refund-agent-{uuid.uuid4().hex[:12]}"


async def test_append_is_idempotent_and_chains(store: PostgresAuditStore) -> None:
    """Appending a batch twice stores each entry once, and the stored chain verifies."""
    run = run_id()
    entries = story()
    assert (await store.append(batch(entries[:5], run_id=run))).new == 5
    assert (await store.append(batch(entries, run_id=run))).new == 3
    assert (await store.append(batch(entries, run_id=run))).new == 0
    stored = await store.entries(run)
    assert [e.seq for e in stored] == list(range(8))
    assert verify(stored).ok
    assert run in await store.run_ids()


async def test_conflict_is_terminal_and_gap_retryable(store: PostgresAuditStore) -> None:
    """Different content at a stored seq is an AuditConflict; a missing predecessor an AuditGap."""
    run = run_id()
    entries = story()
    await store.append(batch(entries[:3], run_id=run))
    with pytest.raises(AuditConflict, match="seq 1 is already stored with different data"):
        await store.append(batch([entries[1].model_copy(update={"data": {}})], run_id=run))
    with pytest.raises(AuditGap, match="seq 4 is not stored yet"):
        await store.append(batch(entries[5:], run_id=run))
    assert len(await store.entries(run)) == 3


async def test_concurrent_overlapping_appends_make_one_chain(store: PostgresAuditStore) -> None:
    """20 writers appending overlapping batches for one run leave one gap-free, valid chain."""
    run = run_id()
    entries = [
        AuditEntry(seq=i, kind="tool_call", step=i, actor="agent", at=f"t{i}", data={"n": i})
        for i in range(40)
    ]

    async def writer(offset: int) -> None:
        start = 0
        while start < len(entries):
            end = min(len(entries), start + 1 + (start + offset) % 5)
            while True:
                try:
                    await store.append(batch(entries[max(0, start - 2) : end], run_id=run))
                    break
                except AuditGap:
                    await asyncio.sleep(0.005)
            start = end

    await asyncio.gather(*(writer(i) for i in range(20)))
    stored = await store.entries(run)
    assert [e.seq for e in stored] == list(range(40))
    assert verify(stored).ok


async def test_racing_different_content_cannot_fork(store: PostgresAuditStore) -> None:
    """Writers racing different entries for one seq: exactly one lands, the rest conflict."""
    run = run_id()
    await store.append(batch(story()[:2], run_id=run))
    variants = [story()[2].model_copy(update={"data": {"n": i}}) for i in range(8)]
    outcomes = await asyncio.gather(
        *(store.append(batch([v], run_id=run)) for v in variants), return_exceptions=True
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["Appended"] + ["AuditConflict"] * 7
    assert verify(await store.entries(run)).ok


async def test_table_refuses_update_delete_truncate(
    store: PostgresAuditStore, pg_server: PostgresServer
) -> None:
    """The table's triggers refuse UPDATE, DELETE and TRUNCATE: it is append-only."""
    run = run_id()
    await store.append(batch(story()[:1], run_id=run))
    async with await psycopg.AsyncConnection.connect(pg_server.dsn, autocommit=True) as conn:
        for sql in (
            "UPDATE spine_audit SET actor = 'x'",
            "DELETE FROM spine_audit",
            "TRUNCATE spine_audit",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                await conn.execute(sql)


async def test_edited_entry_is_named(store: PostgresAuditStore, pg_server: PostgresServer) -> None:
    """An UPDATE of one entry (triggers disabled) is named by verify and by `spine audit verify`."""
    run = run_id()
    await store.append(batch(story(), run_id=run))
    async with await psycopg.AsyncConnection.connect(pg_server.dsn) as conn:
        await conn.execute("ALTER TABLE spine_audit DISABLE TRIGGER USER")
        await conn.execute(
            "UPDATE spine_audit SET data = %s WHERE run_id = %s AND seq = 4",
            ('{"outcome":"ok","tool":"issue_refund"}', run),
        )
        await conn.execute("ALTER TABLE spine_audit ENABLE TRIGGER USER")
        await conn.commit()
    broken = verify(await store.entries(run)).first_broken
    assert broken is not None and (broken.seq, broken.problem) == (4, "content_changed")
    proc = await asyncio.to_thread(
        spine_audit, "verify", run, env={"SPINE_AUDIT_DSN": pg_server.dsn}
    )
    assert f"run {run!r} seq 4: content changed" in one_error_line(proc)


async def test_unreachable_database_is_retryable() -> None:
    """No server at the DSN is a retryable DependencyUnavailable; the message hides the password."""
    store = PostgresAuditStore(
        f"postgresql://spine:hunter2@127.0.0.1:{free_port()}/spine", timeout_s=1
    )
    try:
        with pytest.raises(DependencyUnavailable, match=r"spine:\*\*\*@127\.0\.0\.1") as err:
            await store.append(batch(story()[:1], run_id=run_id()))
        assert "hunter2" not in str(err.value)
    finally:
        await store.close()
