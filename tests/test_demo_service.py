"""The demo business service over real HTTP: auth, refunds, idempotency under concurrency, chaos."""

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Service:
    url: str
    api_key: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`python -m spine.demo` in a subprocess on a free port, with its own database and key."""
    port, api_key = _free_port(), secrets.token_urlsafe(16)
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    log = db.with_suffix(".log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spine.demo", "--port", str(port), "--db", str(db)],
        cwd=REPO,
        env={**os.environ, "SPINE_DEMO_API_KEY": api_key},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"demo service exited with {proc.returncode}: {log.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo service not healthy on {url} within 30 s")
            time.sleep(0.05)  # poll interval, bounded by the deadline above
        yield Service(url, api_key)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client; chaos is switched off again after each test."""
    headers = {"Authorization": f"Bearer {service.api_key}"}
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=10) as http:
        yield http
        await http.post("/v1/chaos", json={})


def _refund(order_id: str, amount: float, reason: str = "arrived broken") -> dict[str, object]:
    return {"order_id": order_id, "amount": amount, "reason": reason}


async def _refunds(client: httpx.AsyncClient, order_id: str) -> list[dict[str, object]]:
    response = await client.get("/v1/refunds", params={"order_id": order_id})
    assert response.status_code == 200
    rows: list[dict[str, object]] = response.json()
    return rows


async def test_auth_required(service: Service, client: httpx.AsyncClient) -> None:
    """Every endpoint but /healthz answers 401 without the right bearer key."""
    async with httpx.AsyncClient(base_url=service.url) as anonymous:
        missing = await anonymous.get("/v1/orders/o-1001")
        wrong = await anonymous.get("/v1/refunds", headers={"Authorization": "Bearer not-the-key"})
        health = await anonymous.get("/healthz")
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]
    assert health.status_code == 200
    assert (await client.get("/v1/orders/o-1001")).status_code == 200


async def test_order_lookup(client: httpx.AsyncClient) -> None:
    """Seeded orders total 250.00 USD; an unknown order is a 404 naming it."""
    order = (await client.get("/v1/orders/o-1500")).json()
    assert order["total"] == 250.0 and order["currency"] == "USD"
    assert order["refundable"] == 250.0 and order["refunded"] == 0.0
    assert order["customer_email"] == "customer+o-1500@example.com"
    unknown = await client.get("/v1/orders/o-9999")
    assert unknown.status_code == 404 and "'o-9999'" in unknown.json()["error"]


async def test_refund_needs_idempotency_key(client: httpx.AsyncClient) -> None:
    """A mutating request without an Idempotency-Key is a 400 and writes nothing."""
    response = await client.post("/v1/refunds", json=_refund("o-1100", 10))
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["error"]
    assert await _refunds(client, "o-1100") == []


async def test_refund_over_remaining_refused(client: httpx.AsyncClient) -> None:
    """Partial refunds add up to the total; one more is a 422 naming amount and remaining."""
    first = await client.post(
        "/v1/refunds", json=_refund("o-1101", 200), headers={"Idempotency-Key": "r1101-a"}
    )
    assert first.status_code == 201
    over = await client.post(
        "/v1/refunds", json=_refund("o-1101", 60), headers={"Idempotency-Key": "r1101-b"}
    )
    assert over.status_code == 422
    assert "60.00" in over.json()["error"] and "50.00" in over.json()["error"]
    order = (await client.get("/v1/orders/o-1101")).json()
    assert (order["refunded"], order["refundable"]) == (200.0, 50.0)
    assert len(await _refunds(client, "o-1101")) == 1


