"""A run survives a restart of the Temporal server itself (SQLite-persisted dev server)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client

from spine.client.runs import RunHandle, get_run, get_state, start_run, wait_result
from spine.client.testing import DemoService, VaultDev, free_port, temporal_dev_server
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig, build_worker
from tests.helpers import call, eventually, scripted_request, signed_client, turn

REFUND = 30.0


def _script(orders: tuple[str, ...]) -> list:
    script = []
    for order in orders:
        script += [
            turn(call("lookup_order", order_id=order)),
            turn(
                call("issue_refund", order_id=order, amount=REFUND, reason="late"), confidence=0.9
            ),
            turn(call("send_email", order_id=order, subject="Refund", body="Refunded 30.00.")),
        ]
    return [*script, turn(text="Refunded three orders.")]


def _config(vault: VaultDev, service: DemoService, tmp_path: Path, queue: str) -> SpineConfig:
    return SpineConfig(
        task_queue=queue,
        state_dir=tmp_path / "state",
        settings={"SPINE_DEMO_URL": service.url},
        secrets=VaultSecrets(vault.url, token=vault.token),
        providers={},
    )


async def _rows(service: DemoService, kind: str, order: str) -> list:
    return await asyncio.to_thread(service.get, f"/v1/{kind}?order_id={order}")  # type: ignore[return-value]


async def _progress(client: Client, run_id: str) -> tuple[str, int]:
    state = await get_state(get_run(client, run_id))
    return state.status, state.step


@pytest.mark.slow
@pytest.mark.parametrize(
    ("outage_s", "orders"),
    [
        pytest.param(0.0, ("o-1400", "o-1401", "o-1402"), id="brief"),
        # Longer than the SDK's RPC retry window (10 s): the worker's report of the refund is
        # lost, the server times the attempt out and Temporal retries it with the same key.
        pytest.param(20.0, ("o-1403", "o-1404", "o-1405"), id="long"),
    ],
)
async def test_run_resumes_after_temporal_server_restart(
    vault: VaultDev, service: DemoService, tmp_path: Path, outage_s: float, orders: tuple[str, ...]
):
    """Stopping the Temporal server mid-run and starting it again on the same SQLite file: the
    run resumes on the same worker and its side effects happen exactly once."""
    db_file = tmp_path / "temporal.db"
    port = free_port()
    queue = f"restart-test-{uuid.uuid4().hex[:8]}"
    config = _config(vault, service, tmp_path, queue)
    steps = len(_script(orders))
    await asyncio.to_thread(service.post, "/v1/chaos", {"latency_ms": 500})
    servers = contextlib.AsyncExitStack()
    try:
        first = await servers.enter_async_context(temporal_dev_server(db_file=db_file, port=port))
        worker = build_worker(first.client, config=config)
        async with worker:
            handle: RunHandle = await start_run(
                signed_client(first.client, vault),
                scripted_request(_script(orders)),
                task_queue=queue,
            )

            async def refund_started() -> bool:
                state = await get_state(handle)
                return state.step >= 2 and state.last_tool == "issue_refund"

            # Stop the server while the first refund is (most likely) in flight: with 500 ms of
            # service latency it completes during the outage and cannot be reported at once.
            await eventually(refund_started, timeout=60, what="the refund at step 2 to start")
            status, step_before = await _progress(first.client, handle.id)
            assert status == "running", status
            committed_before = len(await _rows(service, "refunds", orders[0]))
            await servers.aclose()  # the Temporal server is gone; the worker keeps polling

            async def refund_committed() -> bool:
                return len(await _rows(service, "refunds", orders[0])) == 1

            await eventually(refund_committed, timeout=60, what="the refund to commit")
            await asyncio.sleep(outage_s)  # the fault: how long the server stays down
            restart = time.monotonic()
            second = await servers.enter_async_context(
                temporal_dev_server(db_file=db_file, port=port)
            )
            up = time.monotonic() - restart

            async def progressed() -> bool:
                status, step = await _progress(second.client, handle.id)
                return step > step_before or status == "completed"

            await eventually(progressed, timeout=120, what="the run's next step after restart")
            progress_s = time.monotonic() - restart
            print(
                f"\nrestart ({outage_s:.0f}s outage): stopped at step {step_before} (refund "
                f"{'committed before' if committed_before else 'in flight at'} shutdown); "
                f"new server up in {up:.1f}s; next progress {progress_s:.1f}s after restart began"
            )
            result = await asyncio.wait_for(
                wait_result(get_run(second.client, handle.id)), timeout=180
            )
    finally:
        await servers.aclose()
        await asyncio.to_thread(service.post, "/v1/chaos", {})
    assert result.status == "completed", result.reason
    assert result.steps == steps
    print(f"restart: run completed, retries={result.retries}")
    assert [s.tool for s in result.side_effects] == ["issue_refund", "send_email"] * len(orders)
    for order in orders:
        refunds = service.get(f"/v1/refunds?order_id={order}")
        assert len(refunds) == 1 and refunds[0]["amount"] == REFUND, refunds  # type: ignore[index]
        assert len(service.get(f"/v1/emails?order_id={order}")) == 1  # type: ignore[arg-type]
