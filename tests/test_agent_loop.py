"""The agent loop end to end on the real dev server, OpenBao and the demo service."""

from __future__ import annotations

from spine.client.demo import build_demo_request
from spine.client.runs import decide, get_state, start_run, wait_result
from spine.client.testing import DemoService
from spine.contract import ApprovalDecision
from tests.helpers import call, scripted_request, turn, wait_for_status


async def test_demo_run_completes_with_one_approval(
    client, make_worker, task_queue, service: DemoService
):
    """The demo conversation pauses for approval, then refunds, emails and resolves once each."""
    request = build_demo_request("o-1001")
    async with make_worker():
        handle = await start_run(client, request, task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        [pending] = state.pending_approvals
        assert pending.tool == "issue_refund" and pending.args["amount"] == 180.0
        ack = await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
            ),
        )
        assert ack.decision == "approve"
        result = await wait_result(handle)
        assert (await get_state(handle)).status == "completed"
    assert result.status == "completed", result.reason
    assert result.steps == 5
    assert [s.tool for s in result.side_effects] == ["issue_refund", "send_email", "update_ticket"]
    assert result.usage.input_tokens > 0 and result.usage.usd > 0
    refunds = service.get("/v1/refunds?order_id=o-1001")
    assert len(refunds) == 1 and refunds[0]["amount"] == 180.0
    assert refunds[0]["idempotency_key"] == result.side_effects[0].idempotency_key
    assert len(service.get("/v1/emails?order_id=o-1001")) == 1
    assert len(service.get("/v1/tickets?order_id=o-1001")) == 1


async def test_small_refund_needs_no_approval(client, make_worker, task_queue):
    """A refund of 40.00 with high confidence runs without waiting for a person."""
    script = [
        turn(call("issue_refund", order_id="o-1002", amount=40.0, reason="late"), confidence=0.95),
        turn(text="Refunded 40.00."),
    ]
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert result.output == "Refunded 40.00."
    assert result.side_effects[0].output["amount"] == 40.0
