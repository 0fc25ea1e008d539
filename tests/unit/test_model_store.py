"""What the model activity stores before it asks the model, without a server: the transcript's
new messages and the run's queued audit entries are written at once, and a failure of either
stops the call before the model is asked."""

from __future__ import annotations

import asyncio

import pytest

from spine.activities.errors import AuditWriteFailed, TranscriptUnavailable
from spine.activities.llm import ModelActivities
from spine.activities.tools import Registry
from spine.guardrails.policy import load_policy
from spine.payloads import (
    EMPTY_DIGEST,
    Appended,
    AuditBatch,
    AuditEntry,
    ChatMessage,
    ModelCallInput,
)

ANCHOR = Appended(new=1, entries=1, head="h")
MESSAGE = ChatMessage(role="user", content="refund order o-1")


def _call(*, audit: bool = True) -> ModelCallInput:
    entry = AuditEntry(seq=0, kind="run_started", step=0, actor="alice", at="2026-12-07T00:00:00")
    batch = AuditBatch(run_id="r", workflow_run_id="w", agent="a", account="acme", entries=[entry])
    return ModelCallInput(
        transcript_id="r",
        base_len=0,
        base_digest=EMPTY_DIGEST,
        new_messages=[MESSAGE],
        provider="scripted",
        model="scripted",
        step=1,
        audit=batch if audit else None,
    )


class _Writes:
    """A transcript store and an audit store whose writes each wait until both have begun."""

    def __init__(self, *, fail: str | None = None) -> None:
        self.both = asyncio.Barrier(2)
        self.fail = fail
        self.began: list[str] = []

    async def _write(self, name: str) -> None:
        self.began.append(name)
        await asyncio.wait_for(self.both.wait(), 30)  # a write made after the other times out
        if self.fail == name:
            raise TranscriptUnavailable("gone") if name == "transcript" else OSError("disk full")

    async def extend(self, *args: object, **kwargs: object) -> list[ChatMessage]:
        await self._write("transcript")
        return [MESSAGE]

    async def audit_append(self, batch: AuditBatch) -> Appended:
        await self._write("audit")
        return ANCHOR


def _activities(writes: _Writes) -> ModelActivities:
    return ModelActivities(
        Registry(),
        load_policy(),
        writes,  # type: ignore[arg-type]  # extend is all the model activity uses here
        {},
        audit_append=writes.audit_append,
    )


async def test_the_transcript_and_the_audit_entries_are_written_at_once() -> None:
    writes = _Writes()
    messages, anchor = await _activities(writes)._store(_call())
    assert (messages, anchor) == ([MESSAGE], ANCHOR)
    assert sorted(writes.began) == ["audit", "transcript"]


async def test_without_audit_entries_only_the_transcript_is_written() -> None:
    writes = _Writes()
    writes.both = asyncio.Barrier(1)
    assert await _activities(writes)._store(_call(audit=False)) == ([MESSAGE], None)
    assert writes.began == ["transcript"]


@pytest.mark.parametrize(
    ("fail", "error"), [("audit", AuditWriteFailed), ("transcript", TranscriptUnavailable)]
)
async def test_a_failed_write_stops_the_call_with_its_own_error(
    fail: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await _activities(_Writes(fail=fail))._store(_call())
