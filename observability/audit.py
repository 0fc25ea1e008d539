"""The tamper-evident audit log: an append-only, hash-chained record of every run.

The workflow numbers each run's entries from 0 (`AuditEntry.seq`, one chain per workflow id,
across continue-as-new) and sends them in order, in batches, through the local activity
``spine.audit_append``. The store links each entry to the previous one::

    hash(seq) = sha256(hash(seq - 1) + "\\n" + canonical_json(content(seq)))     hash(-1) = GENESIS

where the content is every stored column except the hashes (run id, workflow run id, agent,
account, seq, kind, step, actor, at, data, policy version), so editing any stored value, deleting
an entry or re-linking one shows up in :func:`verify`. The chain cannot reveal a truncated tail
or a chain recomputed from scratch by someone with write access; anchor head hashes elsewhere for
that.

Appending is idempotent, so Temporal may retry it freely:

- an entry already stored with the same content is skipped; `at` does not count, because
  ``workflow.now()`` moves when a workflow task is retried after a worker crash, and the first
  stored time is kept;
- different content at a stored seq raises :class:`AuditConflict` (non-retryable): the workflow
  is not deterministic, or a workflow id was reused;
- an entry whose predecessor is missing raises :class:`AuditGap` (retryable): the workflow always
  sends in order, so an earlier write was lost and a retry of it will come.

Check and insert happen in one transaction holding a per-run lock (``BEGIN IMMEDIATE`` in SQLite,
an advisory transaction lock in PostgreSQL), so concurrent appends for one run cannot fork it.
Both stores also refuse UPDATE and DELETE with triggers; dropping the trigger to edit a row is
what :func:`verify` catches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel
from temporalio import activity

from spine.activities.errors import SpineError, TerminalError, TransientError
from spine.contract import ACTIVITY_AUDIT_APPEND, JsonObject
from spine.payloads import Appended, AuditBatch, AuditEntry
from spine.store import (
    Database,
    Migration,
    PostgresDatabase,
    SQLiteDatabase,
    database_from_env,
    redact_url,
    shared_database,
)

Row = dict[str, str | int]
"""One entry as table columns (data as canonical JSON text)."""

GENESIS_HASH = hashlib.sha256(b"spine-audit-genesis").hexdigest()
"""The `prev_hash` of every run's entry 0."""

DEFAULT_AUDIT_DB = "audit.db"

# Columns compared when an entry arrives a second time; `at` is deliberately absent (see above).
_IDENTITY_FIELDS = (
    "workflow_run_id",
    "agent",
    "account",
    "kind",
    "step",
    "actor",
    "data",
    "policy_version",
)


class AuditConflict(TerminalError):
    """A stored entry has different content at the same (run, seq); retrying cannot help."""


class AuditBatchInvalid(TerminalError):
    """The batch itself is malformed (seqs not consecutive, data not JSON); a bug, not a fault."""


class AuditGap(TransientError):
    """The entry before the batch is not stored yet; the lost write will be retried first."""


class StoredEntry(AuditEntry):
    """An audit entry as stored: the entry, its run, and its place in the hash chain."""

    run_id: str
    workflow_run_id: str
    agent: str
    account: str
    prev_hash: str
    hash: str


Problem = Literal["content_changed", "hash_mismatch", "gap", "prev_hash_mismatch"]

_PROBLEM_TEXT: dict[str, str] = {
    "content_changed": "content changed",
    "hash_mismatch": "hash mismatch",
    "gap": "gap",
    "prev_hash_mismatch": "prev_hash mismatch",
}


class AuditBreak(BaseModel):
    """The first entry of a run whose chain does not hold, and how it fails."""

    run_id: str
    seq: int
    problem: Problem
    detail: str

    def line(self) -> str:
        """One line naming the entry: `run 'r-1' seq 3: content changed (...)`."""
        return f"run {self.run_id!r} seq {self.seq}: {_PROBLEM_TEXT[self.problem]} ({self.detail})"


