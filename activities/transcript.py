"""The transcript store: where the conversation lives so history carries only what is new.

Each model activity sends the messages added since the previous call plus the length and digest
of the prefix it expects; the store verifies the prefix, appends, and returns the whole
transcript. History bytes per step therefore stay flat however long the run gets.

The store is the deployment's shared-state database (:mod:`spine.store`): SQLite in
``SPINE_STATE_DIR`` on one host, or PostgreSQL (``SPINE_DATABASE_URL``) shared by workers on
many, so a run that continues as new on another host finds its transcript. The workflow keeps the
messages of its current run in memory and resends them in full if the store lost them
(:class:`TranscriptUnavailable`).
"""

from __future__ import annotations

from pathlib import Path

from spine.activities.errors import TranscriptUnavailable
from spine.payloads import EMPTY_DIGEST, ChatMessage, chain_digest
from spine.store import Database, Migration, SQLiteDatabase

MIGRATIONS = (
    Migration(
        "transcripts",
        1,
        sqlite="""
CREATE TABLE IF NOT EXISTS spine_transcript (
    transcript_id TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    message       TEXT    NOT NULL,
    digest        TEXT    NOT NULL,
    PRIMARY KEY (transcript_id, seq)
) WITHOUT ROWID;
""",
        postgresql="""
CREATE TABLE IF NOT EXISTS spine_transcript (
    transcript_id text   NOT NULL,
    seq           bigint NOT NULL,
    message       text   NOT NULL,
    digest        text   NOT NULL,
    PRIMARY KEY (transcript_id, seq)
);
""",
    ),
)

_UPSERT = (
    "INSERT INTO spine_transcript (transcript_id, seq, message, digest) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (transcript_id, seq) DO UPDATE SET message = excluded.message, "
    "digest = excluded.digest"
)


class TranscriptStore:
    """Transcripts by id (the workflow id), in a shared-state database (or a SQLite file)."""

    def __init__(self, database: Database | Path) -> None:
        self.database = (
            database if isinstance(database, Database) else SQLiteDatabase(Path(database))
        )

    async def _ready(self) -> None:
        await self.database.migrate(MIGRATIONS)

    async def extend(
        self,
        transcript_id: str,
        base_len: int,
        base_digest: str,
        new_messages: list[ChatMessage],
        *,
        load: bool = True,
    ) -> list[ChatMessage]:
        """Verify the stored prefix, store the new messages after it, return the transcript.

        With ``load=False`` only the prefix's last digest is checked (it chains every message
        before it) and only `new_messages` are returned: a constant cost per call however long
        the transcript is, for callers that do not need the whole conversation.

        Raises:
            TranscriptUnavailable: the store does not hold the prefix the workflow expects.
            StoreUnavailable: the database cannot be reached (retryable).
        """
        await self._ready()
        # One writer per transcript at a time (a retried attempt racing a slow one).
        async with self.database.transaction(lock=f"transcript:{transcript_id}") as tx:
            if load:
                rows = await tx.fetchall(
                    "SELECT message, digest FROM spine_transcript "
                    "WHERE transcript_id = ? AND seq < ? ORDER BY seq",
                    (transcript_id, base_len),
                )
                count = len(rows)
                stored_digest = str(rows[-1]["digest"]) if rows else EMPTY_DIGEST
            else:
                rows = []
                last = await tx.fetchone(
                    "SELECT seq, digest FROM spine_transcript "
                    "WHERE transcript_id = ? AND seq < ? ORDER BY seq DESC LIMIT 1",
                    (transcript_id, base_len),
                )
                count = int(last["seq"]) + 1 if last else 0
                stored_digest = str(last["digest"]) if last else EMPTY_DIGEST
            if count != base_len or stored_digest != base_digest:
                raise TranscriptUnavailable(
                    f"transcript {transcript_id!r}: store has {count} messages "
                    f"(digest {stored_digest[:12]}), workflow expects {base_len} "
                    f"(digest {base_digest[:12]})"
                )
            messages = [ChatMessage.model_validate_json(r["message"]) for r in rows]
            digest = base_digest
            # A retried activity writes the same rows again: the upsert keeps it idempotent,
            # and the workflow (the source of truth) decides what follows the verified prefix.
            values = []
            for offset, message in enumerate(new_messages):
                digest = chain_digest(digest, message)
                values.append((transcript_id, base_len + offset, message.model_dump_json(), digest))
            await tx.executemany(_UPSERT, values)
        return messages + new_messages

    async def copy(self, source_id: str, target_id: str, length: int) -> None:
        """Copy the first `length` messages to a new transcript."""
        await self._ready()
        async with self.database.transaction(lock=f"transcript:{target_id}") as tx:
            await tx.execute(
                "INSERT INTO spine_transcript (transcript_id, seq, message, digest) "
                "SELECT ?, seq, message, digest FROM spine_transcript "
                "WHERE transcript_id = ? AND seq < ? "
                "ON CONFLICT (transcript_id, seq) DO UPDATE SET message = excluded.message, "
                "digest = excluded.digest",
                (target_id, source_id, length),
            )

    async def close(self) -> None:
        await self.database.close()
