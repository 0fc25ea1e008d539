"""The transcript store: where the conversation lives so history carries only what is new.

Each model activity sends the messages added since the previous call plus the length and digest
of the prefix it expects; the store verifies the prefix, appends, and returns the whole
transcript. History bytes per step therefore stay flat however long the run gets.

The default store is SQLite in ``SPINE_STATE_DIR``; all workers of a deployment must share it
(one host, or a shared volume). The workflow keeps the messages of its current run in memory and
resends them in full if the store lost them (:class:`TranscriptUnavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from spine.activities.errors import TranscriptUnavailable
from spine.payloads import EMPTY_DIGEST, ChatMessage, chain_digest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transcript (
    transcript_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (transcript_id, seq)
)
"""


class TranscriptStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection for the worker's life: closing the last connection to a WAL database
        # checkpoints it, which would cost milliseconds on every model call.
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """The shared connection, one thread at a time, inside a transaction."""
        with self._lock, self._db:
            yield self._db

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
        """
        return await asyncio.to_thread(
            self._extend, transcript_id, base_len, base_digest, new_messages, load
        )

    def _extend(
        self,
        transcript_id: str,
        base_len: int,
        base_digest: str,
        new_messages: list[ChatMessage],
        load: bool = True,
    ) -> list[ChatMessage]:
        with self._connect() as db:
            if load:
                rows = db.execute(
                    "SELECT message, digest FROM transcript WHERE transcript_id = ? AND seq < ? "
                    "ORDER BY seq",
                    (transcript_id, base_len),
                ).fetchall()
                count = len(rows)
                stored_digest = rows[-1][1] if rows else EMPTY_DIGEST
            else:
                rows = []
                last = db.execute(
                    "SELECT seq + 1, digest FROM transcript WHERE transcript_id = ? AND seq < ? "
                    "ORDER BY seq DESC LIMIT 1",
                    (transcript_id, base_len),
                ).fetchone()
                count, stored_digest = last if last else (0, EMPTY_DIGEST)
            if count != base_len or stored_digest != base_digest:
                raise TranscriptUnavailable(
                    f"transcript {transcript_id!r}: store has {count} messages "
                    f"(digest {stored_digest[:12]}), workflow expects {base_len} "
                    f"(digest {base_digest[:12]})"
                )
            messages = [ChatMessage.model_validate_json(m) for m, _ in rows]
            digest = base_digest
            # A retried activity writes the same rows again: replace keeps it idempotent, and
            # the workflow (the source of truth) decides what follows the verified prefix.
            for offset, message in enumerate(new_messages):
                digest = chain_digest(digest, message)
                db.execute(
                    "INSERT OR REPLACE INTO transcript VALUES (?, ?, ?, ?)",
                    (transcript_id, base_len + offset, message.model_dump_json(), digest),
                )
            return messages + new_messages

    async def copy(self, source_id: str, target_id: str, length: int) -> None:
        """Copy the first `length` messages to a new transcript (used when forking a run)."""
        await asyncio.to_thread(self._copy, source_id, target_id, length)

    def _copy(self, source_id: str, target_id: str, length: int) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO transcript SELECT ?, seq, message, digest FROM transcript "
                "WHERE transcript_id = ? AND seq < ?",
                (target_id, source_id, length),
            )
