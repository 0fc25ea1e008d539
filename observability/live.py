"""Publishing to a run's live stream from workflow code, outside history.

The worker registers its stream sink for its task queue (:func:`register`); workflow code calls
:func:`publish` (the audit trail does for every entry it records, the tool calls for every tool
they schedule). Publishing makes no command and changes no workflow state, so it cannot affect
replay; it is skipped while history is replayed, and each event's key (unique per run) drops a
repeat from a re-executed workflow task. The sink hands events to a task on the worker's event
loop without blocking the workflow thread.

Stdlib and ``temporalio.workflow`` only: a sandbox passthrough module (one registry per process,
shared by the workflows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from temporalio import workflow

if TYPE_CHECKING:
    from spine.payloads import AuditEntry

JsonObject = dict[str, object]

Publish = Callable[[str, str, str, JsonObject, str], None]
"""``publish(run_id, key, kind, data, at)``: hand one event to a worker's sink."""

_SINKS: dict[str, Publish] = {}


def register(task_queue: str, publish: Publish) -> None:
    """Route the live events of runs on `task_queue` to `publish` (a worker's sink)."""
    _SINKS[task_queue] = publish


def unregister(task_queue: str, publish: Publish | None = None) -> None:
    """Stop routing `task_queue`'s events (only if still routed to `publish`, when given)."""
    if publish is None or _SINKS.get(task_queue) is publish:
        _SINKS.pop(task_queue, None)


def publish(key: str, kind: str, data: JsonObject) -> None:
    """From workflow code: add an event to the current run's stream (not while replaying)."""
    if workflow.unsafe.is_replaying():
        return
    info = workflow.info()
    sink = _SINKS.get(info.task_queue)
    if sink is None:
        return
    sink(info.workflow_id, key, kind, data, workflow.now().isoformat())


def publish_entry(entry: AuditEntry) -> None:
    """An audit entry the run just recorded, as a `step` event (`end` for the run's outcome)."""
    publish(
        f"audit:{entry.seq}",
        "end" if entry.kind == "run_outcome" else "step",
        {
            "seq": entry.seq,
            "kind": entry.kind,
            "step": entry.step,
            "actor": entry.actor,
            "data": entry.data,
        },
    )
