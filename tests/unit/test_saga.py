"""Saga, without a server: undo completed side effects newest first, report what stays done."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from spine.contract import SideEffect
from spine.guardrails.saga import Saga, undo_key
from spine.payloads import ToolDescriptor
from tests.unit.kit import FakeRun, state


def effect(step: int, tool: str, compensation: str | None) -> SideEffect:
    return SideEffect(
        step=step,
        call_id=f"call_{step}_0",
        tool=tool,
        args={"order_id": "o-1001"},
        output={"ok": True},
        idempotency_key=f"wf/{step}/0",
        compensation=compensation,
    )


async def test_a_saga_undoes_what_it_can_in_reverse_order():
    """Refund and email are undone, newest first; the ticket has no compensation and stays."""
    run = FakeRun()
    effects = [
        effect(1, "issue_refund", "reverse_refund"),
        effect(2, "send_email", "send_correction_email"),
        effect(3, "update_ticket", None),
    ]
    saga = Saga(state(side_effects=effects), run.record)
    undone: list[tuple[str, str]] = []

    async def undo(tool: ToolDescriptor, done: SideEffect, key: str) -> None:
        undone.append((tool.name, key))

    assert saga.pending()
    leftovers = await saga.compensate(undo)
    assert undone == [("send_correction_email", "wf/2/0/undo"), ("reverse_refund", "wf/1/0/undo")]
    assert leftovers == ["update_ticket@step3 (no compensation)"]
    assert [e.compensated for e in effects] == [True, True, False]
    assert await saga.compensate(undo) == ["update_ticket@step3 (no compensation)"]
    assert len(undone) == 2, "what was undone is not undone twice"


async def test_a_failed_compensation_is_reported_and_left_for_a_person():
    """An undo that fails names the error; the effect stays marked as not compensated."""
    run = FakeRun()
    refund = effect(1, "issue_refund", "reverse_refund")
    saga = Saga(state(side_effects=[refund]), run.record)

    async def undo(tool: ToolDescriptor, done: SideEffect, key: str) -> None:
        raise ApplicationError("refund already paid out", type="ToolFailed")

    assert await saga.compensate(undo) == [
        "issue_refund@step1 (ToolFailed: refund already paid out)"
    ]
    assert not refund.compensated
    assert run.entries[-1][2]["outcome"] == "error" and run.entries[-1][2][
        "idempotency_key"
    ] == undo_key(refund)
