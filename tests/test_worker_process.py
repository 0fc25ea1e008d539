"""`python worker.py` as a real process: driven by the Temporal CLI, SIGKILLed mid-run, SIGTERMed.

Each test starts its own worker process on a fresh task queue against the session's dev server,
OpenBao and demo service, and waits on conditions (never on bare sleeps).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory

from spine.client.runs import get_run, get_state, start_run, wait_result
from spine.client.testing import (
    DemoService,
    binary,
    start_worker_process,
)
from spine.contract import AgentResult, RunStatus
from tests.helpers import SPINE, call, eventually, scripted_request, signing_env, turn

STATUSES = set(get_args(RunStatus))


async def spawn_worker(
    env: dict[str, str], started: list[subprocess.Popen[bytes]], log_file: Path | None = None
) -> subprocess.Popen[bytes]:
    process = await asyncio.to_thread(start_worker_process, env, log_file=log_file, timeout=120)
    started.append(process)
    return process


async def temporal_cli(env: dict[str, str], *args: str, timeout: float = 120.0) -> dict:
    """Run `temporal ARGS -o json` against the test server and parse its JSON output."""
    process = await asyncio.create_subprocess_exec(
        binary("temporal"),
        *args,
        "--address",
        env["TEMPORAL_ADDRESS"],
        "--namespace",
        env["TEMPORAL_NAMESPACE"],
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        command = " ".join(args)
        raise AssertionError(f"`temporal {command}` did not finish in {timeout:.0f}s") from None
    assert process.returncode == 0, (
        f"`temporal {' '.join(args)}` exited {process.returncode}: {err.decode().strip()}"
    )
    return json.loads(out)


async def rows(service: DemoService, kind: str, order_id: str) -> list[dict]:
    """The service's `kind` rows (refunds, emails, tickets) for `order_id`."""
    return await asyncio.to_thread(service.get, f"/v1/{kind}?order_id={order_id}")  # type: ignore[return-value]


