"""The tamper-evident audit log on SQLite: idempotent appends, the hash chain, `spine audit`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from spine.client.audit_cli import audit
from spine.observability.audit import (
    GENESIS_HASH,
    AuditActivities,
    AuditBatchInvalid,
    AuditConflict,
    AuditGap,
    PostgresAuditStore,
    SQLiteAuditStore,
    store_from_env,
    verify,
)
from spine.payloads import AuditBatch, AuditEntry, digest

RUN = "refund-agent-0001"

# --- builders (also used by test_audit_postgres.py) -----------------------------------------


def story() -> list[AuditEntry]:
    """A refund run as the workflow would record it: eight entries, seqs 0..7."""
    at = "2026-01-02T10:00:{:02d}+00:00"
    rows: list[tuple[str, int, str, dict[str, object]]] = [
        ("run_started", 0, "alice", {"user": "alice", "role": "support", "provider": "scripted",
                                     "model": "scripted", "goal_digest": digest("refund o-1")}),
        ("model_turn", 1, "model", {"model": "scripted", "input_tokens": 120,
                                    "output_tokens": 30, "usd": 0.0012,
                                    "finish_reason": "tool_calls",
                                    "tool_calls": [{"name": "issue_refund"}]}),
        ("policy_decision", 1, "policy", {"decision": "needs_approval", "tool": "issue_refund",
                                          "reason": "amount 150.00 is above 100.00"}),
        ("approval", 1, "bob", {"approval_id": "ap-1", "decision": "approve", "by": "bob",
                                "role": "supervisor", "reason": "customer verified"}),
        ("tool_call", 1, "agent", {"tool": "issue_refund", "version": 1,
                                   "args_digest": digest({"order_id": "o-1", "amount": 150}),
                                   "outcome": "ok", "idempotency_key": "refund-agent-0001/1/c1"}),
        ("model_turn", 2, "model", {"model": "scripted", "input_tokens": 200,
                                    "output_tokens": 12, "usd": 0.0009, "finish_reason": "stop"}),
        ("budget", 2, "policy", {"spent_usd": 0.0021, "limit_usd": 0.5}),
        ("run_outcome", 2, "agent", {"status": "completed", "steps": 2, "usd": 0.0021}),
    ]  # fmt: skip
    return [
        AuditEntry(seq=i, kind=kind, step=step, actor=actor, at=at.format(i), data=data)  # type: ignore[arg-type]  # kinds above are valid
        for i, (kind, step, actor, data) in enumerate(rows)
    ]


def batch(
    entries: list[AuditEntry], run_id: str = RUN, workflow_run_id: str = "wr-1"
) -> AuditBatch:
    return AuditBatch(
        run_id=run_id,
        workflow_run_id=workflow_run_id,
        agent="refund-agent",
        account="acme",
        entries=entries,
    )


def spine_audit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `spine audit ...` in a child process, through the `spine` group's error handling."""
    code = (
        "from client.cli import cli; from client.audit_cli import audit; "
        "cli.add_command(audit); cli.main(prog_name='spine')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "audit", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spine: error: "), proc.stderr
    return lines[0]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteAuditStore]:
    store = SQLiteAuditStore(tmp_path / "audit.db")
    yield store
    await store.close()


def tamper(path: Path, sql: str, *params: object) -> None:
    """Edit the file as an intruder would: drop the append-only triggers, then change rows."""
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER spine_audit_no_update")
        db.execute("DROP TRIGGER spine_audit_no_delete")
        assert db.execute(sql, params).rowcount == 1


# --- appending -------------------------------------------------------------------------------


async def test_same_batch_twice_stores_each_entry_once(store: SQLiteAuditStore) -> None:
    """Appending the same batch again (a retry) stores nothing new and keeps one copy each."""
    entries = story()
    assert (await store.append(batch(entries[:5]))).new == 5
    assert (await store.append(batch(entries[:5]))).new == 0
    assert (await store.append(batch(entries[3:]))).new == 3
    stored = await store.entries(RUN)
    assert [e.seq for e in stored] == list(range(8))
    assert [e.data for e in stored] == [e.data for e in entries]


async def test_retried_entry_with_a_later_time_is_the_same_entry(store: SQLiteAuditStore) -> None:
    """An entry resent by a retried workflow task (only `at` moved) is skipped; the first stays."""
    entries = story()
    await store.append(batch(entries[:2]))
    again = [e.model_copy(update={"at": "2026-01-02T10:05:00+00:00"}) for e in entries[:3]]
    assert (await store.append(batch(again))).new == 1
    stored = await store.entries(RUN)
    assert stored[1].at == entries[1].at
    assert verify(stored).ok


