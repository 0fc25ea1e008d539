"""Sub-agents: the refund agent hands a damaged-goods case to the inspection agent, a child
workflow acting for the same user, with a budget carved from the parent's; rejection, cancel
and compensation cascade; audit chain, trace and Web UI link parent and child."""

from __future__ import annotations

import asyncio
import json

from temporalio.client import Client

from spine.client.forks import load_history, state_at
from spine.client.runs import decide, get_run, get_state, start_run, wait_result
from spine.client.testing import (
    DemoService,
    assert_sub_agents,
    child_runs,
    script,
    scripted_model,
    start_scripted_run,
)
from spine.contract import AgentRequest, ApprovalDecision, Limits, sub_agent_workflow_id
from spine.guardrails.policy import load_policy
from spine.observability.audit import SQLiteAuditStore
from spine.observability.telemetry import telemetry_from_env
from spine.workflows.state import AgentWorkflowInput
from tests.extra_agents import POLICY
from tests.helpers import eventually, policy_file
from tests.test_worker_process import rows

INSPECT = "inspect_damage"


def _key(handle, step: int, index: int) -> str:  # type: ignore[no-untyped-def]
    """The idempotency key of the call at `index` of `step`: the run's key, step, index."""
    return f"{handle.id}/{handle.first_execution_run_id or handle.run_id}/{step}/{index}"


def _inspection(order: str, claim: float) -> list:
    """The inspection agent's script: look the order up, file a report, answer."""
    return (
        script()
        .tool("lookup_order", order_id=order)
        .tool("file_inspection", order_id=order, finding="cracked screen", claim_amount=claim)
        .text(f"Cracked screen on {order}; claimed {claim:.2f} from the carrier.")
    )


async def _entries(state_dir, run_id_prefix: str) -> list:
    store = SQLiteAuditStore(state_dir / "audit.db")
    try:
        runs = [r for r in await store.run_ids() if r.startswith(f"{run_id_prefix}:")]
        assert len(runs) == 1, runs
        return await store.entries(runs[0])
    finally:
        await store.close()


async def test_the_refund_agent_hands_a_case_to_the_inspection_agent(
    client: Client, make_worker, task_queue, service: DemoService, worker_config, tmp_path
):
    """Agent as tool: the child runs as its own workflow, its effects and spend are the parent's
    to account for, and audit, trace and Temporal's own records link the two."""
    order = "o-1380"
    trace_file = tmp_path / "traces.jsonl"
    telemetry = telemetry_from_env({"SPINE_TRACE_FILE": str(trace_file)})
    plugins = telemetry.worker_plugins(load_policy().price_table())
    turns = (
        script()
        .tool("lookup_order", order_id=order)
        .tool(INSPECT, task=f"Order {order} arrived with a cracked screen; inspect it.")
        .text("Inspected; the carrier is claimed.")
    )
    async with make_worker(plugins=plugins):
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "Order arrived broken.",
            turns,
            role="support",
            sub_agents={"inspection-agent": _inspection(order, 30.0)},
        )
        result = await wait_result(handle)
    telemetry.shutdown()
    assert result.status == "completed", result.reason
    [child] = await assert_sub_agents(handle, ["inspection-agent"])
    child_id = sub_agent_workflow_id(_key(handle, 2, 0), "inspection-agent")
    assert child.id == child_id
    child_result = await child.result()
    assert child_result.status == "completed"

    # The tool result the parent's model read is the child's answer.
    [effect] = result.side_effects
    assert effect.tool == "file_inspection" and effect.sub_agent_run == child_id
    [inspection] = await rows(service, "inspections", order)
    assert inspection["idempotency_key"] == effect.idempotency_key == _key(child, 2, 0)
    # The child's spend is the parent's: three parent turns plus three child turns.
    assert child_result.usage.usd > 0
    assert abs(result.usage.usd - 2 * child_result.usage.usd) < 1e-9

    # Temporal knows the child by its parent (what the Web UI shows as a child workflow).
    described = await child.describe()
    assert described.raw_description.workflow_execution_info.parent_execution.workflow_id == (
        handle.id
    )
    # The parent's history holds three events for the child and none of its activities.
    events = (await handle.fetch_history()).events
    kinds = [e.WhichOneof("attributes") for e in events]
    assert kinds.count("start_child_workflow_execution_initiated_event_attributes") == 1
    assert kinds.count("child_workflow_execution_started_event_attributes") == 1
    assert kinds.count("child_workflow_execution_completed_event_attributes") == 1
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert "tool.file_inspection" not in scheduled

    # Audit: the parent records starting and finishing the child, the child names its parent.
    parent_entries = await _entries(worker_config.state_dir, handle.id)
    links = [e.data for e in parent_entries if e.kind == "sub_agent"]
    assert [d["decision"] for d in links] == ["started", "finished"]
    assert links[0]["workflow_id"] == child_id and links[1]["status"] == "completed"
    assert str(links[0]["child_audit_run_id"]).startswith(f"{child_id}:")
    child_entries = await _entries(worker_config.state_dir, child_id)
    [started_by] = [e.data for e in child_entries if e.kind == "sub_agent"]
    assert started_by["workflow_id"] == handle.id and started_by["parent_step"] == 2
    assert str(started_by["parent_audit_run_id"]).startswith(f"{handle.id}:")
    [run_started] = [e for e in child_entries if e.kind == "run_started"]
    assert run_started.data["user"] == "alice" and run_started.data["role"] == "support"

    # A fork's checkpoint after the hand-over holds the child's effect and spend too.
    folded = await state_at(await load_history(client, handle.id), 2, client.data_converter)
    assert [e.idempotency_key for e in folded.side_effects] == [effect.idempotency_key]
    assert folded.side_effects[0].sub_agent_run == child_id
    assert abs(folded.usage.usd - (2 / 3 + 1) * child_result.usage.usd) < 1e-9

    # Trace: the child's run span is in the parent's trace.
    spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    runs = {s["attributes"].get("spine.run.id"): s for s in spans if s["name"].startswith("invoke")}
    assert runs[child_id]["trace_id"] == runs[handle.id]["trace_id"]
    assert runs[child_id]["attributes"]["spine.parent.run_id"] == handle.id