async def test_idempotent_replay_creates_one_row(client: httpx.AsyncClient) -> None:
    """A retried refund with the same key returns the original response and adds no row."""
    headers = {"Idempotency-Key": "r1102"}
    first = await client.post("/v1/refunds", json=_refund("o-1102", 42.5), headers=headers)
    again = await client.post("/v1/refunds", json=_refund("o-1102", 42.50), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    body = first.json()
    assert body["amount"] == 42.5 and body["idempotency_key"] == "r1102"
    assert body["reversed"] is False
    rows = await _refunds(client, "o-1102")
    assert [row["refund_id"] for row in rows] == [body["refund_id"]]
    assert {"order_id", "amount", "idempotency_key", "created_at"} <= rows[0].keys()


async def test_same_key_different_body_conflicts(client: httpx.AsyncClient) -> None:
    """Re-using a key for a different request is a 422 and writes nothing."""
    headers = {"Idempotency-Key": "r1103"}
    first = await client.post("/v1/refunds", json=_refund("o-1103", 10), headers=headers)
    assert first.status_code == 201
    conflict = await client.post("/v1/refunds", json=_refund("o-1103", 11), headers=headers)
    assert conflict.status_code == 422 and "'r1103'" in conflict.json()["error"]
    assert len(await _refunds(client, "o-1103")) == 1


async def test_concurrent_same_key_creates_one_row(client: httpx.AsyncClient) -> None:
    """Twenty concurrent refunds with one key create exactly one row and one answer."""
    headers = {"Idempotency-Key": "r1104"}
    responses = await asyncio.gather(
        *(client.post("/v1/refunds", json=_refund("o-1104", 5), headers=headers) for _ in range(20))
    )
    assert {response.status_code for response in responses} == {201}
    assert len({response.content for response in responses}) == 1
    assert len(await _refunds(client, "o-1104")) == 1


async def test_reversal_idempotent(client: httpx.AsyncClient) -> None:
    """Reversing a refund twice, with any key, records one reversal and restores the amount."""
    refund = (
        await client.post(
            "/v1/refunds", json=_refund("o-1105", 80), headers={"Idempotency-Key": "r1105"}
        )
    ).json()
    path = f"/v1/refunds/{refund['refund_id']}/reverse"
    first = await client.post(path, headers={"Idempotency-Key": "rv1105"})
    replay = await client.post(path, headers={"Idempotency-Key": "rv1105"})
    other_key = await client.post(path, headers={"Idempotency-Key": "rv1105-b"})
    assert first.status_code == 201 and replay.content == first.content
    assert other_key.status_code == 200
    assert other_key.json()["reversal_id"] == first.json()["reversal_id"]
    reversals = (await client.get("/v1/reversals", params={"order_id": "o-1105"})).json()
    assert len(reversals) == 1 and reversals[0]["amount"] == 80.0
    assert (await _refunds(client, "o-1105"))[0]["reversed"] is True
    assert (await client.get("/v1/orders/o-1105")).json()["refundable"] == 250.0
    missing = await client.post("/v1/refunds/rf_nope/reverse", headers={"Idempotency-Key": "x"})
    assert missing.status_code == 404


async def test_emails_and_tickets_are_recorded(client: httpx.AsyncClient) -> None:
    """Emails and ticket updates are idempotent and listed with order and key."""
    email = {"order_id": "o-1106", "to": "customer+o-1106@example.com", "subject": "Refund"}
    for _ in range(2):
        sent = await client.post(
            "/v1/emails", json={**email, "body": "Refunded."}, headers={"Idempotency-Key": "e1106"}
        )
        assert sent.status_code == 201
        ticket = await client.post(
            "/v1/tickets",
            json={"order_id": "o-1106", "status": "resolved", "note": "refunded"},
            headers={"Idempotency-Key": "t1106"},
        )
        assert ticket.status_code == 201
    emails = (await client.get("/v1/emails", params={"order_id": "o-1106"})).json()
    tickets = (await client.get("/v1/tickets", params={"order_id": "o-1106"})).json()
    assert [(row["idempotency_key"], row["to"]) for row in emails] == [("e1106", email["to"])]
    assert [(row["idempotency_key"], row["status"]) for row in tickets] == [("t1106", "resolved")]


async def test_chaos_fail_rate_writes_nothing(client: httpx.AsyncClient) -> None:
    """With fail_rate 1.0 tool calls get 503 with Retry-After before anything is written."""
    assert (await client.post("/v1/chaos", json={"fail_rate": 1.0})).json()["fail_rate"] == 1.0
    refund = await client.post(
        "/v1/refunds", json=_refund("o-1107", 10), headers={"Idempotency-Key": "r1107"}
    )
    lookup = await client.get("/v1/orders/o-1107")
    for response in (refund, lookup):
        assert response.status_code == 503 and response.headers["Retry-After"] == "0"
    assert await _refunds(client, "o-1107") == []
    assert (await client.get("/v1/chaos")).json()["injected"]["fail"] == 2


async def test_fail_after_commit_then_retry_returns_original(client: httpx.AsyncClient) -> None:
    """A 503 after commit leaves one row; the retry with the same key returns it, no second row."""
    headers = {"Idempotency-Key": "r1108"}
    await client.post("/v1/chaos", json={"fail_after_commit_rate": 1.0})
    failed = await client.post("/v1/refunds", json=_refund("o-1108", 25), headers=headers)
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "0"
    committed = await _refunds(client, "o-1108")
    assert len(committed) == 1
    await client.post("/v1/chaos", json={})
    retry = await client.post("/v1/refunds", json=_refund("o-1108", 25), headers=headers)
    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json()["refund_id"] == committed[0]["refund_id"]
    assert len(await _refunds(client, "o-1108")) == 1


async def test_reset_clears_rows(client: httpx.AsyncClient) -> None:
    """POST /v1/reset deletes every side effect, so a used key works afresh."""
    headers = {"Idempotency-Key": "r1109"}
    first = await client.post("/v1/refunds", json=_refund("o-1109", 1), headers=headers)
    assert (await client.post("/v1/reset")).status_code == 200
    assert (await client.get("/v1/refunds")).json() == []
    again = await client.post("/v1/refunds", json=_refund("o-1109", 1), headers=headers)
    assert again.status_code == 201 and again.json()["refund_id"] != first.json()["refund_id"]


async def test_amount_in_whole_cents(client: httpx.AsyncClient) -> None:
    """Float noise in an amount is rounded to cents; a real fraction of a cent is a 422."""
    noisy = await client.post(
        "/v1/refunds", json=_refund("o-1110", 0.1 + 0.2), headers={"Idempotency-Key": "r1110"}
    )
    assert noisy.status_code == 201 and noisy.json()["amount"] == 0.3
    fraction = await client.post(
        "/v1/refunds", json=_refund("o-1110", 0.005), headers={"Idempotency-Key": "r1110-b"}
    )
    assert fraction.status_code == 422 and "whole number of cents" in fraction.json()["error"]


async def test_legacy_credits_ignore_idempotency_keys(client: httpx.AsyncClient) -> None:
    """The legacy API writes a row per POST, whatever Idempotency-Key says; found by reference."""
    body = {"order_id": "o-1120", "amount": 5, "reference": "run-1/2/0"}
    for _ in range(2):
        response = await client.post(
            "/v1/legacy/credits", json=body, headers={"Idempotency-Key": "same"}
        )
        assert response.status_code == 201 and response.json()["reference"] == "run-1/2/0"
    found = (await client.get("/v1/legacy/credits", params={"reference": "run-1/2/0"})).json()
    assert len(found) == 2 and {c["amount"] for c in found} == {5.0}
    voided = await client.post(f"/v1/legacy/credits/{found[0]['credit_id']}/void")
    again = await client.post(f"/v1/legacy/credits/{found[0]['credit_id']}/void")
    assert voided.json()["voided"] and again.json() == voided.json()


async def test_commit_then_timeout_commits_and_hangs(client: httpx.AsyncClient) -> None:
    """commit_then_timeout_rate: the credit is written, the caller times out waiting."""
    await client.post("/v1/chaos", json={"commit_then_timeout_rate": 1.0})
    body = {"order_id": "o-1121", "amount": 7, "reference": "run-2/1/0"}
    with pytest.raises(httpx.TimeoutException):
        await client.post("/v1/legacy/credits", json=body, timeout=1.0)
    found = (await client.get("/v1/legacy/credits", params={"reference": "run-2/1/0"})).json()
    assert len(found) == 1
    chaos = (await client.get("/v1/chaos")).json()
    assert chaos["injected"]["commit_then_timeout"] == 1