async def test_different_content_at_a_stored_seq_is_refused(store: SQLiteAuditStore) -> None:
    """Different content at a stored seq raises non-retryable AuditConflict; nothing is written."""
    entries = story()
    await store.append(batch(entries[:3]))
    forged = entries[2].model_copy(update={"data": {"decision": "allow"}})
    with pytest.raises(AuditConflict, match=r"seq 2 is already stored with different data") as err:
        await store.append(batch([forged, entries[3]]))
    failure = err.value.to_application_error()
    assert failure.non_retryable and failure.type == "AuditConflict"
    assert len(await store.entries(RUN)) == 3


async def test_same_seq_from_another_workflow_run_is_refused(store: SQLiteAuditStore) -> None:
    """A reused workflow id cannot silently merge a second run into the first one's chain."""
    await store.append(batch(story()[:1], workflow_run_id="wr-1"))
    with pytest.raises(AuditConflict, match="workflow_run_id"):
        await store.append(batch(story()[:1], workflow_run_id="wr-2"))


async def test_gap_is_retryable_and_heals(store: SQLiteAuditStore) -> None:
    """A batch after a missing seq raises retryable AuditGap, and lands once the gap is filled."""
    entries = story()
    with pytest.raises(AuditGap, match=r"seq 2 is not stored yet") as err:
        await store.append(batch(entries[3:5]))
    failure = err.value.to_application_error()
    assert not failure.non_retryable and failure.type == "AuditGap"
    await store.append(batch(entries[:3]))
    assert (await store.append(batch(entries[3:5]))).new == 2
    assert verify(await store.entries(RUN)).ok


async def test_non_consecutive_batch_is_invalid(store: SQLiteAuditStore) -> None:
    """A batch whose seqs skip is a bug in the caller, refused without retry."""
    entries = story()
    with pytest.raises(AuditBatchInvalid, match=r"\[0, 2\]"):
        await store.append(batch([entries[0], entries[2]]))


async def test_empty_batch_is_a_no_op(store: SQLiteAuditStore) -> None:
    """An empty batch stores nothing and needs no database round trip."""
    assert (await store.append(batch([]))).new == 0
    assert await store.run_ids() == []


async def test_activity_reports_taxonomy_errors(store: SQLiteAuditStore) -> None:
    """`spine.audit_append` returns the count, a conflict as non-retryable, a gap as retryable."""
    env = ActivityEnvironment()
    activities = AuditActivities(store)
    entries = story()
    assert (await env.run(activities.append, batch(entries[:4]))).new == 4
    forged = entries[3].model_copy(update={"actor": "mallory"})
    with pytest.raises(ApplicationError) as conflict:
        await env.run(activities.append, batch([forged]))
    assert conflict.value.type == "AuditConflict" and conflict.value.non_retryable
    with pytest.raises(ApplicationError) as gap:
        await env.run(activities.append, batch(entries[5:], run_id="other"))
    assert gap.value.type == "AuditGap" and not gap.value.non_retryable


async def test_concurrent_overlapping_appends_make_one_chain(store: SQLiteAuditStore) -> None:
    """20 writers appending overlapping batches for one run leave one gap-free, valid chain."""
    entries = [
        AuditEntry(seq=i, kind="tool_call", step=i, actor="agent", at=f"t{i}", data={"n": i})
        for i in range(60)
    ]
    rng = random.Random(7)
    # Four connections to one file, as four worker processes would have.
    stores = [store, *(SQLiteAuditStore(store.path) for _ in range(3))]

    async def writer(store: SQLiteAuditStore) -> None:
        start = 0
        while start < len(entries):
            end = min(len(entries), start + rng.randint(1, 8))
            lo = max(0, start - rng.randint(0, 4))  # resend a few entries: overlap
            while True:
                try:
                    await store.append(batch(entries[lo:end]))
                    break
                except AuditGap:  # another writer has not landed the earlier seqs yet
                    await asyncio.sleep(0.001)
            start = end

    await asyncio.gather(*(writer(stores[i % 4]) for i in range(20)))
    for other in stores[1:]:
        await other.close()
    stored = await store.entries(RUN)
    assert [e.seq for e in stored] == list(range(60))
    result = verify(stored)
    assert result.ok, result.first_broken


async def test_concurrent_different_content_cannot_fork(store: SQLiteAuditStore) -> None:
    """Two writers racing different entries for the same seq: one lands, the other conflicts."""
    entries = story()
    await store.append(batch(entries[:3]))
    variants = [
        entries[3].model_copy(update={"data": {"decision": "approve", "by": f"b{i}"}})
        for i in range(10)
    ]
    stores = [SQLiteAuditStore(store.path) for _ in variants]  # one connection each
    outcomes = await asyncio.gather(
        *(s.append(batch([v])) for s, v in zip(stores, variants, strict=True)),
        return_exceptions=True,
    )
    for other in stores:
        await other.close()
    assert sorted(type(o).__name__ for o in outcomes) == ["Appended"] + ["AuditConflict"] * 9
    stored = await store.entries(RUN)
    assert len(stored) == 4 and verify(stored).ok


