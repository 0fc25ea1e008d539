"""The README's try-it inputs (examples/scripts/) run as the README says they do."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from spine.client.cli import load_script, load_sub_agent_scripts
from spine.client.runs import decide, get_run, get_state, start_run, wait_result
from spine.client.testing import child_runs, turn_timings
from spine.contract import AgentRequest, ApprovalDecision, ModelChoice, sub_agent_workflow_id
from tests.helpers import eventually

SCRIPTS = Path(__file__).resolve().parent.parent / "examples" / "scripts"


def _request(turns, goal: str) -> AgentRequest:  # type: ignore[no-untyped-def]
    return AgentRequest(
        agent="refund-agent",
        goal=goal,
        user="alice",
        role="support",
        account="acme",
        model=ModelChoice(provider="scripted", script=turns),
    )


async def test_parallel_lookups_and_store_credit(client, make_worker, task_queue):
    lookups = load_script(SCRIPTS / "parallel-lookups.json")
    credit = load_script(SCRIPTS / "store-credit.json")
    async with make_worker():
        first = await start_run(client, _request(lookups, "Check orders."), task_queue=task_queue)
        second = await start_run(client, _request(credit, "Say sorry."), task_queue=task_queue)
        results = [await wait_result(first), await wait_result(second)]
    assert [r.status for r in results] == ["completed", "completed"]
    assert (await turn_timings(first))[1].max_concurrent == 5
    assert [e.tool for e in results[1].side_effects] == ["issue_store_credit"]


async def test_inspection_hands_over_to_the_sub_agent(client, make_worker, task_queue):
    path = SCRIPTS / "inspection.json"
    model = ModelChoice(
        provider="scripted", script=load_script(path), sub_agents=load_sub_agent_scripts(path)
    )
    request = _request(model.script, "Order o-1020 arrived broken; get it inspected.")
    request.model = model
    async with make_worker():
        handle = await start_run(client, request, task_queue=task_queue)
        child = get_run(
            client,
            sub_agent_workflow_id(
                f"{handle.id}/{handle.first_execution_run_id}/2/0", "inspection-agent"
            ),
        )

        async def child_waits() -> bool:
            return bool((await get_state(child)).pending_approvals)

        await eventually(child_waits, what="the inspection report's approval (80.00 > 50.00)")
        [pending] = (await get_state(child)).pending_approvals
        await decide(
            child,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
            ),
        )
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert [c.id for c in await child_runs(handle)] == [child.id]
    assert [e.tool for e in result.side_effects] == ["file_inspection"]


def test_a_bad_sub_agent_script_is_one_line_naming_the_agent(tmp_path):
    bad = tmp_path / "bad.json"
    children = {"inspection-agent": [{"confidence": "sure"}]}
    bad.write_text(json.dumps({"script": [{"text": "hi"}], "sub_agents": children}))
    with pytest.raises(click.UsageError) as refused:
        load_sub_agent_scripts(bad)
    message = refused.value.format_message()
    assert "sub_agents.inspection-agent" in message and "\n" not in message
