"""Large tool outputs by reference (claim check), and every untrusted output of a run.

A tool output whose JSON is larger than the worker's inline limit (``SPINE_INLINE_OUTPUT_BYTES``,
8 KiB by default) is not put into history. The tool activity stores it in the shared-state
database (:mod:`spine.store`) and returns a *reference* in its place::

    {"$spine_output": "sha256:<hex of its JSON>", "bytes": 5242880, "tool": "fetch_document"}

The workflow handles the reference like any output (the tool message the model will read, a
side effect's record, the audit digest), so history holds the reference and its digest, never the
content. The model activity dereferences it when it builds the provider request, so the model
reads the whole output. Blobs are content-addressed: storing the same output twice stores it
once.

**Who may read what.** Each stored output is indexed by the run that produced it (the workflow
id, stable across continue-as-new). The model activity only dereferences references indexed for
its own run: a tool (or a model) that writes a reference to another run's output into its own
text gets that text back unchanged, never the other run's content. A fork is given the index rows
of the run it was forked from (:meth:`BlobStore.share`).

**Untrusted outputs.** Every output of an ``untrusted_output`` tool is indexed too, inline or not,
marked untrusted, so everything outside content said to a run can be read back from the store
(:meth:`BlobStore.run_outputs`) — the whole run's context, not only what the workflow keeps in
memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from spine.activities.errors import TerminalError
from spine.contract import JsonObject
from spine.store import Database, Migration

#: The key that marks a tool output as a reference to a stored one.
REF_KEY = "$spine_output"
#: Outputs above this many bytes of JSON go by reference (``SPINE_INLINE_OUTPUT_BYTES``).
DEFAULT_INLINE_BYTES = 8 * 1024
#: The largest output a tool may return, by reference (``SPINE_MAX_OUTPUT_BYTES``).
DEFAULT_MAX_OUTPUT_BYTES = 32 * 1024 * 1024

MIGRATIONS = (
    Migration(
        "blobs",
        1,
        sqlite="""
