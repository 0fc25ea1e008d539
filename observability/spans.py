"""Spans in the shared-state database, so `spine trace` sees every worker's spans.

With ``SPINE_DATABASE_URL`` set (and neither an OTLP endpoint nor ``SPINE_TRACE_FILE``), workers
export their finished spans here instead of to a local ``traces.jsonl``: a run that moved between
hosts has its whole trace in one place, and ``spine trace RUN`` reads it from the same setting.
Each span is stored as the record the trace file would hold
(:func:`spine.observability.telemetry.span_record`), with its run id (the ``spine.run.id``
attribute) pulled out for lookup.

The exporter is called from OpenTelemetry's batch thread, so it runs the database's coroutines
on a small event loop of its own in a thread of its own, with a database object of its own: it
never waits on (or blocks) the worker's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from spine.store import Database, Migration, StoreUnavailable

log = logging.getLogger("spine.telemetry")

RUN_ATTRIBUTES = ("spine.run.id", "gen_ai.conversation.id")

MIGRATIONS = (
    Migration(
        "spans",
        1,
        sqlite="""
CREATE TABLE IF NOT EXISTS spine_span (
    span_id  TEXT    NOT NULL,
    trace_id TEXT    NOT NULL,
    run_id   TEXT,
    start_ns INTEGER NOT NULL,
    record   TEXT    NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spine_span_run ON spine_span (run_id);
""",
        postgresql="""
CREATE TABLE IF NOT EXISTS spine_span (
    span_id  text   NOT NULL,
    trace_id text   NOT NULL,
    run_id   text,
    start_ns bigint NOT NULL,
    record   text   NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS spine_span_run ON spine_span (run_id);
""",
    ),
)


def _run_of(record: Mapping[str, object]) -> str | None:
    attributes = record.get("attributes")
    if isinstance(attributes, Mapping):
        for key in RUN_ATTRIBUTES:
            value = attributes.get(key)
            if isinstance(value, str) and value:
                return value
    return None


class SpanStore:
    """Span records (the trace file's JSON objects) in a shared-state database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def add(self, records: Sequence[Mapping[str, object]]) -> None:
        """Store span records; a span stored twice (an export retried) is kept once."""
        rows = [
            (
                str(r["span_id"]),
                str(r["trace_id"]),
                _run_of(r),
                int(r.get("start_ns") or 0),  # type: ignore[call-overload]  # int from the SDK
                json.dumps(r, separators=(",", ":"), default=str),
            )
            for r in records
            if r.get("span_id") and r.get("trace_id")
        ]
        if not rows:
            return
        await self.database.migrate(MIGRATIONS)
        async with self.database.transaction() as tx:
            await tx.executemany(
                "INSERT INTO spine_span (span_id, trace_id, run_id, start_ns, record) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (trace_id, span_id) DO NOTHING",
                rows,
            )

    async def for_run(self, run: str) -> list[dict[str, object]]:
        """Every span of every trace that has a span of `run`, in start order."""
        async with self.database.reading() as tx:
            rows = await tx.fetchall(
                "SELECT record FROM spine_span WHERE trace_id IN "
                "(SELECT trace_id FROM spine_span WHERE run_id = ?) ORDER BY start_ns, span_id",
                (run,),
            )
        spans = []
        for row in rows:
            try:
                record = json.loads(row["record"])
            except ValueError:
                continue
            if isinstance(record, dict):
                record.setdefault("attributes", {})
                spans.append(record)
        return spans

    async def count(self) -> int:
        async with self.database.reading() as tx:
            row = await tx.fetchone("SELECT count(*) AS n FROM spine_span")
        return int(row["n"]) if row else 0


class DatabaseSpanExporter(SpanExporter):
    """An OpenTelemetry span exporter writing to a :class:`SpanStore` (see the module doc).

    `open_database` is called once, on the exporter's own event loop, to make its database.
    """

    def __init__(self, open_database: Callable[[], Database], *, timeout_s: float = 10.0) -> None:
        self._open = open_database
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spine-span-store", daemon=True
        )
        self._thread.start()
        self._store: SpanStore | None = None
        self._closed = False

    async def _add(self, records: list[dict[str, object]]) -> None:
        if self._store is None:
            self._store = SpanStore(self._open())
        await self._store.add(records)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from spine.observability.telemetry import span_record  # it imports this module

        if self._closed:
            return SpanExportResult.FAILURE
        records = [span_record(s) for s in spans]
        future = asyncio.run_coroutine_threadsafe(self._add(records), self._loop)
        try:
            future.result(self.timeout_s)
        except (StoreUnavailable, TimeoutError) as err:
            log.warning("cannot store %d spans: %s", len(records), err)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def close() -> None:
            if self._store is not None:
                await self._store.database.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(self.timeout_s)
        except Exception as err:  # noqa: BLE001  # shutting down: say so, do not raise
            log.warning("span store did not close cleanly: %s", err)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
