"""Parallel tool calls: a turn's calls run at once, each with its own key and approval; results
go back in the model's order; a rejection undoes the turn's completed calls newest first; a
worker SIGKILLed mid-turn leaves each effect exactly once."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from spine.client.runs import decide, get_state, start_run, wait_result
from spine.client.testing import DemoService, script, turn_timings
from spine.contract import ApprovalDecision
from tests.helpers import (
    custom_policy,
    eventually,
    policy_file,
    scripted_request,
    wait_for_status,
)
from tests.test_worker_process import rows, spawn_worker

LOOKUPS = [f"o-{n}" for n in range(1350, 1355)]


@pytest.fixture
def slow_service(service: DemoService):
    """Every order lookup and write takes `latency_ms` in the demo service (reset afterwards)."""

    def set_latency(latency_ms: int) -> None:
        service.post("/v1/chaos", {"latency_ms": latency_ms})

    yield set_latency
    service.post("/v1/chaos", {})


async def test_five_lookups_take_about_as_long_as_one(
    client, make_worker, task_queue, slow_service
):
    """Turn 1 looks one order up, turn 2 five at once: turn 2 takes about as long as turn 1."""
    slow_service(1000)
    turns = (
        script()
        .tool("lookup_order", order_id=LOOKUPS[0])
        .parallel(*[("lookup_order", {"order_id": o}) for o in LOOKUPS])
        .text("Looked them up.")
    )
    async with make_worker():
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    timings = await turn_timings(handle)
    one, five = timings[1], timings[2]
    assert len(five.calls) == 5 and five.max_concurrent == 5
    ratio = five.duration / one.duration
    print(f"\n1 lookup: {one.duration:.2f}s, 5 lookups at once: {five.duration:.2f}s, x{ratio:.2f}")
    # One by one would be >= 5x (each lookup takes >= 1 s); generous slack for a loaded box.
    assert one.duration >= 1.0 and ratio < 2.5, (one.duration, five.duration)


async def test_the_policy_caps_calls_running_at_once(
    client, make_worker, task_queue, slow_service, tmp_path
):
    """With max_parallel_tool_calls = 2, five lookups run two at a time, results in order."""
    slow_service(300)
    policy = policy_file(tmp_path, agent={"max_parallel_tool_calls": 2})
    turns = script().parallel(*[("lookup_order", {"order_id": o}) for o in LOOKUPS]).text("ok")
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    five = (await turn_timings(handle))[1]
    assert five.max_concurrent == 2, [(c.scheduled, c.closed) for c in five.calls]
    assert five.duration >= 0.9  # three waves of 300 ms


async def test_approved_and_rejected_refunds_of_one_turn(
    client, make_worker, task_queue, service: DemoService, slow_service
):
    """Two small refunds run at once while two large ones wait for approval together; one
    large is approved and runs, the other is rejected: the run ends `rejected` and the three
    completed refunds are reversed in reverse completion order."""
    slow_service(200)
    small_a, small_b, large_ok, large_no = "o-1356", "o-1357", "o-1358", "o-1359"
    refund = "issue_refund"
    turns = (
        script()
        .parallel(
            (refund, {"order_id": small_a, "amount": 10.0}),
            (refund, {"order_id": large_ok, "amount": 150.0}),
            (refund, {"order_id": small_b, "amount": 20.0}),
            (refund, {"order_id": large_no, "amount": 160.0}),
        )
        .confidence(0.95)
        .text("Refunded.")
    )
    async with make_worker():
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)

        async def both_pending() -> bool:
            state = await get_state(handle)
            return state.status == "awaiting_approval" and len(state.pending_approvals) == 2

        await eventually(both_pending, what="two approvals pending together")
        pending = {p.args["order_id"]: p for p in (await get_state(handle)).pending_approvals}

        async def small_refunds_done() -> bool:
            return all([await rows(service, "refunds", o) for o in (small_a, small_b)])

        await eventually(small_refunds_done, what="the small refunds, which need no approval")
        ack = await decide(handle, _decision(pending[large_ok].approval_id, "approve"))
        assert ack.status == "awaiting_approval"  # the other large refund still waits

        async def approved_refund_done() -> bool:
            return bool(await rows(service, "refunds", large_ok))

        await eventually(approved_refund_done, what="the approved refund")
        await decide(handle, _decision(pending[large_no].approval_id, "reject"))
        result = await wait_result(handle)

    assert result.status == "rejected", result.reason
    assert await rows(service, "refunds", large_no) == []
    # Side effects are kept in completion order; each has its own key and was undone.
    done = result.side_effects
    assert sorted(e.args["order_id"] for e in done) == sorted([small_a, small_b, large_ok])
    assert all(e.compensated for e in done)
    keys = {e.args["order_id"]: e.idempotency_key for e in done}
    assert keys[small_a].endswith("/1/0") and keys[large_ok].endswith("/1/1")
    assert keys[small_b].endswith("/1/2")
    reversals = []
    for order in (small_a, small_b, large_ok):
        [row] = await rows(service, "refunds", order)
        assert row["reversed"] and row["idempotency_key"] == keys[order]
        [reversal] = await rows(service, "reversals", order)
        reversals.append((reversal["created_at"], order))
    undone_order = [order for _, order in sorted(reversals)]
    assert undone_order == [e.args["order_id"] for e in reversed(done)]


def _decision(approval_id: str, verdict: str) -> ApprovalDecision:
    return ApprovalDecision(
        approval_id=approval_id,
        decision=verdict,  # type: ignore[arg-type]  # "approve" | "reject"
        by="bob",
        role="supervisor",
        reason="test",
    )


async def test_a_rejection_withdraws_the_other_pending_approval(
    client, make_worker, task_queue, service: DemoService
):
    """Rejecting one of two pending approvals ends the run; the other is withdrawn, not run."""
    turns = (
        script()
        .parallel(
            ("issue_refund", {"order_id": "o-1360", "amount": 150.0}),
            ("issue_refund", {"order_id": "o-1361", "amount": 170.0}),
        )
        .confidence(0.95)
        .text("done")
    )
    async with make_worker():
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)

        async def both_pending() -> bool:
            return len((await get_state(handle)).pending_approvals) == 2

        await eventually(both_pending, what="two approvals pending together")
        first = (await get_state(handle)).pending_approvals[0]
        await decide(handle, _decision(first.approval_id, "reject"))
        result = await wait_result(handle)
        state = await get_state(handle)
    assert result.status == "rejected" and result.side_effects == []
    assert state.pending_approvals == []
    for order in ("o-1360", "o-1361"):
        assert await rows(service, "refunds", order) == []


@pytest.mark.slow
async def test_sigkill_during_a_parallel_turn_leaves_each_effect_once(
    client, worker_env, worker_processes, service: DemoService, task_queue: str
):
    """A worker is SIGKILLed while three refunds and an email of one turn are in flight; a fresh
    worker finishes the run and the service holds each effect exactly once."""
    orders = ["o-1362", "o-1363", "o-1364"]
    turns = (
        script()
        .parallel(
            *[("issue_refund", {"order_id": o, "amount": 12.0}) for o in orders],
            ("send_email", {"order_id": orders[0], "subject": "Refunds", "body": "Refunded."}),
        )
        .confidence(0.95)
        .text("Refunded three orders.")
    )
    first = await spawn_worker(worker_env, worker_processes)
    # Slow writes, and the first commits answered 503 until the kill: retries are in flight.
    await asyncio.to_thread(
        service.post, "/v1/chaos", {"latency_ms": 1500, "fail_after_commit_rate": 1.0}
    )
    try:
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)

        async def some_committed() -> bool:
            return len(await rows(service, "refunds", orders[0])) > 0

        await eventually(some_committed, timeout=120, what="a committed refund")
        os.kill(first.pid, signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL
        await asyncio.to_thread(service.post, "/v1/chaos", {"latency_ms": 200})
        await spawn_worker(worker_env, worker_processes)
        result = await asyncio.wait_for(wait_result(handle), timeout=300)
    finally:
        await asyncio.to_thread(service.post, "/v1/chaos", {})
    assert result.status == "completed", result.reason
    assert sorted(e.tool for e in result.side_effects) == ["issue_refund"] * 3 + ["send_email"]
    for order in orders:
        [refund] = await rows(service, "refunds", order)
        keys = [e.idempotency_key for e in result.side_effects if e.args["order_id"] == order]
        assert refund["idempotency_key"] in keys
    assert len(await rows(service, "emails", orders[0])) == 1
    timing = (await turn_timings(handle))[1]
    assert timing.max_concurrent == 4


async def test_waiting_status_follows_every_open_approval(
    client, make_worker, task_queue, service: DemoService
):
    """Approving one of two pending approvals keeps the run `awaiting_approval`."""
    turns = (
        script()
        .parallel(
            ("issue_refund", {"order_id": "o-1365", "amount": 150.0}),
            ("issue_refund", {"order_id": "o-1366", "amount": 170.0}),
        )
        .confidence(0.95)
        .text("done")
    )
    async with make_worker():
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")

        async def both_pending() -> bool:
            return len((await get_state(handle)).pending_approvals) == 2

        await eventually(both_pending, what="two approvals pending together")
        state = await get_state(handle)
        first, second = state.pending_approvals
        await decide(handle, _decision(first.approval_id, "approve"))
        after = await get_state(handle)
        assert after.status == "awaiting_approval"
        assert [p.approval_id for p in after.pending_approvals] == [second.approval_id]
        await decide(handle, _decision(second.approval_id, "approve"))
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert len(result.side_effects) == 2


async def test_refunds_of_one_order_in_one_turn_are_checked_one_after_another(
    client, make_worker, task_queue, service: DemoService, tmp_path
):
    """Two 60.00 refunds of one order in one turn (a cumulative line of 100.00 per order and
    day): the first runs, the second is checked against it and waits for approval; a lookup of
    the same turn runs at once meanwhile."""
    order = "o-1367"
    turns = (
        script()
        .parallel(
            ("issue_refund", {"order_id": order, "amount": 60.0}),
            ("issue_refund", {"order_id": order, "amount": 60.0}),
            ("lookup_order", {"order_id": "o-1368"}),
        )
        .confidence(0.95)
        .text("done")
    )
    policy = custom_policy(tmp_path, lambda p: None, cumulative=True)
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(turns), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        [pending] = state.pending_approvals
        assert pending.args == {"order_id": order, "amount": 60.0}
        assert "cumulative" in pending.reason or "120.00" in pending.reason, pending.reason
        assert len(await rows(service, "refunds", order)) == 1  # the first ran before the check
        await decide(handle, _decision(pending.approval_id, "reject"))
        result = await wait_result(handle)
    assert result.status == "rejected"
    [refund] = await rows(service, "refunds", order)
    assert refund["reversed"]