CREATE TABLE IF NOT EXISTS spine_blob (
    digest     TEXT    NOT NULL PRIMARY KEY,
    size       INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    created_at TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS spine_run_output (
    run_id     TEXT    NOT NULL,
    call_key   TEXT    NOT NULL,
    tool       TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    untrusted  INTEGER NOT NULL,
    inline     INTEGER NOT NULL,
    created_at TEXT    NOT NULL,
    PRIMARY KEY (run_id, call_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spine_run_output_digest ON spine_run_output (run_id, digest);
""",
        postgresql="""
CREATE TABLE IF NOT EXISTS spine_blob (
    digest     text   NOT NULL PRIMARY KEY,
    size       bigint NOT NULL,
    data       bytea  NOT NULL,
    created_at text   NOT NULL
);
CREATE TABLE IF NOT EXISTS spine_run_output (
    run_id     text    NOT NULL,
    call_key   text    NOT NULL,
    tool       text    NOT NULL,
    digest     text    NOT NULL,
    size       bigint  NOT NULL,
    untrusted  integer NOT NULL,
    inline     integer NOT NULL,
    created_at text    NOT NULL,
    PRIMARY KEY (run_id, call_key)
);
CREATE INDEX IF NOT EXISTS spine_run_output_digest ON spine_run_output (run_id, digest);
""",
    ),
)


class OutputUnavailable(TerminalError):
    """A referenced output is indexed for the run but its content is not in the store."""


@dataclass(frozen=True)
class RunOutput:
    """One output a run was given, read back from the store."""

    call_key: str
    tool: str
    digest: str
    size: int
    untrusted: bool
    inline: bool
    created_at: str
    content: JsonObject


def encode(output: Mapping[str, object]) -> bytes:
    """The output as stored and hashed: compact JSON, keys sorted, UTF-8."""
    return json.dumps(output, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def reference(digest: str, size: int, tool: str) -> JsonObject:
    """What history holds in place of a stored output."""
    return {REF_KEY: digest, "bytes": size, "tool": tool}


def ref_digest(value: object) -> str | None:
    """The digest if `value` (an output, or a tool message's JSON text) is a reference."""
    if isinstance(value, str):
        if REF_KEY not in value:
            return None
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, Mapping):
        found = value.get(REF_KEY)
        if isinstance(found, str) and found.startswith("sha256:") and set(value) <= _REF_FIELDS:
            return found
    return None


_REF_FIELDS = frozenset({REF_KEY, "bytes", "tool"})


def _now() -> str:
    return datetime.now(UTC).isoformat()


class BlobStore:
    """Stored outputs and each run's index of them, in a shared-state database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def _ready(self) -> None:
        if not self.database.read_only:
            await self.database.migrate(MIGRATIONS)

    async def put_output(
        self,
        run_id: str,
        call_key: str,
        tool: str,
        output: Mapping[str, object],
        *,
        untrusted: bool,
        inline: bool,
        data: bytes | None = None,
    ) -> str:
        """Store `output` (once per content) and index it for `run_id`; return its digest.

        Idempotent: a retried attempt with the same content changes nothing; a retry that got
        different content (an outside source changed) re-points the run's index entry.
        """
        await self._ready()
        data = encode(output) if data is None else data
        digest = digest_of(data)
        now = _now()
        async with self.database.transaction(lock=f"outputs:{run_id}") as tx:
            await tx.execute(
                "INSERT INTO spine_blob (digest, size, data, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (digest) DO NOTHING",
                (digest, len(data), data, now),
            )
            await tx.execute(
                "INSERT INTO spine_run_output "
                "(run_id, call_key, tool, digest, size, untrusted, inline, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, call_key) DO UPDATE SET "
                "digest = excluded.digest, size = excluded.size, tool = excluded.tool",
                (run_id, call_key, tool, digest, len(data), int(untrusted), int(inline), now),
            )
        return digest

    async def resolve(self, run_id: str, digests: Iterable[str]) -> dict[str, JsonObject]:
        """The outputs behind `digests` that are indexed for `run_id` (others are left out).

        Raises:
            OutputUnavailable: a digest is indexed for the run but its content is gone.
        """
        wanted = sorted(set(digests))
        if not wanted:
            return {}
        await self._ready()
        marks = ", ".join("?" * len(wanted))
        async with self.database.reading() as tx:
            rows = await tx.fetchall(
                f"SELECT DISTINCT o.digest AS digest, b.data AS data FROM spine_run_output o "
                f"LEFT JOIN spine_blob b ON b.digest = o.digest "
                f"WHERE o.run_id = ? AND o.digest IN ({marks})",
                (run_id, *wanted),
            )
        found: dict[str, JsonObject] = {}
        for row in rows:
            if row["data"] is None:
                raise OutputUnavailable(
                    f"output {row['digest']} of run {run_id!r} is indexed but not stored"
                )
            found[str(row["digest"])] = json.loads(bytes(row["data"]))
        return found

    async def run_outputs(self, run_id: str, *, untrusted_only: bool = False) -> list[RunOutput]:
        """Every output indexed for `run_id` (or only the untrusted ones), oldest first."""
        await self._ready()
        where = "o.run_id = ?" + (" AND o.untrusted = 1" if untrusted_only else "")
        async with self.database.reading() as tx:
            rows = await tx.fetchall(
                "SELECT o.call_key AS call_key, o.tool AS tool, o.digest AS digest, "
                "o.size AS size, o.untrusted AS untrusted, o.inline AS inline, "
                "o.created_at AS created_at, b.data AS data FROM spine_run_output o "
                f"JOIN spine_blob b ON b.digest = o.digest WHERE {where} "
                "ORDER BY o.created_at, o.call_key",
                (run_id,),
            )
        return [
            RunOutput(
                call_key=str(r["call_key"]),
                tool=str(r["tool"]),
                digest=str(r["digest"]),
                size=int(r["size"]),
                untrusted=bool(r["untrusted"]),
                inline=bool(r["inline"]),
                created_at=str(r["created_at"]),
                content=json.loads(bytes(r["data"])),
            )
            for r in rows
        ]

    async def share(self, source_run: str, target_run: str, digests: Sequence[str]) -> int:
        """Index `source_run`'s outputs with `digests` for `target_run` too (a fork reads what
        its original was given); return how many were shared."""
        wanted = sorted(set(digests))
        if not wanted:
            return 0
        await self._ready()
        marks = ", ".join("?" * len(wanted))
        async with self.database.transaction(lock=f"outputs:{target_run}") as tx:
            return await tx.execute(
                "INSERT INTO spine_run_output "
                "(run_id, call_key, tool, digest, size, untrusted, inline, created_at) "
                "SELECT ?, call_key, tool, digest, size, untrusted, inline, created_at "
                f"FROM spine_run_output WHERE run_id = ? AND digest IN ({marks}) "
                "ON CONFLICT (run_id, call_key) DO NOTHING",
                (target_run, source_run, *wanted),
            )