class RunCheck(BaseModel):
    """The verdict on one run's chain."""

    run_id: str
    entries: int
    head: str | None = None
    broken: AuditBreak | None = None


class VerifyResult(BaseModel):
    """The verdict on the runs given to :func:`verify`; `first_broken` is None when all hold."""

    ok: bool
    entries: int
    runs: list[RunCheck]
    first_broken: AuditBreak | None = None


class AuditStore(Protocol):
    """Where audit entries live. Implementations keep each run's chain gap-free and unforked."""

    async def append(self, batch: AuditBatch) -> Appended:
        """Store the batch's entries in order; return how many were new, and where the chain
        now stands (entries and head hash), which the run anchors in its history.

        Raises:
            AuditConflict: an entry differs from the one stored at its seq.
            AuditGap: the entry before the first new one is not stored.
            AuditBatchInvalid: the batch's seqs are not consecutive, or its data is not JSON.
            DependencyUnavailable: the database cannot be reached or is locked (retryable).
        """
        ...

    async def entries(self, run_id: str) -> list[StoredEntry]:
        """Every stored entry of `run_id`, by seq."""
        ...

    async def run_ids(self) -> list[str]:
        """Every run with entries, sorted."""
        ...

    async def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


# --- the chain -------------------------------------------------------------------------------


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN: one byte string per JSON value."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def entry_content(
    entry: AuditEntry, *, run_id: str, workflow_run_id: str, agent: str, account: str
) -> JsonObject:
    """The hashed content of an entry: every stored column except the hashes."""
    return {
        "run_id": run_id,
        "workflow_run_id": workflow_run_id,
        "agent": agent,
        "account": account,
        "seq": entry.seq,
        "kind": entry.kind,
        "step": entry.step,
        "actor": entry.actor,
        "at": entry.at,
        "data": entry.data,
        "policy_version": entry.policy_version,
    }


def chain_hash(prev_hash: str, content: Mapping[str, object]) -> str:
    """`sha256(prev_hash + "\\n" + canonical_json(content))`, hex."""
    return hashlib.sha256(f"{prev_hash}\n{canonical_json(content)}".encode()).hexdigest()


def stored_hash(entry: StoredEntry) -> str:
    """What `entry.hash` should be, recomputed from its stored content and `prev_hash`."""
    content = entry_content(
        entry,
        run_id=entry.run_id,
        workflow_run_id=entry.workflow_run_id,
        agent=entry.agent,
        account=entry.account,
    )
    try:
        return chain_hash(entry.prev_hash, content)
    except (TypeError, ValueError):  # a tampered row that no longer encodes as JSON
        return "unencodable"


def verify(entries: Iterable[StoredEntry]) -> VerifyResult:
    """Recompute the chain of every run in `entries` and name the first broken entry of each.

    Entries may come in any order and from several runs. For each run, the first of these
    found, in seq order, is reported:

    - ``gap``: the seq is missing (deleted, or the chain does not start at 0);
    - ``prev_hash_mismatch``: the entry is not linked to the stored hash before it;
    - ``hash_mismatch``: the entry's stored hash was changed (its successor links to the hash
      its content gives);
    - ``content_changed``: the entry's content no longer gives its stored hash.
    """
    runs: dict[str, list[StoredEntry]] = {}
    for entry in entries:
        runs.setdefault(entry.run_id, []).append(entry)
    checks = [_verify_run(run_id, sorted(chain, key=_seq_order)) for run_id, chain in runs.items()]
    first = next((c.broken for c in checks if c.broken is not None), None)
    return VerifyResult(
        ok=first is None,
        entries=sum(c.entries for c in checks),
        runs=checks,
        first_broken=first,
    )


def _seq_order(entry: StoredEntry) -> tuple[bool, int]:
    # A seq edited into something that is not an int sorts last and is reported, not a crash.
    return (False, entry.seq) if isinstance(entry.seq, int) else (True, 0)


