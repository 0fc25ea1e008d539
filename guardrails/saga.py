"""The saga: a run that fails, is rejected, aborted or cancelled undoes its side effects.

Every completed side effect is in the run state with the tool that undoes it (recorded by
:func:`~spine.workflows.state.apply_tool_result`). :meth:`Saga.compensate` runs those tools in
reverse order, each with the idempotency key ``<key>/undo`` so a retried compensation is still
done once, and reports what could not be undone (no compensation declared, or it failed) so the
run says so in its reason.

Deterministic; the undo itself is a function the caller passes in (a tool activity in the
workflow, a fake in a unit test). A sandbox passthrough module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from temporalio.exceptions import FailureError

from spine.activities.errors import failure_text
from spine.contract import SideEffect
from spine.guardrails.hooks import Record
from spine.payloads import ToolDescriptor
from spine.workflows.state import RunState

Undo = Callable[[ToolDescriptor, SideEffect, str], Awaitable[object]]
"""Run the compensation tool for a side effect with an idempotency key; raise if it fails."""


def undo_key(effect: SideEffect) -> str:
    """The idempotency key of the compensation of `effect`."""
    return f"{effect.idempotency_key}/undo"


class Saga:
    """Undo a run's completed side effects, newest first."""

    def __init__(self, state: RunState, record: Record) -> None:
        self.state = state
        self._record = record

    def pending(self) -> bool:
        """Whether anything done is not undone yet."""
        return any(not e.compensated for e in self.state.side_effects)

    async def compensate(self, undo: Undo) -> list[str]:
        """Undo completed side effects in reverse order; returns what could not be undone."""
        by_name = {t.name: t for t in self.state.agent.tools}
        leftovers = []
        for effect in reversed(self.state.side_effects):
            if effect.compensated:
                continue
            tool = by_name.get(effect.compensation or "")
            if tool is None:
                leftovers.append(f"{effect.tool}@step{effect.step} (no compensation)")
                continue
            key = undo_key(effect)
            try:
                await undo(tool, effect, key)
            except FailureError as err:
                kind, message = failure_text(err)
                leftovers.append(f"{effect.tool}@step{effect.step} ({kind}: {message})")
                self._record(
                    "compensation",
                    "spine",
                    tool=tool.name,
                    compensates=effect.tool,
                    outcome="error",
                    error=f"{kind}: {message}",
                    idempotency_key=key,
                )
                continue
            effect.compensated = True
            self._record(
                "compensation",
                "spine",
                tool=tool.name,
                compensates=effect.tool,
                outcome="ok",
                idempotency_key=key,
            )
            self.state.path.append(f"compensated {effect.tool}@step{effect.step} with {tool.name}")
        return leftovers
