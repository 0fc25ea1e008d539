"""The demo's business service: orders, refunds, emails and tickets over HTTP, kept in SQLite.

Every request but ``GET /healthz`` needs ``Authorization: Bearer <key>``. Every ``POST`` that
changes something needs an ``Idempotency-Key`` header: the first request with a key commits its
side effect and its response in one SQLite transaction; a retry with the same key and body gets
that response back (``Idempotent-Replayed: true``) and writes nothing; the same key with another
body is refused with 422. ``POST /v1/chaos`` makes the service fail the way real ones do, including
the nasty case of committing and then answering 503.

Endpoints::

    GET  /healthz                          no auth
    GET  /v1/orders/{order_id}             order with `refunded` and `refundable`
    POST /v1/refunds                       {"order_id", "amount", "reason"}
    POST /v1/refunds/{refund_id}/reverse   saga compensation of a refund
    POST /v1/emails                        {"order_id", "to", "subject", "body"}
    POST /v1/tickets                       {"order_id", "status", "note"}
    POST /v1/inspections                   {"order_id", "finding", "claim_amount"}
    POST /v1/inspections/{id}/withdraw     saga compensation of an inspection report
    GET  /v1/refunds | /v1/reversals | /v1/emails | /v1/tickets | /v1/inspections [?order_id=]
    GET  /v1/chaos, POST /v1/chaos         {"fail_rate", "latency_ms", "timeout_rate",
                                            "fail_after_commit_rate",
                                            "commit_then_timeout_rate", "seed"}
    POST /v1/reset                         delete every refund, email, ticket; chaos off

    A legacy API, the way old payment systems are: no idempotency keys (an ``Idempotency-Key``
    header is ignored: every POST writes a new row), only a client ``reference`` field::

    POST /v1/legacy/credits                {"order_id", "amount", "reference"}: store credit
    POST /v1/legacy/credits/{id}/void      void a credit (voiding twice is a no-op)
    GET  /v1/legacy/credits                [?reference=] [?order_id=]

``commit_then_timeout_rate`` is the ambiguous failure: the write commits, then the answer hangs
for ``HANG_SECONDS`` (the caller times out without knowing it happened).
"""

import asyncio
import hashlib
import hmac
import json
import os
import random
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

API_KEY_ENV = "SPINE_DEMO_API_KEY"
DB_ENV = "SPINE_DEMO_DB"
DEFAULT_DB = Path(__file__).resolve().parent.parent / "temporal-dev" / ".data" / "demo-service.db"

FIRST_ORDER, LAST_ORDER = 1001, 1500
ORDER_TOTAL_CENTS = 25_000
CURRENCY = "USD"
#: How long a request picked by `timeout_rate` hangs before it is served.
HANG_SECONDS = 30.0