def _verify_run(run_id: str, chain: Sequence[StoredEntry]) -> RunCheck:
    prev = GENESIS_HASH
    for index, entry in enumerate(chain):
        broken: AuditBreak | None = None
        if entry.seq != index:
            if entry.seq < index:
                detail = f"seq {entry.seq} appears more than once"
            elif entry.seq == index + 1:
                detail = f"seq {index} missing before seq {entry.seq}"
            else:
                detail = f"seqs {index}..{entry.seq - 1} missing before seq {entry.seq}"
            broken = AuditBreak(run_id=run_id, seq=index, problem="gap", detail=detail)
        elif entry.prev_hash != prev:
            before = "the genesis hash" if index == 0 else f"the hash of seq {index - 1}"
            broken = AuditBreak(
                run_id=run_id,
                seq=entry.seq,
                problem="prev_hash_mismatch",
                detail=f"prev_hash {entry.prev_hash[:12]} is not {before} ({prev[:12]})",
            )
        else:
            expected = stored_hash(entry)
            if expected != entry.hash:
                successor = chain[index + 1] if index + 1 < len(chain) else None
                if successor is not None and successor.prev_hash == expected:
                    broken = AuditBreak(
                        run_id=run_id,
                        seq=entry.seq,
                        problem="hash_mismatch",
                        detail=(
                            f"stored hash {entry.hash[:12]} was changed; content and the next "
                            f"entry give {expected[:12]}"
                        ),
                    )
                else:
                    broken = AuditBreak(
                        run_id=run_id,
                        seq=entry.seq,
                        problem="content_changed",
                        detail=(
                            f"{entry.kind} entry no longer matches its stored hash "
                            f"{entry.hash[:12]}; it was edited after it was written"
                        ),
                    )
        if broken is not None:
            return RunCheck(run_id=run_id, entries=len(chain), broken=broken)
        prev = entry.hash
    return RunCheck(run_id=run_id, entries=len(chain), head=prev if chain else None)


# --- shared append logic ---------------------------------------------------------------------


_COLUMNS = (
    "run_id",
    "seq",
    "workflow_run_id",
    "agent",
    "account",
    "kind",
    "step",
    "actor",
    "at",
    "data",
    "policy_version",
    "prev_hash",
    "hash",
)


def _prepare(batch: AuditBatch) -> list[Row]:
    """The batch's entries as column dicts (data as canonical JSON), hashes not yet set."""
    if not batch.run_id:
        raise AuditBatchInvalid("audit batch has an empty run_id")
    first = batch.entries[0].seq
    seqs = [e.seq for e in batch.entries]
    if first < 0 or seqs != list(range(first, first + len(seqs))):
        raise AuditBatchInvalid(
            f"audit batch for run {batch.run_id!r} has seqs {seqs[:10]}; "
            "they must be consecutive and start at 0 or above"
        )
    rows: list[Row] = []
    for entry in batch.entries:
        plain = entry.model_dump(mode="json")
        try:
            data = canonical_json(plain["data"])
        except (TypeError, ValueError) as e:
            raise AuditBatchInvalid(
                f"audit entry {batch.run_id!r} seq {entry.seq}: data is not plain JSON ({e})"
            ) from e
        rows.append(
            {
                "run_id": batch.run_id,
                "seq": entry.seq,
                "workflow_run_id": batch.workflow_run_id,
                "agent": batch.agent,
                "account": batch.account,
                "kind": plain["kind"],
                "step": plain["step"],
                "actor": plain["actor"],
                "at": plain["at"],
                "data": data,
                "policy_version": plain["policy_version"],
            }
        )
    return rows


def _row_content(row: Row) -> JsonObject:
    content = {name: row[name] for name in _COLUMNS[:-2]}
    content["data"] = json.loads(str(row["data"]))
    return content


