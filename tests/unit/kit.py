"""Fakes for testing guards without a server: a run's hooks, and specs from the real policy."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from spine.activities.llm import build_spec
from spine.activities.tools import Registry
from spine.contract import RunStatus
from spine.guardrails.hooks import RunHooks
from spine.guardrails.policy import load_policy
from spine.payloads import AgentSpec, ResolveAgentInput
from spine.plugin import load_registry
from spine.workflows.state import RunState


@functools.cache
def _registry() -> Registry:
    return load_registry(("spine.demo.agent",))


def spec(role: str = "support", account: str = "acme", **changes: object) -> AgentSpec:
    """The refund agent's spec as `spine.resolve_agent` pins it from the default policy."""
    request = ResolveAgentInput(agent="refund-agent", role=role, account=account)
    return build_spec(_registry(), load_policy(), request).model_copy(update=changes)


@dataclass
class FakeRun:
    """What a workflow gives its guards, recorded: audit entries, statuses, waits.

    `answers` are consumed by successive waits: ``"timeout"`` makes the wait time out; a
    callable is called (a person or operator answering) and the condition must then hold.
    """

    answers: list[object] = field(default_factory=list)
    entries: list[tuple[str, str, dict[str, object]]] = field(default_factory=list)
    statuses: list[tuple[RunStatus, str | None]] = field(default_factory=list)
    waits: list[timedelta | None] = field(default_factory=list)
    flushes: int = 0
    warnings: list[str] = field(default_factory=list)
    _ids: int = 0

    def hooks(self) -> RunHooks:
        return RunHooks(
            record=self.record,
            flush=self.flush,
            wait=self.wait,
            set_status=lambda status, reason: self.statuses.append((status, reason)),
            new_id=self.new_id,
            warn=self.warnings.append,
        )

    def record(self, kind: str, actor: str, **data: object) -> None:
        self.entries.append((kind, actor, data))

    def kinds(self) -> list[str]:
        return [
            f"{kind}:{data.get('decision', data.get('outcome', ''))}"
            for kind, _, data in self.entries
        ]

    async def flush(self) -> None:
        self.flushes += 1

    async def wait(self, condition: Callable[[], bool], timeout: timedelta | None) -> None:
        self.waits.append(timeout)
        if condition():
            return
        if not self.answers:
            raise AssertionError("the guard waited, and nobody was scripted to answer")
        answer = self.answers.pop(0)
        if answer == "timeout":
            raise TimeoutError
        answer()  # type: ignore[operator]  # a callable answer
        assert condition(), "the scripted answer did not satisfy the guard's wait"

    def new_id(self) -> str:
        self._ids += 1
        return f"{self._ids:08x}"


def state(**changes: object) -> RunState:
    """A run state for the refund agent (support role, account acme), at step 1."""
    return RunState(spec=spec(), step=1).model_copy(update=changes)
