"""Compound failure: 10-step refund runs where every model and tool call fails 15% of the time.

Three arms in one run, on one demo business service (chaos ``fail_rate 0.15``) with the same
scripted decisions and a scripted model that also fails 15% of its calls:

  naive   a plain in-process agent loop, no retries;
  retry   the same loop retrying each call (3 tries, same Idempotency-Key within the process),
          no checkpoints: each run is a process SIGKILLed at a random turn and restarted from
          scratch, as a supervisor would;
  spine   AgentWorkflow on ``python worker.py`` processes, with workers SIGKILLed (and replaced)
          at random points and the Temporal dev server restarted once, state kept in SQLite.

Per arm: end-to-end success (final answer and refund, email and ticket exactly once), duplicate
side effects counted in the service by order id, compensations, parked runs.

    python -m bench.compound [--quick] [--out bench/results/compound.json]

Quick: 30 runs per arm. Full: 200 naive, 200 retry, 1,000 Spine runs (in waves of 250, since
the service has 500 orders; it is reset between waves).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from bench.common import (
    REPO_ROOT,
    Stack,
    Tally,
    Workers,
    bench_policy,
    bench_stack,
    fmt_s,
    orders,
    parser,
    rng,
    side_effect_counts,
    spine_request,
    summary,
    write_results,
)
from bench.naive_agent import run_agent
from bench.scripts import refund_script
from spine.client.runs import get_state, start_run
from spine.contract import ACTIVITY_MODEL_CALL, AgentResult

FAIL_RATE = 0.15
RETRY_TRIES = 3
SIZES = {
    "quick": {"naive": 30, "retry": 30, "spine": 30, "wave": 30, "kills_per_wave": 2},
    "full": {"naive": 200, "retry": 200, "spine": 1000, "wave": 250, "kills_per_wave": 2},
}
WAVE_DEADLINE_S = 600.0
ARMS = ("naive", "retry", "spine")


def _chaos(stack: Stack, seed: int) -> None:
    stack.reset()
    stack.chaos(fail_rate=FAIL_RATE, seed=seed)


# ------------------------------------------------------------------------------------ naive


async def naive_arm(stack: Stack, runs: int, seed: int) -> dict[str, object]:
    """No retries, in process: the run ends at the first failure, leaving what it did."""
    _chaos(stack, seed)
    targets = orders(runs)
    gate = asyncio.Semaphore(10)
    durations: list[float] = []

    async def one(order: str) -> dict[str, object]:
        async with gate:
            began = time.monotonic()
            result = await run_agent(
                stack.service.url,
                stack.service.api_key,
                order,
                tries=1,
                model_fail_rate=FAIL_RATE,
                rng=rng(seed, f"naive-{order}"),
            )
            durations.append(time.monotonic() - began)
            return result

    started = time.monotonic()
    results = await asyncio.gather(*(one(o) for o in targets))
    wall = time.monotonic() - started
    counts = await asyncio.to_thread(side_effect_counts, stack.service)
    tally = Tally()
    for order, result in zip(targets, results, strict=True):
        tally.add(order, str(result["status"]), counts)
    turns = [int(r["turn"]) for r in results if r["status"] != "completed"]
    return {
        **tally.as_dict(),
        "wall_s": wall,
        "run_s": summary(durations),
        "run_durations_s": durations,
        "failed_at_turn": {str(t): turns.count(t) for t in sorted(set(turns))},
    }


# ------------------------------------------------------------------------------------ retry


async def _naive_process(
    stack: Stack, order: str, seed: str, kill_at_turn: int | None, jitter_s: float
) -> tuple[dict[str, object] | None, bool]:
    """Run the retrying loop as a process; SIGKILL it once it starts `kill_at_turn`.

    Returns (its result or None when killed, whether it was killed).
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.naive_agent",
        "--url",
        stack.service.url,
        "--key",
        stack.service.api_key,
        "--order",
        order,
        "--tries",
        str(RETRY_TRIES),
        "--model-fail-rate",
        str(FAIL_RATE),
        "--seed",
        str(zlib.crc32(seed.encode())),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    result: dict[str, object] | None = None
    killed = False
    while True:
        line = (await process.stdout.readline()).decode().strip()
        if not line:
            break
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        elif kill_at_turn is not None and line == f"turn {kill_at_turn}":
            await asyncio.sleep(jitter_s)
            if process.returncode is None:
                process.kill()
                killed = True
                break
    await process.wait()
    return (None if killed else result), killed


async def retry_arm(stack: Stack, runs: int, seed: int) -> dict[str, object]:
    """Retries in place, no checkpoints: SIGKILL at a random turn, then start over from turn 1."""
    _chaos(stack, seed)
    targets = orders(runs)
    gate = asyncio.Semaphore(4)
    durations: list[float] = []
    kills: dict[str, int] = {}
    outcome: dict[str, str] = {}

    async def one(order: str) -> None:
        r = rng(seed, f"retry-{order}")
        kill_turn = r.randint(1, 10)
        jitter = r.uniform(0.0, 0.05)
        async with gate:
            began = time.monotonic()
            result, killed = await _naive_process(
                stack, order, f"{seed}-{order}-1", kill_turn, jitter
            )
            if killed:
                kills[order] = kill_turn
                # The supervisor restarts the job; nothing tells it what already happened.
                result, _ = await _naive_process(stack, order, f"{seed}-{order}-2", None, 0.0)
            durations.append(time.monotonic() - began)
        outcome[order] = str(result["status"]) if result else "crashed"

    started = time.monotonic()
    await asyncio.gather(*(one(o) for o in targets))
    wall = time.monotonic() - started
    counts = await asyncio.to_thread(side_effect_counts, stack.service)
    tally = Tally()
    for order in targets:
        tally.add(order, outcome[order], counts)
    dup_by_kill_turn: dict[str, int] = {}
    for order, turn in kills.items():
        extra = sum(max(counts[k][order] - 1, 0) for k in ("refunds", "emails", "tickets"))
        dup_by_kill_turn[str(turn)] = dup_by_kill_turn.get(str(turn), 0) + extra
    return {
        **tally.as_dict(),
        "wall_s": wall,
        "run_s": summary(durations),
        "run_durations_s": durations,
        "processes_killed": len(kills),
        "finished_before_kill": runs - len(kills),
        "duplicates_by_kill_turn": dict(
            sorted(dup_by_kill_turn.items(), key=lambda kv: int(kv[0]))
        ),
    }


# ------------------------------------------------------------------------------------ spine


async def _count(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def _steps_reached(stack: Stack, queue: str, step: int) -> int:
    """Runs of this queue at or past `step`, or already closed (from visibility)."""
    client = stack.server.client
    return await _count(
        client,
        f"TaskQueue = '{queue}' AND (SpineSteps >= {step} OR ExecutionStatus != 'Running')",
    )


async def _inject_faults(
    stack: Stack,
    workers: Workers,
    queue: str,
    runs: int,
    plan: list[tuple[str, int, float]],
    log: list[dict[str, object]],
    r: random.Random,
    t0: float,
) -> None:
    """Fire each (kind, step, jitter) once half the runs have reached `step`."""
    for kind, step, jitter in plan:
        while True:
            try:
                if await _steps_reached(stack, queue, step) >= runs / 2:
                    break
            except RPCError:
                pass  # the server is restarting
            await asyncio.sleep(0.2)
        await asyncio.sleep(jitter)
        try:
            in_flight = await _count(
                stack.server.client, f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"
            )
        except RPCError:
            in_flight = -1
        at = time.monotonic() - t0
        if kind == "kill":
            victim = r.choice(workers.alive)
            workers.sigkill(victim)
            replaced_at = time.monotonic()
            await workers.start(1)
            log.append(
                {
                    "fault": "worker SIGKILL",
                    "at_s": round(at, 2),
                    "trigger_step": step,
                    "runs_in_flight": in_flight,
                    "pid": victim.pid,
                    "replacement_ready_s": round(time.monotonic() - replaced_at, 2),
                }
            )
        else:
            timings = await stack.server.restart()
            log.append(
                {
                    "fault": "Temporal dev server restart",
                    "at_s": round(at, 2),
                    "trigger_step": step,
                    "runs_in_flight": in_flight,
                    **{k: round(v, 2) for k, v in timings.items()},
                }
            )
        print(f"  fault: {log[-1]}", flush=True)


def _kind(activity_type: str | None) -> str:
    return "model" if activity_type == ACTIVITY_MODEL_CALL else "tool"


async def _activity_profile(client: Client, workflow_id: str) -> dict[str, dict[str, float]]:
    """Per activity type: calls, retried attempts, attempts lost to timeouts, seconds spent.

    Seconds run from scheduling to completion, so they include retries and their backoff. An
    attempt "lost to a timeout" is work that vanished with a killed worker or server.
    """
    profile: dict[str, dict[str, float]] = {}
    scheduled: dict[int, tuple[str, float]] = {}
    handle = client.get_workflow_handle(workflow_id)
    async for event in handle.fetch_history_events():
        at = event.event_time.ToMicroseconds() / 1e6
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, at)
            row = profile.setdefault(name, {"calls": 0, "retries": 0, "timeouts": 0, "s": 0.0})
            row["calls"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            name = scheduled[attrs.scheduled_event_id][0]
            profile[name]["retries"] += attrs.attempt - 1
            if attrs.HasField("last_failure") and attrs.last_failure.HasField(
                "timeout_failure_info"
            ):
                profile[name]["timeouts"] += 1
        elif kind in (
            EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ):
            attrs = (
                event.activity_task_completed_event_attributes
                if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
                else event.activity_task_failed_event_attributes
                if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
                else event.activity_task_timed_out_event_attributes
            )
            name, since = scheduled[attrs.scheduled_event_id]
            profile[name]["s"] += at - since
            if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
                profile[name]["timeouts"] += 1
    return profile


async def _outcome(client: Client, workflow_id: str) -> tuple[str, AgentResult | None, float]:
    handle = client.get_workflow_handle(workflow_id, result_type=AgentResult)
    described = await handle.describe()
    ended = described.close_time or described.start_time
    duration = (ended - described.start_time).total_seconds()
    if described.status == WorkflowExecutionStatus.COMPLETED:
        result = await handle.result()
        return result.status, result, duration
    if described.status == WorkflowExecutionStatus.RUNNING:
        try:
            state = await get_state(handle)  # type: ignore[arg-type]
            return ("parked" if state.status == "parked" else f"stuck:{state.status}"), None, -1
        except Exception:  # noqa: BLE001  # a run that cannot answer is reported as stuck
            return "stuck", None, -1
    return f"workflow:{described.status.name.lower()}", None, duration


async def spine_arm(
    stack: Stack,
    runs: int,
    wave: int,
    kills_per_wave: int,
    seed: int,
    tmp: Path,
    *,
    server_restart: bool = True,
    account_budgets: bool = True,
) -> dict[str, object]:
    """Spine on worker processes, SIGKILLed at random points; the server restarted once."""
    policy = bench_policy(tmp, account_budgets=account_budgets)
    queue = f"bench-compound-{uuid.uuid4().hex[:8]}"
    workers = Workers(stack.worker_env(queue, policy=policy), tmp / "worker-logs")
    r = rng(seed, "spine-faults")
    tally = Tally()
    faults: list[dict[str, object]] = []
    durations: list[float] = []
    profile: dict[str, dict[str, float]] = {}
    retries = 0
    started = time.monotonic()
    await workers.start(2)
    try:
        waves = [min(wave, runs - i) for i in range(0, runs, wave)]
        restart_wave = min(1, len(waves) - 1) if server_restart else -1
        for index, size in enumerate(waves):
            _chaos(stack, seed + index)
            targets = orders(size)
            plan: list[tuple[str, int, float]] = [
                ("kill", r.randint(1, 9), r.uniform(0, 1.0)) for _ in range(kills_per_wave)
            ]
            if index == restart_wave:
                plan.append(("restart", r.randint(1, 9), r.uniform(0, 1.0)))
            plan.sort(key=lambda p: p[1])
            client = stack.server.client
            ids = []
            for order in targets:
                request = spine_request(refund_script(order), model_fail_rate=FAIL_RATE)
                request.goal = f"Order {order} arrived broken; refund it and tell the customer."
                handle = await start_run(
                    client,
                    request,
                    workflow_id=f"compound-{index}-{order}-{uuid.uuid4().hex[:6]}",
                    task_queue=queue,
                )
                ids.append(handle.id)
            t0 = time.monotonic()
            print(f"  spine wave {index + 1}/{len(waves)}: {size} runs started", flush=True)
            injector = asyncio.create_task(
                _inject_faults(stack, workers, queue, size, plan, faults, r, t0)
            )
            deadline = t0 + WAVE_DEADLINE_S
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                try:
                    client = stack.server.client
                    running = await _count(
                        client, f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"
                    )
                    parked = await _count(
                        client,
                        f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running' "
                        "AND SpineStatus = 'parked'",
                    )
                except (RPCError, RuntimeError):
                    continue  # restarting
                if running == parked and injector.done():
                    break
            if not injector.done():
                injector.cancel()
            await asyncio.gather(injector, return_exceptions=True)
            client = stack.server.client
            outcomes = await asyncio.gather(*(_outcome(client, wid) for wid in ids))
            counts = await asyncio.to_thread(side_effect_counts, stack.service)
            for order, (status, result, duration) in zip(targets, outcomes, strict=True):
                tally.add(order, status, counts)
                if duration >= 0:
                    durations.append(duration)
                if result is not None:
                    retries += result.retries
            for found in await asyncio.gather(*(_activity_profile(client, wid) for wid in ids)):
                for name, row in found.items():
                    total = profile.setdefault(name, dict.fromkeys(row, 0))
                    for key, value in row.items():
                        total[key] += value
            # Parked runs wait for an operator; end them so the next wave starts clean.
            for (status, _, _), wid in zip(outcomes, ids, strict=True):
                if status == "parked" or status.startswith("stuck"):
                    await client.get_workflow_handle(wid).terminate("benchmark wave over")
    finally:
        await workers.stop_all()
    return {
        **tally.as_dict(),
        "wall_s": time.monotonic() - started,
        "run_s": summary(durations),
        "run_durations_s": durations,
        "retries": retries,
        "faults": faults,
        "worker_kills": sum(1 for f in faults if f["fault"] == "worker SIGKILL"),
        "server_restarts": sum(1 for f in faults if f["fault"] != "worker SIGKILL"),
        "activities": {
            name: {**row, "s_per_run": row["s"] / runs} for name, row in sorted(profile.items())
        },
        "waves": len(range(0, runs, wave)),
    }


# ----------------------------------------------------------------------------------- driver


async def run(
    sizes: dict[str, int],
    *,
    seed: int = 7,
    arms: Sequence[str] = ARMS,
    tmp: Path | None = None,
) -> dict[str, object]:
    """Run the chosen arms one after the other on one stack; returns per-arm figures."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="spine-bench-compound-"))
    results: dict[str, object] = {}
    async with bench_stack(tmp) as stack:
        if "naive" in arms:
            print(f"naive: {sizes['naive']} runs, no retries", flush=True)
            results["naive"] = await naive_arm(stack, sizes["naive"], seed)
        if "retry" in arms:
            print(
                f"retry: {sizes['retry']} runs, {RETRY_TRIES} tries, SIGKILL, restart", flush=True
            )
            results["retry"] = await retry_arm(stack, sizes["retry"], seed)
        if "spine" in arms:
            print(f"spine: {sizes['spine']} runs on worker processes", flush=True)
            results["spine"] = await spine_arm(
                stack, sizes["spine"], sizes["wave"], sizes["kills_per_wave"], seed, tmp
            )
        stack.reset()
    return {
        "setup": {
            "steps_per_run": 10,
            "tool_calls_per_run": 9,
            "service_fail_rate": FAIL_RATE,
            "model_fail_rate": FAIL_RATE,
            "retry_arm_tries": RETRY_TRIES,
            "sizes": sizes,
            "seed": seed,
        },
        "arms": results,
    }


async def run_quick(
    *,
    seed: int = 7,
    arms: Sequence[str] = ARMS,
    tmp: Path | None = None,
    runs: int | None = None,
) -> dict[str, object]:
    """The quick size (30 runs per arm, or `runs`); what `tests/test_bench_compound.py` calls.

    Returns ``{"setup": ..., "arms": {name: figures}}``; each arm's figures hold ``runs``,
    ``success_rate``, ``duplicate_side_effects``, ``compensated_runs``, ``parked``, and more.
    """
    sizes = dict(SIZES["quick"])
    if runs is not None:
        sizes.update(naive=runs, retry=runs, spine=runs, wave=runs)
    return await run(sizes, seed=seed, arms=arms, tmp=tmp)


def report(data: dict[str, object]) -> None:
    arms: dict[str, dict] = data["arms"]  # type: ignore[assignment]
    print()
    print(
        f"{'arm':<7} {'runs':>5} {'success':>8} {'completed':>9} {'dupes':>6} "
        f"{'left-behind':>11} {'compensated':>11} {'parked':>6} {'run p50':>8} {'run p95':>8}"
    )
    for name, a in arms.items():
        print(
            f"{name:<7} {a['runs']:>5} {a['success_rate']:>8.1%} {a['completed']:>9} "
            f"{a['duplicate_side_effects']:>6} {a['unfinished_with_side_effects_left']:>11} "
            f"{a['compensated_runs']:>11} {a['parked']:>6} {fmt_s(a['run_s']['median']):>8} "
            f"{fmt_s(a['run_s']['p95']):>8}"
        )
    spine = arms.get("spine")
    for name in ("naive", "retry"):
        other = arms.get(name)
        if spine and other and other["success_rate"]:
            print(
                f"ratio success spine/{name}: {spine['success_rate'] / other['success_rate']:.1f}x"
            )
    if spine:
        print(
            f"spine faults: {spine['worker_kills']} worker SIGKILLs, "
            f"{spine['server_restarts']} server restart(s); retries: {spine['retries']}"
        )
        for name, row in spine["activities"].items():
            print(
                f"  {name:<22} calls {row['calls']:>6.0f}  retried {row['retries']:>5.0f}  "
                f"lost to timeouts {row['timeouts']:>3.0f}  {row['s_per_run']:.2f}s per run"
            )
    if "retry" in arms:
        print(f"retry duplicates by kill turn: {arms['retry']['duplicates_by_kill_turn']}")


def main() -> None:
    args = parser(__doc__, "30 runs per arm").parse_args()
    sizes = SIZES["quick" if args.quick else "full"]
    began = time.monotonic()
    data = asyncio.run(run(sizes, seed=args.seed))
    data["elapsed_s"] = time.monotonic() - began
    report(data)
    print(f"elapsed {data['elapsed_s']:.0f}s")
    write_results(args.out, "compound", data)


if __name__ == "__main__":
    main()
