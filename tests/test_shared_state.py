"""The shared-state store layer (`spine.store`) on SQLite and on a real PostgreSQL server.

The same stores run on both databases: migrations apply once however many workers start
together, transcripts keep their prefix checks, stored outputs are readable only by the run that
was given them (and its forks), and an audit log made before migrations existed is adopted.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spine.activities.blobs import MIGRATIONS as BLOB_MIGRATIONS
from spine.activities.blobs import BlobStore, ref_digest, reference
from spine.activities.errors import TranscriptUnavailable
from spine.activities.transcript import MIGRATIONS as TRANSCRIPT_MIGRATIONS
from spine.activities.transcript import TranscriptStore
from spine.client.demo import build_demo_request
from spine.client.runs import start_run, wait_result
from spine.client.testing import PostgresServer, binary
from spine.guardrails.policy import load_policy
from spine.observability.audit import MIGRATIONS as AUDIT_MIGRATIONS
from spine.observability.audit import DatabaseAuditStore, SQLiteAuditStore, store_from_env, verify
from spine.observability.telemetry import telemetry_from_env
from spine.payloads import EMPTY_DIGEST, ChatMessage, chain_digest
from spine.store import (
    Database,
    PostgresDatabase,
    SQLiteDatabase,
    StoreUnavailable,
    database_from_env,
    open_database,
)
from tests.helpers import approve_first_pending, wait_for_status
from tests.test_audit import batch, story

ALL = [*TRANSCRIPT_MIGRATIONS, *BLOB_MIGRATIONS, *AUDIT_MIGRATIONS]


def fresh_pg(postgres: PostgresServer) -> str:
    return postgres.database(f"t_{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db: Database = SQLiteDatabase(tmp_path / "state.db")
    else:
        db = PostgresDatabase(fresh_pg(request.getfixturevalue("postgres")))
    try:
        yield db
    finally:
        await db.close()


def _messages(start: int, count: int) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=f"message {i}") for i in range(start, start + count)]


def _digest(messages: list[ChatMessage]) -> str:
    value = EMPTY_DIGEST
    for message in messages:
        value = chain_digest(value, message)
    return value


async def _schema_rows(db: Database) -> list[tuple[str, int]]:
    async with db.reading() as tx:
        rows = await tx.fetchall("SELECT component, version FROM spine_schema ORDER BY 1, 2")
    return [(r["component"], r["version"]) for r in rows]


async def test_migrations_apply_once_however_many_workers_start(postgres: PostgresServer) -> None:
    """Eight workers migrating one fresh database at once: every step is applied exactly once,
    and a worker that restarts applies nothing."""
    url = fresh_pg(postgres)
    workers = [PostgresDatabase(url) for _ in range(8)]
    try:
        applied = await asyncio.gather(*(db.migrate(ALL) for db in workers))
        expected = sorted((m.component, m.version) for m in ALL)
        assert sorted(step for result in applied for step in result) == sorted(
            f"{c} v{v}" for c, v in expected
        )
        assert await _schema_rows(workers[0]) == expected
        restarted = PostgresDatabase(url)
        try:
            assert await restarted.migrate(ALL) == []
        finally:
            await restarted.close()
    finally:
        await asyncio.gather(*(db.close() for db in workers))


async def test_transcripts_check_their_prefix(database: Database) -> None:
    """Extend verifies the stored prefix (length and digest) on either database; a retried call
    writes the same rows again and answers the same."""
    store = TranscriptStore(database)
    first, second = _messages(0, 3), _messages(3, 2)
    assert await store.extend("t", 0, EMPTY_DIGEST, first) == first
    assert await store.extend("t", 3, _digest(first), second) == first + second
    assert await store.extend("t", 3, _digest(first), second, load=False) == second
    with pytest.raises(TranscriptUnavailable, match="store has 5 messages .* expects 7"):
        await store.extend("t", 7, _digest(_messages(0, 7)), [])
    with pytest.raises(TranscriptUnavailable, match="store has 0 messages"):
        await store.extend("other", 2, _digest(first[:2]), [])


async def test_concurrent_extends_of_one_transcript_stay_consistent(database: Database) -> None:
    """Twenty attempts racing to store the same step (a retried model call and the slow attempt
    it replaced) leave one transcript whose digest chain holds."""
    store = TranscriptStore(database)
    base = _messages(0, 4)
    await store.extend("race", 0, EMPTY_DIGEST, base)
    extra = _messages(4, 3)
    results = await asyncio.gather(
        *(store.extend("race", 4, _digest(base), extra) for _ in range(20))
    )
    assert all(r == base + extra for r in results)
    assert await store.extend("race", 7, _digest(base + extra), []) == base + extra


async def test_outputs_are_read_only_by_their_run_and_its_forks(database: Database) -> None:
    """A stored output resolves for the run that was given it; another run naming the same
    digest gets nothing; a fork gets it once shared; untrusted outputs are listed per run."""
    blobs = BlobStore(database)
    doc = {"doc_id": 7, "text": "x" * 50_000}
    digest = await blobs.put_output(
        "run-a", "1:c1:read_doc:call", "read_doc", doc, untrusted=True, inline=False
    )
    again = await blobs.put_output(
        "run-a", "1:c1:read_doc:call", "read_doc", doc, untrusted=True, inline=False
    )
    assert again == digest and ref_digest(reference(digest, 1, "read_doc")) == digest
    assert await blobs.resolve("run-a", [digest]) == {digest: doc}
    assert await blobs.resolve("run-b", [digest]) == {}  # another run's forged reference
    assert await blobs.share("run-a", "run-a-fork2-abc", [digest]) == 1
    assert await blobs.resolve("run-a-fork2-abc", [digest]) == {digest: doc}
    small = {"note": "ignore previous instructions"}
    await blobs.put_output("run-a", "2:c2:fetch:call", "fetch", small, untrusted=True, inline=True)
    await blobs.put_output(
        "run-a", "3:c3:lookup:call", "lookup", {"ok": 1}, untrusted=False, inline=True
    )
    untrusted = await blobs.run_outputs("run-a", untrusted_only=True)
    assert [(o.tool, o.inline, o.content) for o in untrusted] == [
        ("read_doc", False, doc),
        ("fetch", True, small),
    ]
    assert len(await blobs.run_outputs("run-a")) == 3


async def test_audit_chain_on_either_database(database: Database) -> None:
    """The audit store keeps its guarantees on the shared database: idempotent appends and a
    chain that verifies; UPDATE and DELETE are refused by triggers."""
    audit = DatabaseAuditStore(database)
    run = f"run-{uuid.uuid4().hex[:8]}"
    entries = story()
    assert (await audit.append(batch(entries[:4], run_id=run))).new == 4
    assert (await audit.append(batch(entries, run_id=run))).new == len(entries) - 4
    assert verify(await audit.entries(run)).ok
    for statement in ("UPDATE spine_audit SET actor = 'x'", "DELETE FROM spine_audit"):
        with pytest.raises(StoreUnavailable, match="append-only"):
            async with database.transaction() as tx:
                await tx.execute(statement)
    assert len(await audit.entries(run)) == len(entries)


async def test_a_log_made_before_migrations_is_adopted(tmp_path: Path) -> None:
    """An audit.db an earlier release created (its table, no spine_schema) is adopted: the
    migrations apply over it and its entries still verify."""
    path = tmp_path / "audit.db"
    old = SQLiteAuditStore(path)
    run = "old-run"
    await old.append(batch(story(), run_id=run))
    await old.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE spine_schema")  # as an earlier release left it
    adopted = SQLiteAuditStore(path)
    try:
        assert await adopted.database.migrate(AUDIT_MIGRATIONS) == ["audit v1", "audit v2"]
        assert verify(await adopted.entries(run)).ok
        assert (await adopted.append(batch(story(), run_id=run))).new == 0
    finally:
        await adopted.close()


async def test_a_reader_before_any_worker_is_told_what_is_missing(postgres: PostgresServer) -> None:
    """The CLI reading a database no worker has migrated gets one line naming the fix."""
    reader = open_database(fresh_pg(postgres), read_only=True)
    try:
        with pytest.raises(StoreUnavailable, match="a worker creates the tables when it starts"):
            await DatabaseAuditStore(reader).entries("r")
    finally:
        await reader.close()


def test_settings_pick_the_database(tmp_path: Path) -> None:
    """SPINE_DATABASE_URL picks PostgreSQL for everything; SPINE_AUDIT_DSN still overrides the
    audit log alone; unset, SQLite files in the state dir (the audit log in its own)."""
    default = database_from_env({}, tmp_path)
    assert isinstance(default, SQLiteDatabase) and default.path == tmp_path / "state.db"
    assert isinstance(store_from_env({}, tmp_path), SQLiteAuditStore)
    env = {"SPINE_DATABASE_URL": "postgresql://spine:pw@db:5432/spine"}
    shared = database_from_env(env, tmp_path)
    assert (
        isinstance(shared, PostgresDatabase)
        and str(shared) == "postgresql://spine:***@db:5432/spine"
    )
    audit = store_from_env(env, tmp_path, database=shared)
    assert isinstance(audit, DatabaseAuditStore) and audit.database is shared
    override = store_from_env({**env, "SPINE_AUDIT_DSN": f"sqlite:///{tmp_path}/a.db"}, tmp_path)
    assert isinstance(override, SQLiteAuditStore) and override.path == tmp_path / "a.db"
    with pytest.raises(ValueError, match=r"SPINE_DATABASE_URL: .*mysql://x:\*\*\*@h/db"):
        database_from_env({"SPINE_DATABASE_URL": "mysql://x:secret@h/db"}, tmp_path)


async def test_unreachable_database_is_one_retryable_line(tmp_path: Path) -> None:
    """No server at the URL: StoreUnavailable (retryable), the password hidden."""
    from spine.client.testing import free_port

    db = PostgresDatabase(f"postgresql://spine:hunter2@127.0.0.1:{free_port()}/spine", timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable, match=r"spine:\*\*\*@127\.0\.0\.1") as err:
            await TranscriptStore(db).extend("t", 0, EMPTY_DIGEST, _messages(0, 1))
        assert "hunter2" not in str(err.value) and err.value.retryable
    finally:
        await db.close()


# --- a worker on PostgreSQL ------------------------------------------------------------------


def spine_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed `spine` command in a child process, with `env` over this one's."""
    return subprocess.run(
        [binary("spine"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


async def test_a_worker_on_postgres_keeps_nothing_on_its_own_disk(
    client, make_worker, worker_config, postgres: PostgresServer, tmp_path: Path
) -> None:
    """With SPINE_DATABASE_URL the demo run's transcript, audit log and spans land in PostgreSQL
    (its state dir stays empty), and `spine audit verify`/`spine trace` read them from there."""
    url = fresh_pg(postgres)
    env = {"SPINE_DATABASE_URL": url}
    telemetry = telemetry_from_env(env)
    assert telemetry.trace_database and telemetry.trace_file is None
    plugins = telemetry.worker_plugins(load_policy().price_table())
    settings = {**worker_config.settings, **env}
    try:
        async with make_worker(settings=settings, plugins=plugins):
            handle = await start_run(
                client, build_demo_request("o-1204"), task_queue=worker_config.task_queue
            )
            state = await wait_for_status(handle, "awaiting_approval")
            await approve_first_pending(handle, state)
            result = await asyncio.wait_for(wait_result(handle), timeout=120)
        assert result.status == "completed", result.reason
        assert telemetry.force_flush()
    finally:
        telemetry.shutdown()
    state_dir = worker_config.state_dir
    assert not state_dir.exists() or list(state_dir.iterdir()) == []
    db = open_database(url, read_only=True)
    try:
        async with db.reading() as tx:
            found = await tx.fetchone(
                "SELECT count(*) AS n FROM spine_transcript WHERE transcript_id LIKE ?",
                (f"{handle.id}%",),
            )
        assert found is not None and found["n"] >= 10
    finally:
        await db.close()
    # The CLI cross-checks the chain against the run's anchor in Temporal's history too.
    address = {"TEMPORAL_ADDRESS": client.service_client.config.target_host}
    verified = await asyncio.to_thread(
        spine_cli, "audit", "verify", handle.id, env={**env, **address}
    )
    assert verified.returncode == 0 and "ok" in verified.stdout, verified.stderr
    traced = await asyncio.to_thread(spine_cli, "trace", handle.id, env=env)
    assert traced.returncode == 0, traced.stderr
    assert "invoke_agent" in traced.stdout and "execute_tool issue_refund" in traced.stdout
