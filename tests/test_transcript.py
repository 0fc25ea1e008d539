"""The transcript store: prefix checks, constant-cost appends, and a run that heals a lost one."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from temporalio.api.enums.v1 import EventType

from spine.activities.errors import TranscriptUnavailable
from spine.activities.transcript import TranscriptStore
from spine.client.demo import build_demo_request
from spine.client.runs import start_run, wait_result
from spine.payloads import EMPTY_DIGEST, ChatMessage, chain_digest
from tests.helpers import approve_first_pending, wait_for_status


def _digest(messages: list[ChatMessage]) -> str:
    value = EMPTY_DIGEST
    for message in messages:
        value = chain_digest(value, message)
    return value


def _messages(start: int, count: int) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=f"message {i}") for i in range(start, start + count)]


@pytest.mark.parametrize("load", [True, False])
async def test_extend_checks_the_prefix_and_appends(tmp_path, load: bool):
    store = TranscriptStore(tmp_path / "t.db")
    first, second = _messages(0, 3), _messages(3, 2)
    assert await store.extend("t", 0, EMPTY_DIGEST, first, load=load) == first
    got = await store.extend("t", 3, _digest(first), second, load=load)
    assert got == (first + second if load else second)
    # A retried call (same prefix, same messages) is a no-op that answers the same.
    again = await store.extend("t", 3, _digest(first), second, load=load)
    assert again == got
    assert await store.extend("t", 5, _digest(first + second), [], load=True) == first + second


@pytest.mark.parametrize("load", [True, False])
async def test_a_prefix_the_store_does_not_have_is_named(tmp_path, load: bool):
    store = TranscriptStore(tmp_path / "t.db")
    await store.extend("t", 0, EMPTY_DIGEST, _messages(0, 2))
    with pytest.raises(TranscriptUnavailable, match="store has 2 messages .* expects 4"):
        await store.extend("t", 4, _digest(_messages(0, 4)), [], load=load)
    with pytest.raises(TranscriptUnavailable, match="store has 2 messages"):
        await store.extend("t", 2, _digest(_messages(5, 2)), [], load=load)  # wrong content
    with pytest.raises(TranscriptUnavailable, match="store has 0 messages"):
        await store.extend("other", 2, _digest(_messages(0, 2)), [], load=load)


async def test_a_run_whose_transcript_was_lost_resends_it_and_completes(
    client, make_worker, task_queue, worker_config
):
    """Rows deleted while the run waits for approval: the next model call finds the prefix
    missing, the workflow resends everything it said, and the run completes."""
    async with make_worker():
        handle = await start_run(client, build_demo_request("o-1065"), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        # A run's transcript is keyed by its workflow id and first run id.
        transcript = f"{handle.id}/{handle.first_execution_run_id}"
        with sqlite3.connect(worker_config.state_dir / "state.db") as db:
            deleted = db.execute(
                "DELETE FROM spine_transcript WHERE transcript_id = ?", (transcript,)
            ).rowcount
        assert deleted > 0
        await approve_first_pending(handle, state)
        result = await asyncio.wait_for(wait_result(handle), timeout=120)
    assert result.status == "completed", result.reason
    events = (await handle.fetch_history()).events
    failures = [
        e.activity_task_failed_event_attributes.failure.application_failure_info.type
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert failures == ["TranscriptUnavailable"]
    with sqlite3.connect(worker_config.state_dir / "state.db") as db:
        (stored,) = db.execute(
            "SELECT count(*) FROM spine_transcript WHERE transcript_id = ?", (transcript,)
        ).fetchone()
    assert stored > deleted  # everything resent, plus what came after
