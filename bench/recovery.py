"""Recovery time: from a worker SIGKILL, or a Temporal server restart, to the run moving again.

Two ``python worker.py`` processes serve the queue. Each trial starts a run of tool calls
against the demo service (1 s latency, so a call is in flight most of the time) and then:

* ``sigkill 15s``: waits for a ``lookup_order`` call to be in flight, SIGKILLs the worker running
  it (found by its Temporal identity) at a random point of the call, and measures until the
  other worker (i) starts the retry and (ii) completes a task of the run. Temporal only retries
  the lost attempt once its start-to-close timeout (15 s for the demo tools) has passed, so this
  is what dominates. A replacement worker is started so two are always serving.
* ``sigkill 3s``: the same with ``lookup_order_3s`` (the same tool, 3 s timeout), to show what a
  shorter timeout (or a heartbeat timeout on a heartbeating tool) buys.
* ``restart``: at a random point of a run, stops the dev server and starts it on the same
  SQLite file and port, and measures from the stop to the server answering, and to the run's
  next completed task.

    python -m bench.recovery [--quick] [--out bench/results/recovery.json]

Quick: 5 trials of each kind. Full: 20.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHandle

from bench.common import (
    Stack,
    Workers,
    bench_policy,
    bench_stack,
    fmt_s,
    parser,
    rng,
    spine_request,
    summary,
    write_results,
)
from bench.scripts import call, turn
from spine.client.runs import start_run
from spine.contract import tool_activity

LATENCY_MS = 1000
KINDS = {"sigkill 15s": "lookup_order", "sigkill 3s": "lookup_order_3s", "restart": "lookup_order"}


def _script(tool: str, calls: int = 12) -> list:
    return [turn(call(tool, order_id=f"o-{1001 + i}")) for i in range(calls)] + [turn(text="ok")]


async def _start(stack: Stack, queue: str, tool: str) -> WorkflowHandle:
    request = spine_request(_script(tool), agent="bench-agent")
    return await start_run(
        stack.server.client,
        request,
        workflow_id=f"recovery-{uuid.uuid4().hex[:8]}",
        task_queue=queue,
    )


async def _tool_in_flight(
    client: Client, workflow_id: str, tool: str, timeout: float = 60
) -> tuple[str, str]:
    """Wait until a `tool` attempt is running; returns (activity id, worker identity)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = await client.get_workflow_handle(workflow_id).describe()
        for pending in described.raw_description.pending_activities:
            if (
                pending.activity_type.name == tool_activity(tool)
                and pending.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                and pending.attempt == 1
            ):
                return pending.activity_id, pending.last_worker_identity
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {tool} call in flight within {timeout:.0f}s")


async def _progress_after(
    client: Client, workflow_id: str, since: float, exclude_identity: str | None, timeout: float
) -> dict[str, float | None]:
    """Seconds from `since` (epoch) to the retry starting and to the next task completed.

    A completed task counts when it happened after `since` and (for a SIGKILL) was done by
    another worker than the killed one.
    """
    deadline = time.monotonic() + timeout
    retry = progress = None
    while time.monotonic() < deadline and progress is None:
        await asyncio.sleep(0.25)
        try:
            handle = client.get_workflow_handle(workflow_id)
            async for event in handle.fetch_history_events():
                at = event.event_time.ToMicroseconds() / 1e6
                if at <= since:
                    continue
                kind = event.event_type
                if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                    attrs = event.activity_task_started_event_attributes
                    if retry is None and attrs.attempt > 1:
                        retry = at - since
                identity = None
                if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                    identity = event.activity_task_completed_event_attributes.identity
                elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                    identity = event.workflow_task_completed_event_attributes.identity
                if identity is not None and identity != exclude_identity:
                    progress = at - since
                    break
        except Exception:  # noqa: BLE001,S112  # the server may be coming back up
            continue
    return {"retry_started_s": retry, "progress_s": progress}


async def sigkill_trial(
    stack: Stack, workers: Workers, queue: str, tool: str, r
) -> dict[str, object]:
    client = stack.server.client
    handle = await _start(stack, queue, tool)
    try:
        # Skip the first call or two so the run is warm, then pick a random point of a call.
        await asyncio.sleep(r.uniform(0.5, 2.5))
        activity_id, identity = await _tool_in_flight(client, handle.id, tool)
        await asyncio.sleep(r.uniform(0.0, LATENCY_MS / 1000 * 0.8))
        victim = workers.by_identity(identity)
        if victim is None:
            return {"skipped": f"worker {identity} is not one of ours"}
        killed_at = time.time()
        workers.sigkill(victim)
        replacement = asyncio.create_task(workers.start(1))
        timing = await _progress_after(client, handle.id, killed_at, identity, timeout=180)
        await replacement
        return {"activity": activity_id, "killed": identity, **timing}
    finally:
        await client.get_workflow_handle(handle.id).terminate("trial over")