async def test_the_childs_history_stays_flat(client: Client, make_worker, task_queue):
    """A child's history is what the same agent's run has on its own, plus nothing per step."""
    # Seven steps (the inspection agent's max_steps is 8).
    order = "o-1382"
    child_script = script()
    for _ in range(6):
        child_script.tool("lookup_order", order_id=order)
    child_script.text("Looked.")
    turns = script().tool(INSPECT, task="Look the order up a few times.").text("done")
    async with make_worker():
        parent = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "inspect",
            turns,
            role="support",
            sub_agents={"inspection-agent": child_script},
        )
        assert (await wait_result(parent)).status == "completed"
        [child] = await child_runs(parent)
        assert (await child.result()).status == "completed"
        alone = await start_scripted_run(
            client, task_queue, "inspection-agent", "look", child_script, role="support"
        )
        assert (await wait_result(alone)).status == "completed"
    child_events = (await child.fetch_history()).events
    alone_events = (await alone.fetch_history()).events
    assert len(child_events) <= len(alone_events) + 2, (len(child_events), len(alone_events))
    child_bytes = sum(e.ByteSize() for e in child_events)
    alone_bytes = sum(e.ByteSize() for e in alone_events)
    assert child_bytes < alone_bytes * 1.2, (child_bytes, alone_bytes)
    # The parent pays three events for a child of seven steps.
    parent_events = (await parent.fetch_history()).events
    assert len(parent_events) < len(alone_events)


async def test_the_carve_out_cannot_be_exceeded_by_the_child(
    client: Client, make_worker, task_queue
):
    """The parent may spend 0.02 USD: the child gets what is left, however much its own policy
    (0.20) and its script would spend, and parent plus child stay within 0.02."""
    order = "o-1383"
    child_script = script(tokens=(1000, 1000))
    for _ in range(8):
        child_script.tool("lookup_order", order_id=order)
    child_script.text("done")
    turns = script().tool(INSPECT, task="Inspect it, thoroughly.").text("done")
    async with make_worker():
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "inspect",
            turns,
            role="support",
            limits=Limits(max_usd=0.02),
            sub_agents={"inspection-agent": child_script},
        )
        result = await wait_result(handle)
    [child] = await child_runs(handle)
    child_input = await _input(child)
    carve = child_input.limits.max_usd if child_input.limits else None
    first_turn = 100 * 1e-6 + 20 * 4e-6
    assert carve is not None and abs(carve - (0.02 - first_turn)) < 1e-9
    child_result = await child.result()
    assert child_result.status == "failed" and "budget_exhausted" in (child_result.reason or "")
    assert 0 < child_result.usage.usd <= carve
    assert result.usage.usd <= 0.02
    # The parent heard that its sub-agent ran out, and then ran out itself.
    assert result.status == "failed" and "budget_exhausted" in (result.reason or "")


