"""The notes agent (examples/notes_agent), tested the way a user would: with the test kit."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from examples.notes_agent.store import SummaryStore
from spine.client.runs import decide
from spine.client.testing import (
    VaultDev,
    assert_approvals_asked,
    assert_side_effects,
    assert_spend_at_most,
    assert_tools_called,
    script,
    spine_worker,
    start_scripted_run,
)
from spine.client.tools_cli import tools
from spine.contract import ApprovalDecision, ScriptToolCall, ScriptTurn, TokenUsage
from spine.guardrails.secrets import VaultSecrets
from tests.helpers import wait_for_status

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "notes_agent"
#: An account with no budget in the policy, so other tests' spending on "acme" does not count.
ACCOUNT = "notes-tests"
SUMMARY = "Billing export ships in May; two platform hires; legacy importer retired."


@pytest.fixture
def store(tmp_path: Path) -> SummaryStore:
    return SummaryStore(tmp_path / "notes.db")


@pytest.fixture
def notes_worker(vault: VaultDev):
    """A notes-agent worker; principals' keys come from the test OpenBao (`vault`)."""

    def make(client, store: SummaryStore):
        return spine_worker(
            client,
            agent_modules=("examples.notes_agent",),
            policy_path=EXAMPLE / "policy.toml",
            settings={"NOTES_DB": str(store.path)},
            identity=VaultSecrets(vault.url, token=vault.token),
        )

    return make


def test_script_builder_makes_scripted_turns() -> None:
    """`script()` builds the scripted model's turns fluently, as a list of ScriptTurn."""
    turns = script(tokens=(10, 2)).tool("read_note", note_id="n-1").also("read_note", note_id="n-2")
    turns.confidence(0.5).text("done").usage(7, 3)
    usage = TokenUsage(input_tokens=10, output_tokens=2)
    assert turns == [
        ScriptTurn(
            tool_calls=[
                ScriptToolCall(name="read_note", args={"note_id": "n-1"}),
                ScriptToolCall(name="read_note", args={"note_id": "n-2"}),
            ],
            confidence=0.5,
            usage=usage,
        ),
        ScriptTurn(text="done", usage=TokenUsage(input_tokens=7, output_tokens=3)),
    ]


async def test_summary_is_read_and_saved_once(client, store: SummaryStore, notes_worker) -> None:
    """The agent reads the note over MCP and saves one summary, keyed for idempotency."""
    turns = (
        script()
        .tool("read_note", note_id="n-1")
        .tool("save_summary", note_id="n-1", summary=SUMMARY)
        .confidence(0.9)
        .text("Saved a summary of n-1.")
    )
    async with notes_worker(client, store) as worker:
        handle = await start_scripted_run(
            client,
            worker,
            "notes-agent",
            "Summarise note n-1",
            turns,
            role="editor",
            account=ACCOUNT,
        )
        result = await handle.result()
    assert result.status == "completed", result.reason
    await assert_tools_called(handle, ["read_note", "save_summary"])
    [saved] = await assert_side_effects(handle, ["save_summary"], compensated=False)
    await assert_approvals_asked(handle, [])
    await assert_spend_at_most(result, 0.01)
    [row] = store.list()
    assert row["summary"] == SUMMARY and row["idempotency_key"] == saved.idempotency_key


async def test_unsure_summary_waits_for_a_supervisor(
    client, store: SummaryStore, notes_worker
) -> None:
    """A summary proposed with low confidence is saved only after a supervisor approves."""
    turns = (
        script()
        .tool("save_summary", note_id="n-3", summary="Pizza on Friday.")
        .confidence(0.4)
        .text("Saved.")
    )
    async with notes_worker(client, store) as worker:
        handle = await start_scripted_run(
            client,
            worker,
            "notes-agent",
            "Summarise note n-3",
            turns,
            role="editor",
            account=ACCOUNT,
        )
        state = await wait_for_status(handle, "awaiting_approval")
        assert store.list() == []
        [pending] = state.pending_approvals
        await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
            ),
        )
        result = await handle.result()
    assert result.status == "completed", result.reason
    await assert_approvals_asked(handle, ["save_summary"], decisions=["approve"])
    await assert_side_effects(result, ["save_summary"])
    assert len(store.list()) == 1


async def test_rejection_deletes_the_saved_summary(
    client, store: SummaryStore, notes_worker
) -> None:
    """Rejecting the second summary ends the run and compensates the first (deleted)."""
    turns = (
        script()
        .tool("save_summary", note_id="n-1", summary=SUMMARY)
        .confidence(0.95)
        .tool("read_note", note_id="n-2")
        .tool("save_summary", note_id="n-2", summary="Cache TTLs are checked in CI now.")
        .confidence(0.3)
        .text("Saved both.")
    )
    async with notes_worker(client, store) as worker:
        handle = await start_scripted_run(
            client,
            worker,
            "notes-agent",
            "Summarise n-1 and n-2",
            turns,
            role="editor",
            account=ACCOUNT,
        )
        [pending] = (await wait_for_status(handle, "awaiting_approval")).pending_approvals
        await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id,
                decision="reject",
                by="bob",
                role="supervisor",
                reason="too vague",
            ),
        )
        result = await handle.result()
    assert result.status == "rejected", result.reason
    await assert_approvals_asked(handle, ["save_summary"], decisions=["reject"])
    await assert_side_effects(handle, ["save_summary"], compensated=True)
    await assert_tools_called(handle, ["save_summary", "read_note", "delete_summary"])
    assert store.list() == [] and len(store.list(include_deleted=True)) == 1


async def test_viewer_may_read_but_not_save(client, store: SummaryStore, notes_worker) -> None:
    """Role viewer reads notes; its save is refused by policy and nothing is written. The save
    it was asked for did not happen, so the run ends `failed` saying so (the policy's default
    ``on_failed_side_effect = "fail"``), the refusal in `failed_calls`."""
    turns = (
        script()
        .tool("read_note", note_id="n-2")
        .tool("save_summary", note_id="n-2", summary="x")
        .text("I may not save summaries.")
    )
    async with notes_worker(client, store) as worker:
        handle = await start_scripted_run(
            client, worker, "notes-agent", "Summarise n-2", turns, role="viewer", account=ACCOUNT
        )
        result = await handle.result()
    assert result.status == "failed" and "save_summary" in (result.reason or "")
    assert [(c.tool, c.outcome) for c in result.failed_calls] == [("save_summary", "refused")]
    await assert_tools_called(handle, ["read_note"])
    await assert_side_effects(result, [])
    assert store.list(include_deleted=True) == []


def test_notes_agent_contracts_match_its_lock() -> None:
    """`spine tools check` passes for the notes agent, MCP tool included, against its lock."""
    result = CliRunner().invoke(
        tools,
        ["check", "--agents", "examples.notes_agent", "--lock", str(EXAMPLE / "tools.lock.json")],
    )
    assert result.exit_code == 0, result.stderr
    assert "out of date" not in result.stdout
