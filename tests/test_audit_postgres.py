"""The audit log on a real PostgreSQL server, started by the test from the installed binaries.

Skipped, with the reason, when psycopg or the server binaries (Debian: ``apt-get install -y
postgresql``, found under ``/usr/lib/postgresql/*/bin``) are missing. The server refuses to run
as root, so under root it runs as the ``postgres`` user that package creates.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spine.activities.errors import DependencyUnavailable
from spine.client.testing import free_port
from spine.observability.audit import AuditConflict, AuditGap, PostgresAuditStore, verify
from spine.payloads import AuditEntry
from tests.test_audit import batch, one_error_line, spine_audit, story

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg)")


def _server_bin() -> Path | None:
    """The newest PostgreSQL server bin directory (`SPINE_TEST_PG_BIN` overrides)."""
    if given := os.environ.get("SPINE_TEST_PG_BIN"):
        return Path(given)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PgServer:
    dsn: str
    bindir: Path
    datadir: Path
    user: str | None

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.datadir.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    bindir = _server_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip(
            "PostgreSQL server binaries not found (apt-get install -y postgresql, or set "
            "SPINE_TEST_PG_BIN to the directory holding initdb and pg_ctl)"
        )
    user = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        user = account.pw_name
    root = Path(tempfile.mkdtemp(prefix="spine-pg-"))
    if user is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    port = free_port()
    server = PgServer(
        dsn=f"postgresql://spine@127.0.0.1:{port}/postgres",
        bindir=bindir,
        datadir=root / "data",
        user=user,
    )
    try:
        init = server.run(
            "initdb", "-D", str(server.datadir), "-U", "spine", "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = server.run(
            "pg_ctl", "-D", str(server.datadir), "-o", options, "-l", str(root / "log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        assert start.returncode == 0, (start.stdout, start.stderr, _log(root))
        yield server
    finally:
        server.run("pg_ctl", "-D", str(server.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _log(root: Path) -> str:
    try:
        return (root / "log").read_text()[-2000:]
    except OSError:
        return ""


@pytest.fixture
async def store(pg_server: PgServer) -> AsyncIterator[PostgresAuditStore]:
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
    store: PostgresAuditStore, pg_server: PgServer
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


async def test_edited_entry_is_named(store: PostgresAuditStore, pg_server: PgServer) -> None:
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
