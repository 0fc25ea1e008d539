"""A run's audit trail, workflow side: entries numbered and queued as decisions are made.

Every guard records what it decided through :meth:`AuditTrail.record`; the entry gets the run's
next sequence number (kept in the run state, so the chain spans continue-as-new), the step, the
workflow's clock and the policy version. The queue is written in order, either riding along with
the next model call (the model activity stores it before calling the model, saving a round trip
per step) or through the ``spine.audit_append`` local activity when the run waits, continues as
new or ends. The store (:mod:`spine.observability.audit`) chains and verifies the entries.

Deterministic (the clock is the workflow's): a sandbox passthrough module.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from spine.payloads import Appended, AuditBatch, AuditEntry, AuditKind
from spine.workflows.state import RunState


class AuditTrail:
    """The run's queue of audit entries not yet stored."""

    def __init__(
        self,
        state: RunState,
        *,
        run_id: str,
        workflow_run_id: str,
        agent: str,
        account: str,
        now: Callable[[], datetime],
    ) -> None:
        self.state = state
        self.run_id = run_id
        """The audit chain this trail writes: ``<workflow id>:<first run id>``."""
        self._header = {
            "run_id": run_id,
            "workflow_run_id": workflow_run_id,
            "agent": agent,
            "account": account,
        }
        self._now = now
        self._queue: list[AuditEntry] = []
        self.observers: list[Callable[[AuditEntry], None]] = []
        """Called with each entry as it is recorded (the run's live stream)."""

    def record(self, kind: AuditKind, actor: str, **data: object) -> None:
        """Queue an entry; the next write stores it."""
        spec = self.state.spec
        entry = AuditEntry(
            seq=self.state.audit_seq,
            kind=kind,
            step=self.state.step,
            actor=actor,
            at=self._now().isoformat(),
            data=data,
            policy_version=spec.policy_version if spec else "",
        )
        self._queue.append(entry)
        self.state.audit_seq += 1
        for observe in self.observers:
            observe(entry)

    def batch(self) -> AuditBatch | None:
        """Everything queued, in order, as one batch; None when nothing is."""
        if not self._queue:
            return None
        return AuditBatch(entries=list(self._queue), **self._header)

    def stored(self, count: int, anchor: Appended | None = None) -> None:
        """The first `count` queued entries are stored; `anchor` is where the store says the
        chain now stands (kept in the run state: the run's result reports it)."""
        del self._queue[:count]
        if anchor is not None and anchor.entries >= self.state.audit_stored:
            self.state.audit_stored, self.state.audit_head = anchor.entries, anchor.head

    def stored_batch(self, batch: AuditBatch, anchor: Appended | None = None) -> None:
        """`batch` is stored: drop its entries (by seq, so overlapping writes of calls of one
        turn drop each once); `anchor` as for :meth:`stored`."""
        if batch.entries:
            last = batch.entries[-1].seq
            self._queue = [e for e in self._queue if e.seq > last]
        if anchor is not None and anchor.entries >= self.state.audit_stored:
            self.state.audit_stored, self.state.audit_head = anchor.entries, anchor.head