async def test_many_runs_append_in_few_transactions_each_checked_alone(
    store: SQLiteAuditStore,
) -> None:
    """Group commit: 120 runs appending at once share a few transactions, and within one a
    batch that cannot be chained (a gap) or contradicts the log (a conflict) fails alone while
    the others land and verify."""
    entries = story()
    await store.append(batch(entries[:3], run_id="conflicted"))
    opened = 0
    transaction = store.database.transaction

    def counting(**kwargs: object):  # type: ignore[no-untyped-def]
        nonlocal opened
        opened += 1
        return transaction(**kwargs)  # type: ignore[arg-type]

    store.database.transaction = counting  # type: ignore[method-assign]
    runs = [f"run-{i:03d}" for i in range(120)]
    forged = entries[2].model_copy(update={"data": {"decision": "approve", "by": "mallory"}})
    outcomes = await asyncio.gather(
        *(store.append(batch(entries[:4], run_id=r)) for r in runs),
        store.append(batch(entries[5:], run_id="gapped")),  # seqs 0..4 never stored
        store.append(batch([forged], run_id="conflicted")),
        return_exceptions=True,
    )
    assert all(type(o).__name__ == "Appended" for o in outcomes[:120]), outcomes[:3]
    assert isinstance(outcomes[120], AuditGap) and isinstance(outcomes[121], AuditConflict)
    assert 1 <= opened <= 10, f"{opened} transactions for 122 appends"
    for run_id in (*runs[:3], runs[-1], "conflicted"):
        stored = await store.entries(run_id)
        assert [e.seq for e in stored] == [0, 1, 2, 3][: len(stored)] and verify(stored).ok
    assert await store.entries("gapped") == []


async def test_store_refuses_update_and_delete(store: SQLiteAuditStore) -> None:
    """The table's triggers refuse UPDATE and DELETE: it is append-only."""
    await store.append(batch(story()[:2]))
    with sqlite3.connect(store.path) as db:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE spine_audit SET actor = 'x'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM spine_audit")


# --- the chain -------------------------------------------------------------------------------


async def test_chain_verifies(store: SQLiteAuditStore) -> None:
    """Stored entries link from the genesis hash, each to the one before, and verify."""
    await store.append(batch(story()))
    stored = await store.entries(RUN)
    assert stored[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(stored, stored[1:], strict=False))
    result = verify(stored)
    assert result.ok and result.entries == 8 and result.runs[0].head == stored[-1].hash


async def test_edited_data_names_exactly_that_entry(store: SQLiteAuditStore) -> None:
    """An UPDATE of one entry's data in the file is named at that run and seq: content changed."""
    await store.append(batch(story()))
    await store.append(batch(story(), run_id="untouched"))
    tamper(
        store.path,
        "UPDATE spine_audit SET data = ? WHERE run_id = ? AND seq = 3",
        '{"approval_id":"ap-1","by":"bob","decision":"reject","reason":"","role":"supervisor"}',
        RUN,
    )
    result = verify(await store.entries(RUN) + await store.entries("untouched"))
    assert not result.ok
    broken = result.first_broken
    assert broken is not None
    assert (broken.run_id, broken.seq, broken.problem) == (RUN, 3, "content_changed")
    assert [c.broken is None for c in result.runs] == [False, True]


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("step", 9, "content_changed"),
        ("hash", "0" * 64, "hash_mismatch"),
        ("prev_hash", "f" * 64, "prev_hash_mismatch"),
    ],
)
async def test_each_kind_of_edit_is_named(
    store: SQLiteAuditStore, column: str, value: object, problem: str
) -> None:
    """Editing a column, a stored hash or a link is named at the edited entry, with its kind."""
    await store.append(batch(story()))
    tamper(store.path, f"UPDATE spine_audit SET {column} = ? WHERE seq = 5", value)
    broken = verify(await store.entries(RUN)).first_broken
    assert broken is not None and (broken.seq, broken.problem) == (5, problem)


async def test_deleted_middle_entry_is_a_gap(store: SQLiteAuditStore) -> None:
    """Deleting an entry from the middle is reported as a gap at the missing seq."""
    await store.append(batch(story()))
    tamper(store.path, "DELETE FROM spine_audit WHERE run_id = ? AND seq = 4", RUN)
    broken = verify(await store.entries(RUN)).first_broken
    assert broken is not None
    assert (broken.seq, broken.problem) == (4, "gap")
    assert "seq 4 missing before seq 5" in broken.line()


# --- configuration ---------------------------------------------------------------------------