async def _input(child) -> AgentWorkflowInput:
    history = await child.fetch_history()
    payload = history.events[0].workflow_execution_started_event_attributes.input
    [value] = await child._client.data_converter.decode(payload.payloads, [AgentWorkflowInput])
    return value


async def test_a_childs_rejection_compensates_the_parents_earlier_refund(
    client: Client, make_worker, task_queue, service: DemoService
):
    """The parent refunds, then hands the case on; the child's report needs approval and a
    supervisor rejects it: the child ends rejected, so does the parent, and the refund is
    reversed."""
    order = "o-1384"
    turns = (
        script()
        .tool("issue_refund", order_id=order, amount=40.0)
        .confidence(0.95)
        .tool(INSPECT, task=f"Inspect {order}.")
        .text("done")
    )
    async with make_worker():
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "refund and inspect",
            turns,
            role="support",
            sub_agents={"inspection-agent": _inspection(order, 80.0)},
        )
        child = get_run(client, sub_agent_workflow_id(_key(handle, 2, 0), "inspection-agent"))

        async def child_waits() -> bool:
            return bool((await get_state(child)).pending_approvals)

        await eventually(child_waits, what="the child's approval")
        assert (await get_state(handle)).sub_agents == [child.id]
        [pending] = (await get_state(child)).pending_approvals
        assert pending.tool == "file_inspection"
        await decide(
            child,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="reject", by="bob", role="supervisor"
            ),
        )
        result = await wait_result(handle)
    assert (await child.result()).status == "rejected"
    assert result.status == "rejected" and "sub-agent inspection-agent" in (result.reason or "")
    [refund] = await rows(service, "refunds", order)
    assert refund["reversed"]
    assert await rows(service, "inspections", order) == []


async def test_compensating_the_parent_undoes_what_a_finished_child_did(
    client: Client, make_worker, task_queue, service: DemoService
):
    """The child files a report and completes; the parent's next refund is rejected: the
    parent's saga withdraws the child's report (with the child's own key + /undo)."""
    order = "o-1385"
    turns = (
        script()
        .tool(INSPECT, task=f"Inspect {order}.")
        .tool("issue_refund", order_id=order, amount=180.0)
        .confidence(0.95)
        .text("done")
    )
    async with make_worker():
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "inspect then refund",
            turns,
            role="support",
            sub_agents={"inspection-agent": _inspection(order, 30.0)},
        )

        async def waits() -> bool:
            return bool((await get_state(handle)).pending_approvals)

        await eventually(waits, what="the refund's approval")
        [pending] = (await get_state(handle)).pending_approvals
        await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="reject", by="bob", role="supervisor"
            ),
        )
        result = await wait_result(handle)
    assert result.status == "rejected"
    [effect] = result.side_effects
    assert effect.tool == "file_inspection" and effect.compensated
    [inspection] = await rows(service, "inspections", order)
    assert inspection["withdrawn"]


async def test_cancelling_the_parent_cancels_the_child_which_undoes_its_own_effects(
    client: Client, make_worker, task_queue, service: DemoService
):
    """Cancel the parent while its child waits for an approval: the child undoes its first
    report, then the parent reverses its refund."""
    order = "o-1386"
    child_script = (
        script()
        .tool("file_inspection", order_id=order, finding="dent", claim_amount=20.0)
        .tool("file_inspection", order_id=order, finding="crack", claim_amount=90.0)
        .text("filed")
    )
    turns = (
        script()
        .tool("issue_refund", order_id=order, amount=30.0)
        .confidence(0.95)
        .tool(INSPECT, task="Inspect.")
        .text("done")
    )
    async with make_worker():
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "refund and inspect",
            turns,
            role="support",
            sub_agents={"inspection-agent": child_script},
        )
        child = get_run(client, sub_agent_workflow_id(_key(handle, 2, 0), "inspection-agent"))

        async def child_waits() -> bool:
            return bool((await get_state(child)).pending_approvals)

        await eventually(child_waits, what="the child's approval")
        await handle.cancel()
        result = await wait_result(handle)
        child_result = await child.result()
    assert child_result.status == "compensated" and child_result.reason.startswith("cancelled")
    assert result.status == "compensated", result.reason
    [refund] = await rows(service, "refunds", order)
    [inspection] = await rows(service, "inspections", order)
    assert refund["reversed"] and inspection["withdrawn"]


