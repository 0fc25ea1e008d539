"""The policy interceptor refuses tool activities even when workflow code skips its checks."""

from __future__ import annotations

from spine.client.testing import DemoService
from spine.contract import AgentResult
from spine.plugin import build_worker
from tests.helpers import call, scripted_request, turn
from tests.rogue_workflow import RogueAgentWorkflow


async def test_interceptor_refuses_what_the_loop_let_through(
    client, worker_config, task_queue, service: DemoService
):
    """A viewer's refund, unchecked by the workflow, is still never scheduled."""
    script = [turn(call("issue_refund", order_id="o-1050", amount=10.0)), turn(text="done")]
    request = scripted_request(script, role="viewer")
    async with build_worker(client, config=worker_config, extra_workflows=[RogueAgentWorkflow]):
        handle = await client.start_workflow(
            "RogueAgentWorkflow",
            request,
            id=f"rogue-{task_queue}",
            task_queue=task_queue,
            result_type=AgentResult,
        )
        result = await handle.result()
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            async for e in handle.fetch_history_events()
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
    # The refund the model asked for never ran, so its "done" does not complete the run.
    assert result.status == "failed" and "PolicyDenied" in (result.reason or "")
    assert "tool.issue_refund" not in scheduled
    assert service.get("/v1/refunds?order_id=o-1050") == []


async def test_interceptor_refuses_a_sub_agent_the_role_was_not_granted(
    client, worker_config, task_queue, service: DemoService
):
    """A viewer's hand-over to the inspection agent, unchecked by the workflow, never starts a
    child; the model is told the policy refused it."""
    script = [turn(call("inspect_damage", task="Inspect o-1051.")), turn(text="done")]
    request = scripted_request(script, role="viewer")
    async with build_worker(client, config=worker_config, extra_workflows=[RogueAgentWorkflow]):
        handle = await client.start_workflow(
            "RogueAgentWorkflow",
            request,
            id=f"rogue-child-{task_queue}",
            task_queue=task_queue,
            result_type=AgentResult,
        )
        result = await handle.result()
        started = [
            e
            async for e in handle.fetch_history_events()
            if e.HasField("start_child_workflow_execution_initiated_event_attributes")
        ]
    assert result.status == "completed"
    assert started == []
    assert service.get("/v1/inspections?order_id=o-1051") == []