def _link(rows: list[Row], stored: Mapping[int, Mapping[str, object]]) -> tuple[list[Row], str]:
    """Chain `rows` onto the stored entries; return the rows still to insert and the chain's
    head hash after the batch.

    `stored` holds the stored rows from the seq before the batch to its last seq.
    """
    run_id = rows[0]["run_id"]
    first = int(rows[0]["seq"])
    if first == 0:
        prev_hash = GENESIS_HASH
    elif (before := stored.get(first - 1)) is not None:
        prev_hash = str(before["hash"])
    else:
        raise AuditGap(
            f"audit entry {run_id!r} seq {first - 1} is not stored yet, so seq {first} "
            "cannot be chained; retrying until the earlier batch lands"
        )
    new: list[Row] = []
    for row in rows:
        existing = stored.get(int(row["seq"]))
        if existing is not None:
            differs = [f for f in _IDENTITY_FIELDS if existing[f] != row[f]]
            if differs:
                raise AuditConflict(
                    f"audit entry {run_id!r} seq {row['seq']} is already stored with different "
                    f"{', '.join(differs)}; the workflow is not deterministic or its workflow "
                    "id was reused (the log keeps the first version)"
                )
            prev_hash = str(existing["hash"])
            continue
        row["prev_hash"] = prev_hash
        row["hash"] = prev_hash = chain_hash(prev_hash, _row_content(row))
        new.append(row)
    return new, prev_hash


def _entry_from_row(row: Mapping[str, object]) -> StoredEntry:
    """A stored row as an entry, unvalidated: a tampered row must reach `verify`, not crash."""
    text = row["data"]
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        data = {"$unparsable": text}
    values = dict(row)
    values["data"] = data
    return StoredEntry.model_construct(**values)


# --- the store, on SQLite or PostgreSQL ------------------------------------------------------

