"""A turn's calls at once, without a server: result order, approvals pending together and
withdrawn, parking one call at a time."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import timedelta

from spine.contract import ApprovalDecision, OperatorCommand
from spine.guardrails.approvals import ApprovalDesk
from spine.guardrails.parking import Parking
from spine.payloads import ChatMessage, PrincipalView, ToolCall
from spine.workflows.state import apply_refusal, apply_tool_result, apply_turn_order
from tests.unit.kit import FakeRun, state


async def _until(condition: Callable[[], bool], tries: int = 5000) -> None:
    """Let other tasks run until `condition` holds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def _polling_wait(condition: Callable[[], bool], timeout: timedelta | None) -> None:
    """A wait that really waits (a person answers from another task)."""
    await _until(condition, tries=10**9)


def _hooks(run: FakeRun):
    return dataclasses.replace(run.hooks(), wait=_polling_wait)


def test_results_go_back_in_the_order_the_model_asked():
    """Completion order 2, 0, 1 (a refusal among them) becomes 0, 1, 2; effects keep theirs."""
    run_state = state()
    spec = run_state.agent
    lookup = next(t for t in spec.tools if t.name == "lookup_order")
    refund = next(t for t in spec.tools if t.name == "issue_refund")
    calls = [
        ToolCall(id="c0", name="issue_refund", args={"order_id": "o-1001", "amount": 5}),
        ToolCall(id="c1", name="nope", args={}),
        ToolCall(id="c2", name="lookup_order", args={"order_id": "o-1002"}),
    ]
    assistant = ChatMessage(role="assistant", tool_calls=calls)
    run_state.pending_messages = [assistant]
    apply_tool_result(run_state, calls[2], lookup, calls[2].args, {"total": 1}, "k/1/2")
    apply_tool_result(run_state, calls[0], refund, calls[0].args, {"refund_id": "r"}, "k/1/0")
    apply_refusal(run_state, calls[1], "error: unknown tool 'nope'")
    apply_turn_order(run_state, [c.id for c in calls])
    assert run_state.pending_messages[0] is assistant
    assert [m.tool_call_id for m in run_state.pending_messages[1:]] == ["c0", "c1", "c2"]
    assert [e.idempotency_key for e in run_state.side_effects] == ["k/1/0"]


async def test_approvals_of_one_turn_wait_together_and_a_cancelled_one_is_withdrawn():
    """Two calls wait at once; approving one keeps the run waiting; cancelling the other (its
    turn ended) withdraws it, so nothing is left pending and the run is running again."""
    run = FakeRun()
    desk = ApprovalDesk(state(), _hooks(run), agent="refund-agent")
    first = asyncio.create_task(
        desk.request("issue_refund", {"amount": 150}, "above 100", ["supervisor"])
    )
    second = asyncio.create_task(
        desk.request("issue_refund", {"amount": 170}, "above 100", ["supervisor"])
    )
    await _until(lambda: len(desk.pending()) == 2)
    one, two = (p.approval_id for p in desk.pending())
    desk.accept(ApprovalDecision(approval_id=one, decision="approve", by="b", role="supervisor"))
    assert (await first).decision == "approve"
    assert run.statuses[-1] == ("awaiting_approval", None)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert desk.pending() == []
    assert run.statuses[-1] == ("running", None)
    assert run.kinds()[-1] == "policy_decision:withdrawn"
    bob = PrincipalView(name="b", roles=["supervisor"], accounts=["acme"])
    assert desk.problem(
        ApprovalDecision(approval_id=two, decision="approve", by="b", role="supervisor"), bob
    ) == (f"unknown approval {two!r} for this run")


async def test_calls_of_one_turn_park_one_at_a_time():
    """Two calls that exhaust their retries park in turn: one operator command answers one."""
    run = FakeRun()
    parking = Parking(state(), _hooks(run))
    retry = OperatorCommand(action="retry", by="ops", role="operator")
    first = asyncio.create_task(parking.park("call 0 failed", skippable=True))
    second = asyncio.create_task(parking.park("call 1 failed", skippable=True))
    await _until(lambda: bool(run.statuses))
    assert run.statuses == [("parked", "call 0 failed")]
    parking.accept(retry)
    assert (await first).action == "retry"
    await _until(lambda: len(run.statuses) >= 3)
    assert run.statuses[-1] == ("parked", "call 1 failed")
    assert not second.done()
    parking.accept(retry)
    assert (await second).action == "retry"