async def restart_trial(stack: Stack, queue: str, r) -> dict[str, object]:
    handle = await _start(stack, queue, "lookup_order")
    await asyncio.sleep(r.uniform(1.0, 4.0))
    stopped_at = time.time()
    timings = await stack.server.restart()
    up = time.time()
    timing = await _progress_after(stack.server.client, handle.id, up, None, timeout=180)
    await stack.server.client.get_workflow_handle(handle.id).terminate("trial over")
    return {
        "server_back_s": up - stopped_at,
        "progress_after_up_s": timing["progress_s"],
        "progress_s": None
        if timing["progress_s"] is None
        else timing["progress_s"] + (up - stopped_at),
        **{f"server_{k}": v for k, v in timings.items()},
    }


async def run(trials: int, seed: int = 7) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="spine-bench-recovery-"))
    results: dict[str, list[dict[str, object]]] = {kind: [] for kind in KINDS}
    r = rng(seed, "recovery")
    async with bench_stack(tmp) as stack:
        stack.chaos(latency_ms=LATENCY_MS)
        queue = f"bench-recovery-{uuid.uuid4().hex[:6]}"
        policy = bench_policy(tmp, account_budgets=False)
        workers = Workers(stack.worker_env(queue, policy=policy), tmp / "worker-logs")
        await workers.start(2)
        try:
            for index in range(trials):
                for kind, tool in KINDS.items():
                    if kind == "restart":
                        sample = await restart_trial(stack, queue, r)
                    else:
                        sample = await sigkill_trial(stack, workers, queue, tool, r)
                    results[kind].append(sample)
                    print(
                        f"  trial {index + 1}/{trials} {kind:<12} progress after "
                        f"{fmt_s(sample.get('progress_s'))}"  # type: ignore[arg-type]
                        f" (retry started {fmt_s(sample.get('retry_started_s'))})",  # type: ignore[arg-type]
                        flush=True,
                    )
        finally:
            await workers.stop_all()
            stack.chaos()
    figures = {}
    for kind, samples in results.items():
        ok = [s for s in samples if s.get("progress_s") is not None]
        figures[kind] = {
            "trials": len(samples),
            "measured": len(ok),
            "progress_s": summary(float(s["progress_s"]) for s in ok),  # type: ignore[arg-type]
            "retry_started_s": summary(
                float(s["retry_started_s"])  # type: ignore[arg-type]
                for s in ok
                if s.get("retry_started_s") is not None
            ),
            "samples": samples,
        }
    return {
        "setup": {
            "trials": trials,
            "tool_latency_ms": LATENCY_MS,
            "tool_start_to_close_s": {"lookup_order": 15, "lookup_order_3s": 3},
            "model_start_to_close_s": 120,
            "heartbeat_timeout": None,
        },
        "figures": figures,
    }


def report(data: dict[str, object]) -> None:
    print()
    print(f"{'fault':<14} {'trials':>6} {'progress p50':>13} {'p95':>8} {'retry p50':>10}")
    for kind, f in data["figures"].items():  # type: ignore[union-attr]
        print(
            f"{kind:<14} {f['measured']:>6} {fmt_s(f['progress_s']['median']):>13} "
            f"{fmt_s(f['progress_s']['p95']):>8} {fmt_s(f['retry_started_s']['median']):>10}"
        )
    figures = data["figures"]
    long, short = (
        figures["sigkill 15s"]["progress_s"]["median"],
        figures["sigkill 3s"][  # type: ignore[index]
            "progress_s"
        ]["median"],
    )
    if long and short:
        print(f"ratio SIGKILL recovery 15 s timeout / 3 s timeout: {long / short:.1f}x")


def main() -> None:
    args = parser(__doc__, "5 trials of each kind").parse_args()
    began = time.monotonic()
    data = asyncio.run(run(5 if args.quick else 20, args.seed))
    data["elapsed_s"] = time.monotonic() - began
    report(data)
    print(f"elapsed {data['elapsed_s']:.0f}s")
    write_results(args.out, "recovery", data)


if __name__ == "__main__":
    main()