async def test_a_hand_off_ends_the_parent_with_the_childs_answer(
    client: Client, make_worker, task_queue, tmp_path
):
    """With handoff the child's answer is the parent's: no further parent turn is needed."""
    order = "o-1387"
    policy = policy_file(tmp_path)
    policy.write_text(policy.read_text() + POLICY)
    async with make_worker(
        policy_path=policy, agent_modules=("spine.demo.agent", "tests.extra_agents")
    ):
        handle = await start_scripted_run(
            client,
            task_queue,
            "triage-agent",
            "broken",
            script().tool("hand_to_inspection", task=f"{order} is broken."),
            role="support",
            sub_agents={"inspection-agent": _inspection(order, 10.0)},
        )
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert result.output == f"Cracked screen on {order}; claimed 10.00 from the carrier."
    assert result.steps == 1
    [child] = await child_runs(handle)
    child_input = await _input(child)
    assert child_input.limits is not None and child_input.limits.max_usd == 0.05


async def test_a_starter_cannot_claim_a_parent(client: Client, make_worker, task_queue):
    """A run started with a forged `parent` link is refused before it does anything."""
    request = AgentWorkflowInput(
        agent="inspection-agent",
        goal="pretend",
        user="mallory",
        role="support",
        account="acme",
        model=scripted_model(script().text("hi")),
        parent={  # type: ignore[arg-type]  # validated into ParentRun
            "workflow_id": "someone-elses-run",
            "agent": "refund-agent",
            "tool": INSPECT,
            "step": 1,
            "call_id": "c",
            "audit_run_id": "someone-elses-run:x",
            "principal": "mallory",
        },
    )
    async with make_worker():
        handle = await client.start_workflow(
            "AgentWorkflow", request, id=f"forged-{task_queue}", task_queue=task_queue
        )
        result = await get_run(client, handle.id).result()
    assert result.status == "failed" and "was not started by it" in (result.reason or "")
    assert result.steps == 0


async def test_nesting_deeper_than_the_policy_allows_is_refused(
    client: Client, make_worker, task_queue, tmp_path, worker_config
):
    """With max_sub_agent_depth = 0 the call is refused and the model told; no child starts."""
    policy = policy_file(tmp_path, runtime={"max_sub_agent_depth": 0})
    turns = script().tool(INSPECT, task="Inspect.").text("could not")
    async with make_worker(policy_path=policy):
        handle = await start_run(
            client,
            AgentRequest(
                agent="refund-agent",
                goal="inspect",
                user="alice",
                role="support",
                account="acme",
                model=scripted_model(turns),
            ),
            task_queue=task_queue,
        )
        result = await wait_result(handle)
    assert result.status == "completed"
    assert await child_runs(handle) == []
    entries = await _entries(worker_config.state_dir, handle.id)
    [refused] = [e.data for e in entries if e.data.get("decision") == "refused"]
    assert "may nest 0 deep" in str(refused["reason"])


async def test_two_sub_agents_of_one_turn_share_the_parents_budget(
    client: Client, make_worker, task_queue
):
    """Parallel sub-agent calls: each carve comes out of what the others left."""
    turns = (
        script()
        .parallel((INSPECT, {"task": "first"}), (INSPECT, {"task": "second"}))
        .text("both done")
    )
    child = script().text("ok")
    async with make_worker():
        handle = await start_scripted_run(
            client,
            task_queue,
            "refund-agent",
            "two inspections",
            turns,
            role="support",
            limits=Limits(max_usd=0.15),
            sub_agents={"inspection-agent": child},
        )
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    children = await child_runs(handle)
    carves = sorted([(await _input(c)).limits.max_usd for c in children])  # type: ignore[union-attr]
    first_turn = 100 * 1e-6 + 20 * 4e-6
    assert carves[1] == 0.10  # the tool's max_usd
    assert abs(carves[0] - (0.15 - first_turn - 0.10)) < 1e-9  # what the first left
    assert await asyncio.gather(*(c.result() for c in children))
