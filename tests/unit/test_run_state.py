"""RunState, without a server: the state forks fold from history is the state the run held."""

from __future__ import annotations

import json
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter

from spine.client.forks import history_of, state_at
from spine.contract import AgentResult
from spine.workflows.state import AgentWorkflowInput, RunState

HISTORIES = Path(__file__).parents[1] / "histories"
#: What a fold rebuilds. Audit numbering, ledger settlements and the path are each run's own.
FOLDED = {
    "step",
    "usage",
    "side_effects",
    "transcript_len",
    "transcript_digest",
    "pending_messages",
    "invalid_calls",
    "retries",
    "untrusted",
    "untrusted_seen",
    "context_bytes",
    "spec",
}


def _events(name: str) -> WorkflowHistory:
    return WorkflowHistory.from_json(f"history-{name}", (HISTORIES / f"{name}.json").read_text())


async def test_folding_a_run_gives_the_state_it_continued_as_new_with():
    """Run 1 of the continue-as-new chain, folded, equals the carry run 2 started from."""
    first, second = _events("continue-as-new.1"), _events("continue-as-new.2")
    history = await history_of(
        "history-continue-as-new", [("run-1", first.events)], pydantic_data_converter
    )
    [started] = await pydantic_data_converter.decode(
        second.events[0].workflow_execution_started_event_attributes.input.payloads,
        [AgentWorkflowInput],
    )
    carry = started.carry
    assert isinstance(carry, RunState) and carry.step > 1
    folded = await state_at(history, carry.step, pydantic_data_converter)
    assert folded.model_dump(include=FOLDED) == carry.model_dump(include=FOLDED)
    assert folded.budget.last_input_tokens == carry.budget.last_input_tokens


async def test_folding_a_finished_run_gives_its_result():
    """The demo run (lookup, approved refund, email, ticket), folded, has its result's numbers."""
    recorded = _events("demo-approval")
    history = await history_of(
        "history-demo-approval", [("run-1", recorded.events)], pydantic_data_converter
    )
    completed = recorded.events[-1].workflow_execution_completed_event_attributes
    [result] = await pydantic_data_converter.decode(completed.result.payloads, [AgentResult])
    folded = await state_at(history, result.steps, pydantic_data_converter)
    assert folded.usage == result.usage
    assert folded.retries == result.retries
    assert [e.model_dump() for e in folded.side_effects] == [
        e.model_dump() for e in result.side_effects
    ]
    assert [e.tool for e in folded.side_effects] == ["issue_refund", "send_email", "update_ticket"]
    assert json.loads(folded.pending_messages[0].model_dump_json())["role"] == "assistant"