def test_store_from_env_picks_the_store(tmp_path: Path) -> None:
    """No DSN means SQLite in the state dir; sqlite:/// and postgresql:// DSNs pick their store."""
    default = store_from_env({}, tmp_path / "state")
    assert isinstance(default, SQLiteAuditStore)
    assert default.path == tmp_path / "state" / "audit.db"
    explicit = store_from_env({"SPINE_AUDIT_DSN": f"sqlite:///{tmp_path}/a.db"}, tmp_path)
    assert isinstance(explicit, SQLiteAuditStore) and explicit.path == tmp_path / "a.db"
    pg = store_from_env({"SPINE_AUDIT_DSN": "postgresql://spine:pw@db:5432/spine"}, tmp_path)
    assert isinstance(pg, PostgresAuditStore)
    assert str(pg) == "postgresql://spine:***@db:5432/spine"
    with pytest.raises(ValueError, match="mysql://x:\\*\\*\\*@h/db"):
        store_from_env({"SPINE_AUDIT_DSN": "mysql://x:secret@h/db"}, tmp_path)


# --- spine audit -----------------------------------------------------------------------------


async def invoke(*args: str, env: dict[str, str]) -> Result:
    """`spine audit ...` in process (its errors arrive as `result.exception`).

    In a thread: the command runs its own event loop, which must not replace the test's.
    """
    return await asyncio.to_thread(CliRunner().invoke, audit, list(args), env=env)


async def test_show_prints_the_story(store: SQLiteAuditStore, tmp_path: Path) -> None:
    """`spine audit show RUN` prints one summarised line per entry, then `chain: ok (8 entries)`."""
    await store.append(batch(story()))
    result = await invoke("show", RUN, env={"SPINE_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 9
    assert lines[0].startswith("2026-01-02 10:00:00Z  #0   step 0   run_started")
    assert (
        "scripted: 120 in / 30 out tokens, $0.0012, finish tool_calls -> issue_refund" in lines[1]
    )
    assert "needs_approval issue_refund: amount 150.00 is above 100.00" in lines[2]
    assert "approve ap-1 by bob (supervisor): customer verified" in lines[3]
    assert "issue_refund@1(sha256:" in lines[4]
    assert ") -> ok  key refund-agent-0001/1/c1" in lines[4]
    assert "completed  (2 steps, $0.0021)" in lines[7]
    assert lines[8] == "chain: ok (8 entries)"


async def test_show_json_carries_entries_and_verdict(
    store: SQLiteAuditStore, tmp_path: Path
) -> None:
    """`spine audit show RUN --json` gives the stored entries and the chain verdict."""
    await store.append(batch(story()))
    result = await invoke("show", RUN, "--json", env={"SPINE_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [e["kind"] for e in shown["entries"]][-1] == "run_outcome"
    assert shown["chain"]["ok"] is True and shown["chain"]["entries"] == 8


async def test_cli_verify_names_the_edited_entry(store: SQLiteAuditStore) -> None:
    """After an UPDATE in the file, `spine audit verify RUN` exits 1 with one line naming it."""
    await store.append(batch(story()))
    await store.append(batch(story(), run_id="untouched"))
    env = {"SPINE_AUDIT_DSN": f"sqlite:///{store.path}"}
    ok = await invoke("verify", "--offline", env=env)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines()[-1] == "chain: ok (2 runs, 16 entries)"
    tamper(store.path, "UPDATE spine_audit SET data = '{}' WHERE run_id = ? AND seq = 6", RUN)
    named = f"audit chain broken: run {RUN!r} seq 6: content changed"
    line = one_error_line(await asyncio.to_thread(spine_audit, "verify", "--offline", RUN, env=env))
    assert line.startswith(f"spine: error: {named}")
    for args in (("verify", "--offline"), ("show", RUN), ("verify", "--offline", "--json")):
        result = await invoke(*args, env=env)
        assert result.exit_code == 1 and str(result.exception).startswith(named), args
    shown = await invoke("verify", "--offline", "--json", env=env)
    assert json.loads(shown.stdout)["first_broken"]["seq"] == 6
    assert (await invoke("verify", "--offline", "untouched", env=env)).exit_code == 0


async def test_cli_missing_log_or_run_is_an_error(store: SQLiteAuditStore, tmp_path: Path) -> None:
    """An unknown run, or no audit log at all, is a one-line error and exit 1."""
    await store.append(batch(story()))
    unknown = await invoke("show", "nope", env={"SPINE_STATE_DIR": str(tmp_path)})
    assert unknown.exit_code == 1
    assert str(unknown.exception).startswith("no audit entries for run 'nope' in sqlite:///")
    missing = await invoke("verify", "--offline", env={"SPINE_STATE_DIR": str(tmp_path / "empty")})
    assert missing.exit_code == 1 and "no audit log at" in str(missing.exception)
    bad = await invoke("verify", "--offline", env={"SPINE_AUDIT_DSN": "mysql://h/db"})
    assert bad.exit_code == 1 and "is not supported" in str(bad.exception)
