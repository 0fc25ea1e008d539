"""What a workflow-side guard needs from the run it guards, passed in as plain functions.

In a workflow they are Temporal's APIs (`workflow.wait_condition`, `workflow.uuid4`, the audit
local activity, search-attribute upserts); in a unit test they are fakes, so every guard's logic
is tested without a server. Pure: a sandbox passthrough module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from spine.contract import RunStatus

Record = Callable[..., None]
"""Queue an audit entry: ``record(kind, actor, **data)``."""
Wait = Callable[[Callable[[], bool], timedelta | None], Awaitable[None]]
"""Wait until the condition holds; raise TimeoutError after the timeout (None: no timeout)."""


@dataclass(frozen=True)
class RunHooks:
    """The run's side of every guard."""

    record: Record
    """Queue an audit entry for the run (written in order with the next write)."""
    flush: Callable[[], Awaitable[None]]
    """Write the queued audit entries now (the run parks while the audit store is down)."""
    wait: Wait
    """A durable wait: a person or an operator answers, or the timeout passes."""
    set_status: Callable[[RunStatus, str | None], None]
    """The run's status and its reason, as the `state` query and search attributes show it."""
    new_id: Callable[[], str]
    """A short id, unique in the run and the same on replay (`workflow.uuid4`)."""
    warn: Callable[[str], None]
    """Log a warning (the workflow logger, quiet on replay)."""
    now: Callable[[], datetime] | None = None
    """Workflow time (`workflow.now`), for what the `state` query shows; None: not shown."""
