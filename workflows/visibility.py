"""What a run shows the outside while it runs: its status, the reason, its search attributes.

The `state` query reads :class:`Visibility`'s status and reason; lists and the Web UI read the
search attributes (`SpineAgent`, `SpineAccount`, `SpineStatus`, `SpineSteps`, `SpineCostUSD`).
Only changed attributes are upserted: a status change at once, step and cost progress at most
every ``runtime.progress_every_s`` of the policy (60 s by default) of workflow time. Each upsert
is a history event and a visibility write; under load a step can take seconds, so a short
interval meant an upsert every few steps. The interval is part of the agent spec the run
resolved at its start (recorded in its history), so it replays as decided. Runs whose spec
predates the setting keep the interval they started with: :data:`PROGRESS_EVERY`, or
:data:`LEGACY_PROGRESS_EVERY` for those older than its patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from spine.contract import SA_ACCOUNT, SA_AGENT, SA_COST, SA_STATUS, SA_STEPS, RunStatus
from spine.payloads import AgentSpec
from spine.workflows.state import RunState

#: The interval of runs whose spec has no `progress_every_s` (status: at once).
PROGRESS_EVERY = timedelta(seconds=15)
#: The interval of runs whose history began before the change (they replay with it).
LEGACY_PROGRESS_EVERY = timedelta(seconds=2)
PROGRESS_PATCH = "spine-progress-every-15s"


class Visibility:
    """A run's status, reason and search attributes."""

    def __init__(
        self,
        state: RunState,
        *,
        agent: str,
        account: str,
        now: Callable[[], datetime],
        upsert: Callable[[Sequence[SearchAttributePair]], None],
    ) -> None:
        self.state = state
        self.status: RunStatus = "running"
        self.reason: str | None = None
        self._agent = agent
        self._account = account
        self._now = now
        self._upsert = upsert
        self._sent: dict[str, object] = {}
        self._at: datetime | None = None
        self._every: timedelta | None = None

    def seed(self, current: TypedSearchAttributes) -> None:
        """For a run of the lean shape (`spine.workflows.calls.PATCH_LEAN`, newer than the
        15 s interval, so its own patch is not asked: each patch marker also upserts Temporal's
        `TemporalChangeVersion`): take the run's search attributes as already sent (those its
        start carried, or its previous run's), so only what differs is upserted. What a starter
        set is not trusted: a wrong value differs from the run's own and is overwritten at the
        first publish."""
        self._every = PROGRESS_EVERY
        for pair in current:
            self._sent[pair.key.name] = pair.value

    def _progress_every(self) -> timedelta:
        if self._every is None:
            new = not workflow.in_workflow() or workflow.patched(PROGRESS_PATCH)
            self._every = PROGRESS_EVERY if new else LEGACY_PROGRESS_EVERY
        return self._every

    def _interval(self, spec: AgentSpec) -> timedelta:
        if spec.progress_every_s is not None:
            return timedelta(seconds=spec.progress_every_s)
        return self._progress_every()

    def set(self, status: RunStatus, reason: str | None) -> None:
        """A new status and reason; search attributes follow a change of status at once."""
        self.reason = reason
        if status != self.status:
            self.status = status
            self.publish()

    def publish(self, *, progress: bool = False) -> None:
        """Upsert what changed; with `progress`, at most every :data:`PROGRESS_EVERY`."""
        spec = self.state.spec
        if spec is None or not spec.search_attributes:
            return
        now = self._now()
        if progress and self._at is not None and now - self._at < self._interval(spec):
            return
        pairs = [
            SearchAttributePair(SA_AGENT, self._agent),
            SearchAttributePair(SA_ACCOUNT, self._account),
            SearchAttributePair(SA_STATUS, self.status),
            SearchAttributePair(SA_STEPS, self.state.step),
            SearchAttributePair(SA_COST, self.state.usage.usd),
        ]
        changed = [p for p in pairs if self._sent.get(p.key.name) != p.value]
        self._at = now
        if changed:
            self._upsert(changed)
            self._sent.update({p.key.name: p.value for p in changed})