Json = dict[str, object]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id       TEXT PRIMARY KEY,
    total_cents    INTEGER NOT NULL,
    currency       TEXT NOT NULL,
    customer_email TEXT NOT NULL,
    created_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds (
    refund_id       TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    amount_cents    INTEGER NOT NULL CHECK (amount_cents > 0),
    reason          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL,
    reversed        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reversals (
    reversal_id     TEXT PRIMARY KEY,
    refund_id       TEXT NOT NULL UNIQUE REFERENCES refunds (refund_id),
    order_id        TEXT NOT NULL,
    amount_cents    INTEGER NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS emails (
    email_id        TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    recipient       TEXT NOT NULL,
    subject         TEXT NOT NULL,
    body            TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    update_id       TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    status          TEXT NOT NULL,
    note            TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    document_id     TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    text            TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inspections (
    inspection_id   TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    finding         TEXT NOT NULL,
    claim_cents     INTEGER NOT NULL CHECK (claim_cents >= 0),
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      TEXT NOT NULL,
    withdrawn       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS legacy_credits (
    credit_id       TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL REFERENCES orders (order_id),
    amount_cents    INTEGER NOT NULL CHECK (amount_cents > 0),
    reference       TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    voided          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS legacy_credits_reference ON legacy_credits (reference);
CREATE TABLE IF NOT EXISTS idempotency (
    endpoint        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    status_code     INTEGER NOT NULL,
    response        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (endpoint, idempotency_key)
);
"""


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class RefundIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(gt=0, le=1_000_000)
    reason: str = Field(default="", max_length=2000)

    @field_validator("amount")
    @classmethod
    def _whole_cents(cls, amount: Decimal) -> Decimal:
        return _whole_cents(amount)


def _whole_cents(amount: Decimal) -> Decimal:
    # Tolerate float noise such as 12.300000000000001, refuse real fractions of a cent.
    cents = amount * 100
    if abs(cents - cents.to_integral_value()) > Decimal("0.000001"):
        raise ValueError(f"amount {amount} is not a whole number of cents")
    return (cents.to_integral_value() / 100).quantize(Decimal("0.01"))


class EmailIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=64)
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)
    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(max_length=20_000)


class DocumentIn(BaseModel):
    """A customer document (message, attachment text): content the agent must not trust."""

    order_id: str
    text: str = Field(min_length=1, max_length=20_000)


class TicketIn(BaseModel):
    order_id: str = Field(min_length=1, max_length=64)
    status: str = Field(min_length=1, max_length=64)
    note: str = Field(default="", max_length=5000)


class InspectionIn(BaseModel):
    """A damage inspection report, with what the carrier should be claimed for."""

    order_id: str = Field(min_length=1, max_length=64)
    finding: str = Field(min_length=1, max_length=2000)
    claim_amount: Decimal = Field(ge=0, le=1_000_000)

    @field_validator("claim_amount")
    @classmethod
    def _whole_cents(cls, amount: Decimal) -> Decimal:
        return _whole_cents(amount)


class CreditIn(BaseModel):
    """A legacy store credit: no idempotency key, only the caller's free-form reference."""

    order_id: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(gt=0, le=1_000_000)
    reference: str = Field(min_length=1, max_length=255)

    @field_validator("amount")
    @classmethod
    def _whole_cents(cls, amount: Decimal) -> Decimal:
        return _whole_cents(amount)


class ChaosIn(BaseModel):
    """The chaos setting; fields left out are off."""

    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: int = Field(default=0, ge=0, le=60_000)
    timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    fail_after_commit_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    commit_then_timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None


@dataclass
class Outcome:
    """A response as stored for replay: status and the exact JSON text."""

    status: int
    text: str
    replayed: bool = False

    def response(self) -> Response:
        headers = {"Idempotent-Replayed": "true"} if self.replayed else None
        return Response(self.text, self.status, headers, media_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _money(cents: int) -> float:
    return cents / 100


def _cents(amount: Decimal) -> int:
    return int(amount * 100)


def _fingerprint(payload: Json) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Store:
    """The service's SQLite database; one short-lived connection per call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit, so BEGIN IMMEDIATE really locks.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def init(self) -> None:
        """Create the schema and seed orders o-1001..o-1500 (idempotent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            now = _now()
            with self.transaction() as tx:
                tx.executemany(
                    "INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?)",
                    [
                        (f"o-{n}", ORDER_TOTAL_CENTS, CURRENCY, f"customer+o-{n}@example.com", now)
                        for n in range(FIRST_ORDER, LAST_ORDER + 1)
                    ],
                )
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds SQLite's write lock from its first statement."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def idempotent(
        self,
        endpoint: str,
        key: str,
        request: Json,
        action: Callable[[sqlite3.Connection], tuple[int, Json]],
    ) -> Outcome:
        """Run `action` once per (`endpoint`, `key`); later calls replay its stored response.

        The lookup, the side effect and the stored response share one transaction, so
        concurrent requests with one key create one row. Refusals (ApiError) are not stored:
        a retry re-evaluates them.
        """
        fingerprint = _fingerprint(request)
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT fingerprint, status_code, response FROM idempotency"
                " WHERE endpoint = ? AND idempotency_key = ?",
                (endpoint, key),
            ).fetchone()
            if row is not None:
                if row["fingerprint"] != fingerprint:
                    raise ApiError(
                        422,
                        f"Idempotency-Key {key!r} was already used for a different {endpoint}"
                        " request; use a new key for a new operation",
                    )
                return Outcome(row["status_code"], row["response"], replayed=True)
            status, body = action(conn)
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
            conn.execute(
                "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
                (endpoint, key, fingerprint, status, text, _now()),
            )
            return Outcome(status, text)

    # -- orders --------------------------------------------------------------------------

    @staticmethod
    def _order_row(conn: sqlite3.Connection, order_id: str) -> tuple[sqlite3.Row, int]:
        """The order's row and its refunded cents (reversed refunds excluded); 404 if unknown."""
        row = conn.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        if row is None:
            raise ApiError(
                404, f"order {order_id!r} not found; orders are o-{FIRST_ORDER}..o-{LAST_ORDER}"
            )
        refunded = conn.execute(
            "SELECT COALESCE(SUM(amount_cents), 0) FROM refunds"
            " WHERE order_id = ? AND reversed = 0",
            (order_id,),
        ).fetchone()[0]
        return row, refunded

    def order(self, order_id: str) -> Json:
        """The order with its `refunded` and `refundable` amounts."""
        conn = self._connect()
        try:
            row, refunded = self._order_row(conn, order_id)
        finally:
            conn.close()
        total = row["total_cents"]
        return {
            "order_id": row["order_id"],
            "customer_email": row["customer_email"],
            "total": _money(total),
            "currency": row["currency"],
            "refunded": _money(refunded),
            "refundable": _money(total - refunded),
            "created_at": row["created_at"],
        }

    def ping(self) -> None:
        """Fail unless the database answers."""
        conn = self._connect()
        try:
            conn.execute("SELECT 1 FROM orders LIMIT 1").fetchone()
        finally:
            conn.close()

    # -- side effects, each called inside `idempotent` -----------------------------------

    @staticmethod
    def _refund_json(row: sqlite3.Row) -> Json:
        return {
            "refund_id": row["refund_id"],
            "order_id": row["order_id"],
            "amount": _money(row["amount_cents"]),
            "currency": CURRENCY,
            "reason": row["reason"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
            "reversed": bool(row["reversed"]),
        }

    def create_refund(self, conn: sqlite3.Connection, body: RefundIn, key: str) -> tuple[int, Json]:
        order, refunded = self._order_row(conn, body.order_id)
        cents = _cents(body.amount)
        remaining = order["total_cents"] - refunded
        if cents > remaining:
            raise ApiError(
                422,
                f"refund amount {cents / 100:.2f} exceeds the remaining refundable amount"
                f" {remaining / 100:.2f} for order {body.order_id!r}"
                f" (total {order['total_cents'] / 100:.2f}, already refunded {refunded / 100:.2f})",
            )
        refund_id = _new_id("rf")
        conn.execute(
            "INSERT INTO refunds (refund_id, order_id, amount_cents, reason, idempotency_key,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (refund_id, body.order_id, cents, body.reason, key, _now()),
        )
        row = conn.execute("SELECT * FROM refunds WHERE refund_id = ?", (refund_id,)).fetchone()
        return 201, self._refund_json(row)

    @staticmethod
    def _reversal_json(row: sqlite3.Row) -> Json:
        return {
            "reversal_id": row["reversal_id"],
            "refund_id": row["refund_id"],
            "order_id": row["order_id"],
            "amount": _money(row["amount_cents"]),
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
        }

    def reverse_refund(
        self, conn: sqlite3.Connection, refund_id: str, key: str
    ) -> tuple[int, Json]:
        """Reverse a refund; reversing an already reversed one returns the first reversal."""
        refund = conn.execute("SELECT * FROM refunds WHERE refund_id = ?", (refund_id,)).fetchone()
        if refund is None:
            raise ApiError(404, f"refund {refund_id!r} not found")
        existing = conn.execute(
            "SELECT * FROM reversals WHERE refund_id = ?", (refund_id,)
        ).fetchone()
        if existing is not None:
            return 200, self._reversal_json(existing)
        reversal_id = _new_id("rv")
        conn.execute(
            "INSERT INTO reversals VALUES (?, ?, ?, ?, ?, ?)",
            (reversal_id, refund_id, refund["order_id"], refund["amount_cents"], key, _now()),
        )
        conn.execute("UPDATE refunds SET reversed = 1 WHERE refund_id = ?", (refund_id,))
        row = conn.execute(
            "SELECT * FROM reversals WHERE reversal_id = ?", (reversal_id,)
        ).fetchone()
        return 201, self._reversal_json(row)

    @staticmethod
    def _email_json(row: sqlite3.Row) -> Json:
        return {
            "email_id": row["email_id"],
            "order_id": row["order_id"],
            "to": row["recipient"],
            "subject": row["subject"],
            "body": row["body"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
        }

    def send_email(self, conn: sqlite3.Connection, body: EmailIn, key: str) -> tuple[int, Json]:
        self._order_row(conn, body.order_id)
        email_id = _new_id("em")
        conn.execute(
            "INSERT INTO emails VALUES (?, ?, ?, ?, ?, ?, ?)",
            (email_id, body.order_id, body.to, body.subject, body.body, key, _now()),
        )
        row = conn.execute("SELECT * FROM emails WHERE email_id = ?", (email_id,)).fetchone()
        return 201, self._email_json(row)

    @staticmethod
    def _ticket_json(row: sqlite3.Row) -> Json:
        return {
            "update_id": row["update_id"],
            "ticket_id": f"T-{row['order_id']}",
            "order_id": row["order_id"],
            "status": row["status"],
            "note": row["note"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
        }

    def update_ticket(self, conn: sqlite3.Connection, body: TicketIn, key: str) -> tuple[int, Json]:
        self._order_row(conn, body.order_id)
        update_id = _new_id("tk")
        conn.execute(
            "INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?)",
            (update_id, body.order_id, body.status, body.note, key, _now()),
        )
        row = conn.execute("SELECT * FROM tickets WHERE update_id = ?", (update_id,)).fetchone()
        return 201, self._ticket_json(row)

    # -- inspections ------------------------------------------------------------------------

    @staticmethod
    def _inspection_json(row: sqlite3.Row) -> Json:
        return {
            "inspection_id": row["inspection_id"],
            "order_id": row["order_id"],
            "finding": row["finding"],
            "claim_amount": _money(row["claim_cents"]),
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
            "withdrawn": bool(row["withdrawn"]),
        }

    def file_inspection(
        self, conn: sqlite3.Connection, body: InspectionIn, key: str
    ) -> tuple[int, Json]:
        self._order_row(conn, body.order_id)
        inspection_id = _new_id("in")
        conn.execute(
            "INSERT INTO inspections (inspection_id, order_id, finding, claim_cents,"
            " idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (inspection_id, body.order_id, body.finding, _cents(body.claim_amount), key, _now()),
        )
        row = conn.execute(
            "SELECT * FROM inspections WHERE inspection_id = ?", (inspection_id,)
        ).fetchone()
        return 201, self._inspection_json(row)

    def withdraw_inspection(self, conn: sqlite3.Connection, inspection_id: str) -> tuple[int, Json]:
        conn.execute(
            "UPDATE inspections SET withdrawn = 1 WHERE inspection_id = ?", (inspection_id,)
        )
        row = conn.execute(
            "SELECT * FROM inspections WHERE inspection_id = ?", (inspection_id,)
        ).fetchone()
        if row is None:
            raise ApiError(404, f"inspection {inspection_id!r} not found")
        return 200, self._inspection_json(row)

    # -- the legacy API: no idempotency keys ---------------------------------------------

    @staticmethod
    def _credit_json(row: sqlite3.Row) -> Json:
        return {
            "credit_id": row["credit_id"],
            "order_id": row["order_id"],
            "amount": _money(row["amount_cents"]),
            "reference": row["reference"],
            "created_at": row["created_at"],
            "voided": bool(row["voided"]),
        }

    def create_credit(self, body: CreditIn) -> Json:
        """A new credit row, every time: the legacy API cannot tell a retry from a new call."""
        credit_id = _new_id("cr")
        with self.transaction() as conn:
            self._order_row(conn, body.order_id)
            conn.execute(
                "INSERT INTO legacy_credits (credit_id, order_id, amount_cents, reference,"
                " created_at) VALUES (?, ?, ?, ?, ?)",
                (credit_id, body.order_id, _cents(body.amount), body.reference, _now()),
            )
            row = conn.execute(
                "SELECT * FROM legacy_credits WHERE credit_id = ?", (credit_id,)
            ).fetchone()
        return self._credit_json(row)

    def void_credit(self, credit_id: str) -> Json:
        with self.transaction() as conn:
            conn.execute("UPDATE legacy_credits SET voided = 1 WHERE credit_id = ?", (credit_id,))
            row = conn.execute(
                "SELECT * FROM legacy_credits WHERE credit_id = ?", (credit_id,)
            ).fetchone()
        if row is None:
            raise ApiError(404, f"credit {credit_id!r} not found")
        return self._credit_json(row)

    def credits(self, reference: str | None, order_id: str | None) -> list[Json]:
        where, args = [], []
        if reference is not None:
            where.append("reference = ?")
            args.append(reference)
        if order_id is not None:
            where.append("order_id = ?")
            args.append(order_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        conn = self._connect()
        try:
            rows = conn.execute(
                f"SELECT * FROM legacy_credits {clause} ORDER BY created_at, rowid", args
            ).fetchall()
        finally:
            conn.close()
        return [self._credit_json(row) for row in rows]

    def add_document(self, body: DocumentIn) -> Json:
        document_id = _new_id("doc")
        with self.transaction() as conn:
            self._order_row(conn, body.order_id)
            conn.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?)",
                (document_id, body.order_id, body.text, _now()),
            )
        return {"document_id": document_id, "order_id": body.order_id, "text": body.text}

    def document(self, document_id: str) -> Json:
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT * FROM documents WHERE document_id = ?", (document_id,)
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            raise ApiError(404, f"unknown document {document_id!r}")
        return {"document_id": row["document_id"], "order_id": row["order_id"], "text": row["text"]}

    # -- listings ------------------------------------------------------------------------

    def listing(self, table: str, order_id: str | None) -> list[Json]:
        """Every row of `table` (oldest first), optionally for one order."""
        to_json = {
            "refunds": self._refund_json,
            "reversals": self._reversal_json,
            "emails": self._email_json,
            "tickets": self._ticket_json,
            "inspections": self._inspection_json,
        }[table]
        where, args = ("WHERE order_id = ?", (order_id,)) if order_id else ("", ())
        conn = self._connect()
        try:
            rows = conn.execute(
                f"SELECT * FROM {table} {where} ORDER BY created_at, rowid", args
            ).fetchall()
        finally:
            conn.close()
        return [to_json(row) for row in rows]

    def reset(self) -> None:
        """Delete every side effect and stored response; orders stay."""
        with self.transaction() as conn:
            for table in (
                "idempotency",
                "reversals",
                "refunds",
                "emails",
                "tickets",
                "inspections",
                "legacy_credits",
            ):
                conn.execute(f"DELETE FROM {table}")


@dataclass
class Chaos:
    """The in-memory chaos setting and how often each fault fired."""

    setting: ChaosIn = field(default_factory=ChaosIn)
    rng: random.Random = field(default_factory=random.Random)
    injected: dict[str, int] = field(
        default_factory=lambda: {
            "fail": 0,
            "timeout": 0,
            "fail_after_commit": 0,
            "commit_then_timeout": 0,
        }
    )

    def configure(self, setting: ChaosIn) -> None:
        self.setting = setting
        self.rng = random.Random(setting.seed)
        self.injected = dict.fromkeys(self.injected, 0)

    def roll(self, rate: float, fault: str) -> bool:
        hit = rate > 0 and self.rng.random() < rate
        if hit:
            self.injected[fault] += 1
        return hit

    def snapshot(self) -> Json:
        return {**self.setting.model_dump(), "injected": dict(self.injected)}


def _chaos_applies(method: str, path: str) -> bool:
    """Chaos hits the calls tools make, never health, chaos, reset or the counting listings."""
    if method == "GET":
        return path.startswith("/v1/orders/")
    if method == "POST":
        writes = ("/v1/refunds", "/v1/emails", "/v1/tickets", "/v1/inspections")
        return path in (*writes, "/v1/legacy/credits") or (
            path.startswith("/v1/refunds/") and path.endswith("/reverse")
        )
    return False


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def _unavailable(message: str) -> JSONResponse:
    return _error(503, message, {"Retry-After": "0"})


def _require_key(key: str | None) -> str:
    if not key:
        raise ApiError(
            400,
            "missing Idempotency-Key header; send one unique key per operation"
            " and reuse it when retrying",
        )
    if len(key) > 255:
        raise ApiError(400, "Idempotency-Key is longer than 255 characters")
    return key


IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
Next = Callable[[Request], Awaitable[Response]]


def create_app(db_path: str | Path | None = None, api_key: str | None = None) -> FastAPI:
    """Build the service on the SQLite file `db_path`, accepting `api_key` as the bearer key.

    Args:
        db_path: defaults to ``$SPINE_DEMO_DB``, then ``temporal-dev/.data/demo-service.db``.
        api_key: defaults to ``$SPINE_DEMO_API_KEY``; one of the two must be set.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if not api_key:
        raise ValueError(f"no API key for the demo service; set {API_KEY_ENV} or pass api_key")
    store = Store(Path(db_path or os.environ.get(DB_ENV) or DEFAULT_DB))
    store.init()
    chaos = Chaos()
    expected = f"Bearer {api_key}".encode()

    app = FastAPI(title="Spine demo business service", version="1.0")
    app.state.store = store
    app.state.chaos = chaos

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error(exc.status_code, message, exc.headers)

    @app.middleware("http")
    async def _chaos(request: Request, call_next: Next) -> Response:
        if not _chaos_applies(request.method, request.url.path):
            return await call_next(request)
        setting = chaos.setting
        if setting.latency_ms:
            await asyncio.sleep(setting.latency_ms / 1000)
        if chaos.roll(setting.fail_rate, "fail"):
            return _unavailable(f"injected failure (chaos fail_rate={setting.fail_rate}); retry")
        if chaos.roll(setting.timeout_rate, "timeout"):
            await asyncio.sleep(HANG_SECONDS)
        response = await call_next(request)
        if (
            request.method == "POST"
            and response.status_code < 300
            and chaos.roll(setting.fail_after_commit_rate, "fail_after_commit")
        ):
            return _unavailable(
                "injected failure after commit (chaos fail_after_commit_rate="
                f"{setting.fail_after_commit_rate}); retry with the same Idempotency-Key"
            )
        if (
            request.method == "POST"
            and response.status_code < 300
            and chaos.roll(setting.commit_then_timeout_rate, "commit_then_timeout")
        ):
            await asyncio.sleep(HANG_SECONDS)  # committed; the caller times out first
        return response

    # Added last, so it runs first: a wrong key is a 401 whatever the chaos setting.
    @app.middleware("http")
    async def _auth(request: Request, call_next: Next) -> Response:
        if request.url.path == "/healthz":
            return await call_next(request)
        given = request.headers.get("authorization")
        if not given:
            message = "missing API key; send 'Authorization: Bearer <key>'"
        elif not hmac.compare_digest(given.encode(), expected):
            message = "invalid API key in the Authorization header"
        else:
            return await call_next(request)
        return _error(401, message, {"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> Json:
        store.ping()
        return {"status": "ok"}

    @app.get("/v1/orders/{order_id}")
    def get_order(order_id: str) -> Json:
        return store.order(order_id)

    @app.post("/v1/refunds")
    def issue_refund(body: RefundIn, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        request = {**body.model_dump(exclude={"amount"}), "amount_cents": _cents(body.amount)}
        return store.idempotent(
            "refund", key, request, lambda conn: store.create_refund(conn, body, key)
        ).response()

    @app.post("/v1/refunds/{refund_id}/reverse")
    def reverse_refund(refund_id: str, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        return store.idempotent(
            "reverse",
            key,
            {"refund_id": refund_id},
            lambda conn: store.reverse_refund(conn, refund_id, key),
        ).response()

    @app.post("/v1/emails")
    def send_email(body: EmailIn, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        return store.idempotent(
            "email", key, body.model_dump(), lambda conn: store.send_email(conn, body, key)
        ).response()

    @app.post("/v1/tickets")
    def update_ticket(body: TicketIn, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        return store.idempotent(
            "ticket", key, body.model_dump(), lambda conn: store.update_ticket(conn, body, key)
        ).response()

    @app.post("/v1/inspections")
    def file_inspection(body: InspectionIn, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        request = {
            **body.model_dump(exclude={"claim_amount"}),
            "claim_cents": _cents(body.claim_amount),
        }
        return store.idempotent(
            "inspection", key, request, lambda conn: store.file_inspection(conn, body, key)
        ).response()

    @app.post("/v1/inspections/{inspection_id}/withdraw")
    def withdraw_inspection(inspection_id: str, idempotency_key: IdempotencyKey = None) -> Response:
        key = _require_key(idempotency_key)
        return store.idempotent(
            "withdraw",
            key,
            {"inspection_id": inspection_id},
            lambda conn: store.withdraw_inspection(conn, inspection_id),
        ).response()

    @app.get("/v1/inspections")
    def list_inspections(order_id: str | None = None) -> list[Json]:
        return store.listing("inspections", order_id)

    @app.post("/v1/legacy/credits", status_code=201)
    def create_credit(body: CreditIn) -> Json:
        # No Idempotency-Key here, by design: a legacy API that ignores it.
        return store.create_credit(body)

    @app.post("/v1/legacy/credits/{credit_id}/void")
    def void_credit(credit_id: str) -> Json:
        return store.void_credit(credit_id)

    @app.get("/v1/legacy/credits")
    def list_credits(reference: str | None = None, order_id: str | None = None) -> list[Json]:
        return store.credits(reference, order_id)

    @app.post("/v1/documents", status_code=201)
    def add_document(body: DocumentIn) -> Json:
        return store.add_document(body)

    @app.get("/v1/documents/{document_id}")
    def get_document(document_id: str) -> Json:
        return store.document(document_id)

    @app.get("/v1/refunds")
    def list_refunds(order_id: str | None = None) -> list[Json]:
        return store.listing("refunds", order_id)

    @app.get("/v1/reversals")
    def list_reversals(order_id: str | None = None) -> list[Json]:
        return store.listing("reversals", order_id)

    @app.get("/v1/emails")
    def list_emails(order_id: str | None = None) -> list[Json]:
        return store.listing("emails", order_id)

    @app.get("/v1/tickets")
    def list_tickets(order_id: str | None = None) -> list[Json]:
        return store.listing("tickets", order_id)

    @app.get("/v1/chaos")
    def get_chaos() -> Json:
        return chaos.snapshot()

    @app.post("/v1/chaos")
    def set_chaos(setting: ChaosIn) -> Json:
        chaos.configure(setting)
        return chaos.snapshot()

    @app.post("/v1/reset")
    def reset() -> Json:
        store.reset()
        chaos.configure(ChaosIn())
        return {"status": "reset"}

    return app
