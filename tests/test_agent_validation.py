"""Untrusted model output: unknown tools, bad arguments and refused roles never run anything."""

from __future__ import annotations

from spine.client.runs import start_run, wait_result
from spine.client.testing import DemoService
from spine.contract import ScriptToolCall
from tests.helpers import call, policy_file, scripted_request, turn


async def _run(client, make_worker, task_queue, script, policy_path=None, **kw):
    async with make_worker(**({"policy_path": policy_path} if policy_path else {})):
        handle = await start_run(client, scripted_request(script, **kw), task_queue=task_queue)
        return handle, await wait_result(handle)


async def _tool_messages(handle) -> list[str]:
    """Tool results the model was shown, read back from the model activities' inputs."""
    texts = []
    async for event in handle.fetch_history_events():
        attrs = event.activity_task_scheduled_event_attributes
        if attrs.activity_type.name == "spine.model_call":
            data = attrs.input.payloads[0].data.decode()
            texts.append(data)
    return texts


async def test_invalid_calls_are_returned_to_the_model(
    client, make_worker, task_queue, service: DemoService
):
    """Unknown tool, malformed JSON and a schema violation each come back as an error."""
    script = [
        turn(call("delete_database", everything=True)),
        turn(ScriptToolCall(name="issue_refund", raw_args='{"order_id": "o-1003", amount: 5')),
        turn(call("issue_refund", order_id="o-1003", amount=-5)),
        turn(text="I could not do it."),
    ]
    handle, result = await _run(client, make_worker, task_queue, script)
    # The refund never happened, so the run does not complete (on_failed_side_effect = "fail").
    assert result.status == "failed" and "issue_refund" in (result.reason or "")
    assert [c.outcome for c in result.failed_calls] == ["refused"] * 3
    assert result.side_effects == []
    assert service.get("/v1/refunds?order_id=o-1003") == []
    shown = "\n".join(await _tool_messages(handle))
    assert "unknown tool 'delete_database'" in shown
    assert "are not a JSON object" in shown
    assert "invalid arguments for 'issue_refund'" in shown and "amount" in shown


async def test_too_many_invalid_calls_fail_the_run(client, make_worker, task_queue):
    """A model that keeps calling a missing tool ends the run with a reason naming it."""
    script = [turn(call("nope")) for _ in range(6)]
    _, result = await _run(client, make_worker, task_queue, script)
    assert result.status == "failed"
    assert "too many invalid tool calls" in (result.reason or "")
    assert "'nope'" in (result.reason or "")


async def test_role_without_tool_is_refused(client, make_worker, task_queue, service: DemoService):
    """A viewer's refund call is refused and never reaches the business service."""
    script = [
        turn(call("issue_refund", order_id="o-1004", amount=10.0)),
        turn(text="Not allowed."),
    ]
    handle, result = await _run(client, make_worker, task_queue, script, role="viewer")
    assert result.status == "failed"  # the refund it was asked for did not happen
    assert "not allowed for role 'viewer'" in result.failed_calls[0].reason
    assert service.get("/v1/refunds?order_id=o-1004") == []
    assert "not allowed for role 'viewer'" in "\n".join(await _tool_messages(handle))


async def test_business_error_is_shown_to_the_model(client, make_worker, task_queue, tmp_path):
    """A refund above the order total comes back as an error the model can react to; the
    policy here lets the run complete after it (``on_failed_side_effect = "complete"``)."""
    script = [
        turn(call("issue_refund", order_id="o-1005", amount=99.0), confidence=0.9),
        turn(call("issue_refund", order_id="o-1005", amount=99.0), confidence=0.9),
        turn(call("issue_refund", order_id="o-1005", amount=99.0), confidence=0.9),
        turn(text="Refunded what I could."),
    ]
    policy = policy_file(tmp_path, runtime={"on_failed_side_effect": "complete"})
    handle, result = await _run(client, make_worker, task_queue, script, policy_path=policy)
    assert result.status == "completed", result.reason
    assert [s.output["amount"] for s in result.side_effects] == [99.0, 99.0]
    assert [c.outcome for c in result.failed_calls] == ["failed"]
    assert "ToolFailed" in "\n".join(await _tool_messages(handle))


async def test_unknown_agent_fails_with_clear_reason(client, make_worker, task_queue):
    """Asking for an agent the worker does not serve fails the run and names the agent."""
    request = scripted_request([turn(text="hi")])
    request.agent = "ghost-agent"
    async with make_worker():
        handle = await start_run(client, request, task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "failed"
    assert "ghost-agent" in (result.reason or "") and "refund-agent" in (result.reason or "")


async def test_model_without_price_is_refused(client, make_worker, task_queue):
    """A model missing from the price table is refused before any call is made."""
    async with make_worker():
        request = scripted_request([turn(text="hi")], name="mystery-model")
        handle = await start_run(client, request, task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "failed"
    assert "'mystery-model' has no price" in (result.reason or "")
    assert result.steps == 0