async def test_run_started_by_temporal_cli_completes(
    client: Client, worker_env, worker_processes, service: DemoService
):
    """A run started, queried and awaited with the Temporal CLI completes on `python worker.py`."""
    order = "o-1201"
    workflow_id = f"cli-{uuid.uuid4().hex[:12]}"
    request = {
        "agent": "refund-agent",
        "goal": f"Order {order} arrived late; refund 40.00 and say so.",
        "user": "alice",
        "role": "support",
        "account": "acme",
        "model": {
            "provider": "scripted",
            "script": [
                {"tool_calls": [{"name": "lookup_order", "args": {"order_id": order}}]},
                {
                    "tool_calls": [
                        {
                            "name": "issue_refund",
                            "args": {"order_id": order, "amount": 40.0, "reason": "late"},
                        }
                    ],
                    "confidence": 0.9,
                },
                {"text": f"Refunded 40.00 for {order}.", "confidence": 0.9},
            ],
        },
        "limits": {"max_steps": 10},
    }
    await spawn_worker(worker_env, worker_processes)
    # alice signs the start (as `spine sign` prints it for `--headers`)
    signed = await asyncio.to_thread(
        subprocess.run,
        [SPINE, "sign", "start", "--workflow-id", workflow_id, "--input", json.dumps(request)],
        env={**os.environ, **signing_env(client, "alice")},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    header = signed.stdout.strip()

    started = await temporal_cli(
        worker_env,
        "workflow", "start",
        "--type", "AgentWorkflow",
        "--task-queue", worker_env["SPINE_TASK_QUEUE"],
        "--workflow-id", workflow_id,
        "--input", json.dumps(request),
        "--headers", header,
    )  # fmt: skip
    assert started["workflowId"] == workflow_id and started["runId"]

    answers: list[dict] = []

    async def state_answered() -> bool:
        answers.append(
            await temporal_cli(
                worker_env, "workflow", "query", "--name", "state", "--workflow-id", workflow_id
            )
        )
        return True

    await eventually(state_answered, timeout=60, what="the CLI's state query to answer")
    [state] = answers[-1]["queryResult"]
    assert state["status"] in STATUSES and isinstance(state["step"], int)

    done = await temporal_cli(worker_env, "workflow", "result", "--workflow-id", workflow_id)
    assert done["status"] == "COMPLETED", done
    assert done["result"]["status"] == "completed", done["result"]
    assert done["result"]["output"] == f"Refunded 40.00 for {order}."
    assert done["result"]["steps"] == 3

    after = await temporal_cli(
        worker_env, "workflow", "query", "--name", "state", "--workflow-id", workflow_id
    )
    assert after["queryResult"][0]["status"] == "completed"
    assert after["queryResult"][0]["step"] == 3

    # The Python client reads the same run with Spine's models.
    typed = await wait_result(get_run(client, workflow_id))
    assert isinstance(typed, AgentResult) and typed.status == "completed"
    assert [s.tool for s in typed.side_effects] == ["issue_refund"]
    refunds = await rows(service, "refunds", order)
    assert [r["amount"] for r in refunds] == [40.0]
    assert refunds[0]["idempotency_key"] == typed.side_effects[0].idempotency_key


@dataclass
class Recovery:
    """What a run's history says about the seconds after a worker was killed at `killed_at`."""

    progress_s: float | None = None  # SIGKILL -> first task completed by the new worker
    progress_what: str = ""
    in_flight: list[str] = field(default_factory=list)  # activities running at the kill
    completed_by: dict[str, tuple[str, int]] = field(default_factory=dict)  # name: identity, try

    def describe(self) -> str:
        progress = (
            f"{self.progress_s:.1f}s ({self.progress_what})" if self.progress_s is not None else "-"
        )
        return (
            f"SIGKILL -> next progress by the new worker: {progress}; "
            f"activity in flight at the kill: {', '.join(self.in_flight) or 'none'}"
        )


def recovery(history: WorkflowHistory, killed_at: float, new_worker_pid: int) -> Recovery:
    new_worker = f"{new_worker_pid}@"
    found = Recovery()
    scheduled: dict[int, tuple[str, float]] = {}
    started: dict[int, tuple[int, float]] = {}
    for event in history.events:
        t = event.event_time.ToMicroseconds() / 1_000_000
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, t)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            started[attrs.scheduled_event_id] = (attrs.attempt, t)
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = event.activity_task_completed_event_attributes
            name, since = scheduled[attrs.scheduled_event_id]
            attempt, began = started.get(attrs.scheduled_event_id, (1, t))
            found.completed_by[name] = (attrs.identity, attempt)
            if since < killed_at < t:
                found.in_flight.append(
                    f"{name} (attempt {attempt} began {began - killed_at:.1f}s after the kill)"
                )
            if found.progress_s is None and t > killed_at and attrs.identity.startswith(new_worker):
                found.progress_s, found.progress_what = t - killed_at, f"{name} completed"
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            identity = event.workflow_task_completed_event_attributes.identity
            if found.progress_s is None and t > killed_at and identity.startswith(new_worker):
                found.progress_s, found.progress_what = t - killed_at, "workflow task completed"
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("order", "until_kill"),
    [
        pytest.param("o-1202", {}, id="slow-service"),
        # Every POST fails after its commit until the kill: the refund is in the service's
        # database while its activity is still retrying, so the new worker must finish it by
        # resending the same Idempotency-Key.
        pytest.param("o-1203", {"fail_after_commit_rate": 1.0}, id="unacknowledged-commit"),
    ],
)
async def test_sigkill_after_refund_commit_then_fresh_worker_finishes_exactly_once(
    client: Client,
    worker_env,
    worker_processes,
    service: DemoService,
    task_queue: str,
    order: str,
    until_kill: dict[str, float],
):
    """SIGKILL once a refund committed: a fresh worker finishes the run, each effect once."""
    script = [
        turn(call("lookup_order", order_id=order)),
        turn(
            call("issue_refund", order_id=order, amount=40.0, reason="arrived broken"),
            confidence=0.9,
        ),
        turn(call("send_email", order_id=order, subject="Your refund", body="We refunded 40.00.")),
        turn(call("update_ticket", order_id=order, status="resolved", note="refunded 40.00")),
        turn(text=f"Refunded 40.00 for {order}, emailed the customer, resolved the ticket."),
    ]
    slow = {"latency_ms": 1500}
    first = await spawn_worker(worker_env, worker_processes)
    await asyncio.to_thread(service.post, "/v1/chaos", {**slow, **until_kill})
    try:
        handle = await start_run(
            client,
            scripted_request(script, goal=f"Order {order} arrived broken; refund 40.00."),
            task_queue=task_queue,
        )

        async def refund_committed() -> bool:
            return len(await rows(service, "refunds", order)) > 0

        await eventually(refund_committed, timeout=120, what=f"the refund row for {order}")
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.time()
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL
        await asyncio.to_thread(service.post, "/v1/chaos", slow)

        second = await spawn_worker(worker_env, worker_processes)
        # After SIGKILL the interrupted activity is retried only after its start-to-close timeout
        # (15 s for the demo tools, 120 s for a model call), hence the generous deadline.
        result = await asyncio.wait_for(wait_result(handle), timeout=300)
        completed_after = time.time() - killed_at
    finally:
        await asyncio.to_thread(service.post, "/v1/chaos", {})

    assert result.status == "completed", result.reason
    assert [s.tool for s in result.side_effects] == ["issue_refund", "send_email", "update_ticket"]
    assert (await get_state(handle)).status == "completed"
    for kind in ("refunds", "emails", "tickets"):
        found = await rows(service, kind, order)
        assert len(found) == 1, f"{kind} for {order}: {found}"
    [refund] = await rows(service, "refunds", order)
    assert refund["amount"] == 40.0
    assert refund["idempotency_key"] == result.side_effects[0].idempotency_key

    seen = recovery(await handle.fetch_history(), killed_at, second.pid)
    assert seen.progress_s is not None, "no task completed by the new worker after the SIGKILL"
    if until_kill:
        identity, attempt = seen.completed_by["tool.issue_refund"]
        assert identity.startswith(f"{second.pid}@") and attempt > 1, (identity, attempt)
    print(f"\n[{order}] {seen.describe()}; run completed {completed_after:.1f}s after the SIGKILL")


async def test_sigterm_stops_idle_worker_cleanly(worker_env, worker_processes, tmp_path: Path):
    """SIGTERM makes an idle `python worker.py` log that it stopped and exit 0 within 30 s."""
    log_file = tmp_path / "worker.log"
    process = await spawn_worker(worker_env, worker_processes, log_file=log_file)
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 30)
    log = log_file.read_text()
    assert code == 0, log
    assert "shutting down" in log and "worker stopped" in log, log
