"""The summaries store: a small SQLite table the notes agent writes to.

Idempotent by construction: the idempotency key is a UNIQUE column, so a retried save returns
the row the first attempt wrote instead of writing another.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (
    summary_id TEXT PRIMARY KEY,
    note_id TEXT NOT NULL,
    summary TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    deleted INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
)
"""


class SummaryStore:
    """Summaries in one SQLite file. Blocking: call it through ``asyncio.to_thread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def save(self, note_id: str, summary: str, idempotency_key: str) -> str:
        """Store a summary once per key; returns its id (the first one on a retry)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR IGNORE INTO summaries (summary_id, note_id, summary, idempotency_key) "
                "VALUES (?, ?, ?, ?)",
                (f"s-{uuid.uuid4().hex[:12]}", note_id, summary, idempotency_key),
            )
            row = db.execute(
                "SELECT summary_id FROM summaries WHERE idempotency_key = ?", (idempotency_key,)
            ).fetchone()
        return str(row["summary_id"])

    def delete(self, summary_id: str) -> bool:
        """Mark a summary deleted; True if it exists (deleting twice is fine)."""
        with closing(self._connect()) as db, db:
            cursor = db.execute(
                "UPDATE summaries SET deleted = 1 WHERE summary_id = ?", (summary_id,)
            )
        return cursor.rowcount == 1

    def list(self, *, include_deleted: bool = False) -> list[dict[str, object]]:
        """Every summary, oldest first."""
        where = "" if include_deleted else "WHERE deleted = 0"
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM summaries {where} ORDER BY created_at, rowid")
            return [dict(r) for r in rows]