_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM spine_audit"
_INSERT = (
    f"INSERT INTO spine_audit ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)

MIGRATIONS = (
    Migration(
        "audit",
        1,
        sqlite="""
CREATE TABLE IF NOT EXISTS spine_audit (
    run_id          TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    workflow_run_id TEXT    NOT NULL,
    agent           TEXT    NOT NULL,
    account         TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    step            INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    at              TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    policy_version  TEXT    NOT NULL,
    prev_hash       TEXT    NOT NULL,
    hash            TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS spine_audit_no_update BEFORE UPDATE ON spine_audit
BEGIN SELECT RAISE(ABORT, 'spine_audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS spine_audit_no_delete BEFORE DELETE ON spine_audit
BEGIN SELECT RAISE(ABORT, 'spine_audit is append-only'); END;
""",
        postgresql="""
CREATE TABLE IF NOT EXISTS spine_audit (
    run_id          text   NOT NULL,
    seq             bigint NOT NULL,
    workflow_run_id text   NOT NULL,
    agent           text   NOT NULL,
    account         text   NOT NULL,
    kind            text   NOT NULL,
    step            bigint NOT NULL,
    actor           text   NOT NULL,
    at              text   NOT NULL,
    data            text   NOT NULL,
    policy_version  text   NOT NULL,
    prev_hash       text   NOT NULL,
    hash            text   NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE OR REPLACE FUNCTION spine_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'spine_audit is append-only'; END $$;
CREATE OR REPLACE TRIGGER spine_audit_no_change BEFORE UPDATE OR DELETE ON spine_audit
FOR EACH ROW EXECUTE FUNCTION spine_audit_append_only();
CREATE OR REPLACE TRIGGER spine_audit_no_truncate BEFORE TRUNCATE ON spine_audit
FOR EACH STATEMENT EXECUTE FUNCTION spine_audit_append_only();
""",
    ),
    Migration(
        "audit",
        2,
        sqlite="CREATE INDEX IF NOT EXISTS spine_audit_kind_at ON spine_audit (kind, at);",
        postgresql="CREATE INDEX IF NOT EXISTS spine_audit_kind_at ON spine_audit (kind, at);",
    ),
)
"""The audit log's schema; applied at worker start (and by a writable store on first use)."""


_Waiting = tuple[str, list[Row], "asyncio.Future[Appended]"]


@dataclass
class _Group:
    """Appends waiting for the store's writer, and the writer (one per event loop)."""

    waiting: list[_Waiting] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


class DatabaseAuditStore:
    """The audit log in a shared-state :class:`~spine.store.Database` (SQLite or PostgreSQL).

    An append checks and inserts in one transaction holding the run's lock (the whole file in
    SQLite, an advisory lock on the run id in PostgreSQL), so concurrent appends for one run, from
    any process or host, cannot fork its chain; appends for different runs proceed in parallel
    on PostgreSQL. For defence in depth, give the workers' database role only SELECT and INSERT
    on ``spine_audit``.
    """

    #: The most appends one transaction takes.
    MAX_GROUP = 256

    def __init__(self, database: Database) -> None:
        self.database = database
        self.read_only = database.read_only
        self._groups: dict[asyncio.AbstractEventLoop, _Group] = {}

    def __str__(self) -> str:
        return str(self.database)

    async def _ready(self) -> None:
        if not self.read_only:
            await self.database.migrate(MIGRATIONS)

    async def append(self, batch: AuditBatch) -> Appended:
        """Chain and store `batch`, in one transaction with the other runs' appends waiting
        at the same moment (group commit): a busy worker writes the audit log in a few
        transactions, not one per model call, each append checked on its own as before."""
        if not batch.entries:
            return Appended(new=0, entries=0, head=GENESIS_HASH)
        rows = _prepare(batch)
        await self._ready()
        loop = asyncio.get_running_loop()
        group = self._groups.get(loop)
        if group is None:
            self._groups = {k: v for k, v in self._groups.items() if not k.is_closed()}
            group = self._groups[loop] = _Group()
        future: asyncio.Future[Appended] = loop.create_future()
        group.waiting.append((batch.run_id, rows, future))
        if group.writer is None or group.writer.done():
            group.writer = asyncio.create_task(self._write_groups(group))
        return await future

    async def _write_groups(self, group: _Group) -> None:
        while group.waiting:
            taken, group.waiting = group.waiting[: self.MAX_GROUP], group.waiting[self.MAX_GROUP :]
            try:
                outcomes = await self._write(taken)
            except Exception as err:  # the transaction failed: nothing of it was stored
                outcomes = [err.copy() if isinstance(err, SpineError) else err for _ in taken]
            for (_, _, future), outcome in zip(taken, outcomes, strict=True):
                if future.done():
                    continue  # its activity was cancelled; what was stored stays stored
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _write(self, taken: list[_Waiting]) -> list[Appended | Exception]:
        outcomes: list[Appended | Exception] = []
        async with self.database.transaction(lock=[run_id for run_id, _, _ in taken]) as tx:
            for run_id, rows, _ in taken:
                first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
                found = await tx.fetchall(
                    f"{_SELECT} WHERE run_id = ? AND seq BETWEEN ? AND ?",
                    (run_id, first - 1, last),
                )
                try:
                    new, head = _link(rows, {int(r["seq"]): r for r in found})
                except (AuditGap, AuditConflict) as err:  # this batch only; nothing written
                    outcomes.append(err)
                    continue
                await tx.executemany(_INSERT, [tuple(row[c] for c in _COLUMNS) for row in new])
                outcomes.append(Appended(new=len(new), entries=last + 1, head=head))
        return outcomes

    async def entries(self, run_id: str) -> list[StoredEntry]:
        await self._ready()
        async with self.database.reading() as tx:
            rows = await tx.fetchall(f"{_SELECT} WHERE run_id = ? ORDER BY seq", (run_id,))
        return [_entry_from_row(row) for row in rows]

    async def run_ids(self) -> list[str]:
        await self._ready()
        async with self.database.reading() as tx:
            rows = await tx.fetchall("SELECT DISTINCT run_id FROM spine_audit ORDER BY run_id")
        return [str(r["run_id"]) for r in rows]

    async def recent(self, since: str, active_since: str) -> list[dict[str, object]]:
        """Run outcomes and tool calls `at` or after `since`, plus every tool call of the runs
        that made one at or after `active_since` (ISO text, compared as text): what alerts read,
        in one query on either database."""
        await self._ready()
        async with self.database.reading() as tx:
            return await tx.fetchall(
                "SELECT run_id, agent, account, kind, at, data FROM spine_audit "
                "WHERE (kind = 'run_outcome' AND at >= ?) "
                "OR (kind = 'tool_call' AND (at >= ? OR run_id IN ("
                "SELECT run_id FROM spine_audit WHERE kind = 'tool_call' AND at >= ?)))",
                (since, since, active_since),
            )

    async def close(self) -> None:
        await self.database.close()


class SQLiteAuditStore(DatabaseAuditStore):
    """The audit log in its own SQLite file (default ``SPINE_STATE_DIR/audit.db``).

    Every worker writing to it must share the file (one host); with workers on several hosts set
    ``SPINE_DATABASE_URL`` (or ``SPINE_AUDIT_DSN``) to a PostgreSQL database instead.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        try:
            database = SQLiteDatabase(Path(path), read_only=read_only)
        except FileNotFoundError:
            raise FileNotFoundError(f"no audit log at {str(path)!r}") from None
        super().__init__(database)
        self.path = database.path


class PostgresAuditStore(DatabaseAuditStore):
    """The audit log in PostgreSQL (14 or later), for workers on several hosts."""

    def __init__(
        self,
        dsn: str,
        *,
        read_only: bool = False,
        max_connections: int = 10,
        timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            PostgresDatabase(
                dsn, read_only=read_only, max_connections=max_connections, timeout_s=timeout_s
            )
        )
        self.dsn = dsn


redact_dsn = redact_url


# --- configuration and the activity ----------------------------------------------------------


def store_from_env(
    env: Mapping[str, str],
    state_dir: Path,
    *,
    read_only: bool = False,
    database: Database | None = None,
) -> AuditStore:
    """The audit store the environment names.

    ``SPINE_AUDIT_DSN`` first (``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``
    or a ``postgresql://`` / ``postgres://`` URL), an override for the audit log alone; else the
    shared database of ``SPINE_DATABASE_URL`` (`database`, when the caller has it open already);
    else SQLite at `state_dir/audit.db`. With `read_only`, nothing is created.

    Raises:
        ValueError: the DSN or URL has another scheme.
        FileNotFoundError: `read_only` and the SQLite file does not exist.
        ImportError: a PostgreSQL DSN, but psycopg is not installed.
    """
    dsn = (env.get("SPINE_AUDIT_DSN") or "").strip()
    if not dsn:
        if shared_database(env):
            if database is None:
                database = database_from_env(env, state_dir, read_only=read_only)
            return DatabaseAuditStore(database)
        return SQLiteAuditStore(Path(state_dir) / DEFAULT_AUDIT_DB, read_only=read_only)
    if dsn.startswith("sqlite:///"):
        return SQLiteAuditStore(Path(dsn.removeprefix("sqlite:///")), read_only=read_only)
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresAuditStore(dsn, read_only=read_only)
    raise ValueError(
        f"SPINE_AUDIT_DSN {redact_dsn(dsn)!r} is not supported; use sqlite:///PATH or "
        "postgresql://USER@HOST/DB"
    )


class AuditActivities:
    """The ``spine.audit_append`` activity over a store; workflows run it as a local activity."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store

    @activity.defn(name=ACTIVITY_AUDIT_APPEND)
    async def append(self, batch: AuditBatch) -> Appended:
        """Store a batch of audit entries idempotently; return where the chain now stands."""
        try:
            return await self.store.append(batch)
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow
