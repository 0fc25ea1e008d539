"""Fifty demo runs at once on one worker, with a flaky business service and a flaky model."""

from __future__ import annotations

import asyncio
import time

import pytest

from spine.client.demo import build_demo_request
from spine.client.runs import RunHandle, SpineClientError, decide, get_state, start_run, wait_result
from spine.client.testing import DemoService
from spine.contract import AgentResult, ApprovalDecision

RUNS = 50
FIRST_ORDER = 1300
SERVICE_CHAOS = {"fail_rate": 0.15, "fail_after_commit_rate": 0.05}
MODEL_FAIL_RATE = 0.15
DEADLINE_S = 300.0


async def _approve_as_they_appear(handles: list[RunHandle], approved: dict[str, float]) -> None:
    """Approve every run's pending approval as a supervisor once it shows up; runs forever."""
    waiting = {h.id: h for h in handles}

    async def check(handle: RunHandle) -> None:
        try:
            state = await get_state(handle)
        except SpineClientError:
            return  # closed already, or the worker is busy: the next round decides
        if state.status in ("completed", "failed", "compensated", "rejected"):
            waiting.pop(handle.id, None)
            return
        for pending in state.pending_approvals:
            try:
                await decide(
                    handle,
                    ApprovalDecision(
                        approval_id=pending.approval_id,
                        decision="approve",
                        by="bob",
                        role="supervisor",
                        reason="chaos test",
                    ),
                )
            except SpineClientError:
                return  # e.g. the update timed out on a busy worker: the next round retries
            approved[handle.id] = time.monotonic()
            waiting.pop(handle.id, None)  # the demo needs exactly one approval

    while True:
        await asyncio.gather(*(check(h) for h in list(waiting.values())))
        await asyncio.sleep(0.5)


async def _unfinished(handles: list[RunHandle]) -> dict[str, str]:
    """What each run still open says about itself (for the failure message)."""
    found = {}
    for handle in handles:
        description = await handle.describe()
        if description.status is not None and description.status.name != "RUNNING":
            continue
        try:
            state = await get_state(handle)
        except SpineClientError as err:
            found[handle.id] = f"no state: {err}"
            continue
        found[handle.id] = f"{state.status} at step {state.step}: {state.reason or state.path[-1:]}"
    return found


@pytest.mark.slow
async def test_fifty_concurrent_demo_runs_survive_chaos_exactly_once(
    client, make_worker, task_queue, service: DemoService
):
    """50 concurrent demo runs under 15% service faults (5% after commit) and 15% model faults
    all complete, with exactly one refund, email and ticket per order."""
    orders = [f"o-{FIRST_ORDER + i}" for i in range(RUNS)]
    approved: dict[str, float] = {}
    await asyncio.to_thread(service.post, "/v1/chaos", SERVICE_CHAOS)
    try:
        begun = time.monotonic()
        async with make_worker():
            started = time.monotonic()
            requests = [build_demo_request(order) for order in orders]
            for request in requests:
                assert request.model is not None
                request.model.fail_rate = MODEL_FAIL_RATE
            handles = await asyncio.gather(
                *(start_run(client, r, task_queue=task_queue) for r in requests)
            )
            approver = asyncio.create_task(_approve_as_they_appear(handles, approved))
            finishing = asyncio.ensure_future(asyncio.gather(*(wait_result(h) for h in handles)))
            try:
                # The approver never returns; if it raises, that is the failure to report.
                await asyncio.wait(
                    {approver, finishing},
                    timeout=DEADLINE_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if approver.done():
                    approver.result()
                if not finishing.done():
                    stuck = await _unfinished(handles)
                    raise AssertionError(
                        f"not all runs finished within {DEADLINE_S:.0f}s; "
                        f"{len(approved)} of {RUNS} approved; {len(stuck)} still open: "
                        f"{dict(list(stuck.items())[:5])}"
                    )
                results: list[AgentResult] = finishing.result()
            finally:
                for task in (approver, finishing):
                    task.cancel()
                await asyncio.gather(approver, finishing, return_exceptions=True)
            elapsed = time.monotonic() - started
        shutdown = time.monotonic() - started - elapsed
        fired = await asyncio.to_thread(service.get, "/v1/chaos")
    finally:
        await asyncio.to_thread(service.post, "/v1/chaos", {})

    not_done = {
        h.id: (r.status, r.reason)
        for h, r in zip(handles, results, strict=True)
        if r.status != "completed"
    }
    assert not not_done, not_done
    assert len(approved) == RUNS

    counting = time.monotonic()
    # One listing per kind, grouped by order id (the session's other tests use other orders).
    rows: dict[str, dict[str, list[dict]]] = {}
    for kind in ("refunds", "emails", "tickets"):
        for row in await asyncio.to_thread(service.get, f"/v1/{kind}"):  # type: ignore[union-attr]
            rows.setdefault(row["order_id"], {}).setdefault(kind, []).append(row)
    counts = {
        order: {
            kind: len(rows.get(order, {}).get(kind, []))
            for kind in ("refunds", "emails", "tickets")
        }
        for order in orders
    }
    counting = time.monotonic() - counting
    duplicates = sum(max(n - 1, 0) for c in counts.values() for n in c.values())
    missing = {o: c for o, c in counts.items() if any(n == 0 for n in c.values())}
    retries = sum(r.retries for r in results)
    print(
        f"\nchaos: {RUNS} runs completed in {elapsed:.1f}s; duplicates={duplicates} "
        f"retries={retries}; service faults fired={fired['injected']}; "  # type: ignore[index]
        f"worker start {started - begun:.1f}s, shutdown {shutdown:.1f}s, counting {counting:.1f}s"
    )
    assert duplicates == 0, {o: c for o, c in counts.items() if any(n > 1 for n in c.values())}
    assert not missing, missing
    for result, order in zip(results, orders, strict=True):
        [refund] = rows[order]["refunds"]
        assert refund["amount"] == 180.0
        assert refund["idempotency_key"] == result.side_effects[0].idempotency_key
        assert [s.tool for s in result.side_effects] == [
            "issue_refund",
            "send_email",
            "update_ticket",
        ]
    assert retries > 0, "chaos at these rates should have caused some retries"
