"""`spine slo`: service-level figures for agent runs, computed from Temporal visibility.

Runs are the `AgentWorkflow` executions started in the window (``StartTime > since``), grouped by
workflow id so a run that continued as new counts once (from its first start to its last close).

- success rate: runs whose result status is ``completed`` / closed runs (every other outcome,
  including a person's rejection and a Temporal-level termination, counts against it);
- per step: from the runs' results, ``steps`` and ``retries`` (the audit log does not expose
  per-step outcomes yet): a step failed when the run ended ``failed`` or ``compensated`` at it;
  first-try rate is steps / (steps + retries);
- latency: close time - start time of closed runs, p50 and p95 (nearest rank);
- cost: ``SpineCostUSD`` (or the result's ``usage.usd``) summed over closed runs, divided by the
  number of successful runs;
- error budget: (1 - target) x closed runs may fail; what is left of that allowance.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import click
from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError

from spine.client.runs import SpineClientError, connect
from spine.contract import SA_COST, SA_STATUS, SA_STEPS, WORKFLOW_TYPE, AgentResult

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:/@-]+$")
_RESULT_FETCHES = 16  # concurrent result look-ups


def parse_since(text: str, now: datetime) -> datetime:
    """`24h`, `90m`, `7d`, `1w` before `now`, or an ISO 8601 time (UTC if it has no zone)."""
    found = _SINCE.match(text.strip())
    if found:
        return now - timedelta(**{_UNITS[found.group(2)]: float(found.group(1))})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration like 24h, 90m, 7d nor an ISO 8601 time",
            param_hint="'--since'",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass
class Run:
    """One agent run (a workflow id) as visibility and its result describe it."""

    workflow_id: str
    outcome: str
    """The run's status: `completed`, `failed`... when closed; `running`, `parked`... if open."""
    closed: bool
    start: datetime
    close: datetime | None
    cost_usd: float | None
    steps: int | None
    retries: int | None


class StepStats(BaseModel):
    source: str
    steps: int
    failed_steps: int
    retries: int
    success_rate: float | None
    first_try_rate: float | None


class SloReport(BaseModel):
    """What `spine slo --json` prints."""

    since: datetime
    until: datetime
    agent: str | None
    task_queue: str | None
    target: float
    runs: int
    closed: int
    open: int
    outcomes: dict[str, int]
    open_states: dict[str, int]
    completed: int
    success_rate: float | None
    per_step: StepStats
    latency_p50_s: float | None
    latency_p95_s: float | None
    cost_total_usd: float
    cost_per_success_usd: float | None
    failures: int
    budget_allowed_failures: float
    budget_remaining: float | None
    """Share of the error budget left: 1.0 untouched, 0 used up or overspent (never negative;
    `budget_over_by` says by how much); None when no failure was allowed and some happened."""
    budget_exhausted: bool
    budget_over_by: float = 0.0
    """Failures beyond the budget's allowance (0 while within it)."""


def visibility_query(since: datetime, agent: str | None, task_queue: str | None) -> str:
    """The list filter for `AgentWorkflow` runs started after `since`."""
    clauses = [
        f"WorkflowType = '{WORKFLOW_TYPE}'",
        f"StartTime > '{since.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}'",
    ]
    for field, option, value in (
        ("SpineAgent", "--agent", agent),
        ("TaskQueue", "--task-queue", task_queue),
    ):
        if value is None:
            continue
        if not _SAFE_VALUE.match(value):
            raise click.BadParameter(
                f"{value!r} is not a valid {field} value", param_hint=f"'{option}'"
            )
        clauses.append(f"{field} = '{value}'")
    return " AND ".join(clauses)


async def _result(client: Client, execution: WorkflowExecution) -> AgentResult | None:
    handle = client.get_workflow_handle(
        execution.id, run_id=execution.run_id, result_type=AgentResult
    )
    try:
        return await handle.result(follow_runs=False)
    except Exception:  # noqa: BLE001  # an unreadable result: fall back to search attributes
        return None


async def collect_runs(
    client: Client, *, since: datetime, agent: str | None = None, task_queue: str | None = None
) -> list[Run]:
    """Every run started after `since`, with its outcome, times, cost, steps and retries.

    Raises:
        SpineClientError: the server refused the query (e.g. Spine's search attributes are not
            registered, so `--agent` cannot filter).
    """
    by_id: dict[str, list[WorkflowExecution]] = {}
    query = visibility_query(since, agent, task_queue)
    try:
        async for execution in client.list_workflows(query):
            by_id.setdefault(execution.id, []).append(execution)
    except RPCError as e:
        raise SpineClientError(f"cannot list runs with {query!r}: {e.message}") from e
    finals = {wid: max(executions, key=lambda x: x.start_time) for wid, executions in by_id.items()}
    gate = asyncio.Semaphore(_RESULT_FETCHES)

    async def result_of(execution: WorkflowExecution) -> AgentResult | None:
        if execution.status != WorkflowExecutionStatus.COMPLETED:
            return None
        async with gate:
            return await _result(client, execution)

    results = await asyncio.gather(*(result_of(f) for f in finals.values()))
    runs = []
    for (wid, final), result in zip(finals.items(), results, strict=True):
        attrs = final.typed_search_attributes
        status = final.status or WorkflowExecutionStatus.RUNNING
        closed = status != WorkflowExecutionStatus.RUNNING
        if result is not None:
            outcome = result.status
        elif status in (WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.COMPLETED):
            outcome = attrs.get(SA_STATUS) or ("running" if not closed else "completed")
        else:
            outcome = status.name.lower()
        runs.append(
            Run(
                workflow_id=wid,
                outcome=outcome,
                closed=closed,
                start=min(x.start_time for x in by_id[wid]),
                close=final.close_time if closed else None,
                cost_usd=result.usage.usd if result is not None else attrs.get(SA_COST),
                steps=result.steps if result is not None else attrs.get(SA_STEPS),
                retries=result.retries if result is not None else None,
            )
        )
    return runs


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def slo_report(
    runs: list[Run],
    *,
    target: float,
    since: datetime,
    until: datetime,
    agent: str | None = None,
    task_queue: str | None = None,
) -> SloReport:
    """The figures of the module docstring, for `runs`."""
    closed = [r for r in runs if r.closed]
    completed = [r for r in closed if r.outcome == "completed"]
    with_steps = [r for r in closed if r.steps is not None and r.retries is not None]
    steps = sum(r.steps or 0 for r in with_steps)
    failed_steps = sum(
        1 for r in with_steps if r.outcome in ("failed", "compensated") and (r.steps or 0) > 0
    )
    retries = sum(r.retries or 0 for r in with_steps)
    latencies = [(r.close - r.start).total_seconds() for r in closed if r.close is not None]
    cost_total = round(sum(r.cost_usd or 0.0 for r in closed), 8)
    failures = len(closed) - len(completed)
    allowed = (1 - target) * len(closed)
    remaining = (allowed - failures) / allowed if allowed > 0 else (1.0 if not failures else None)
    return SloReport(
        since=since,
        until=until,
        agent=agent,
        task_queue=task_queue,
        target=target,
        runs=len(runs),
        closed=len(closed),
        open=len(runs) - len(closed),
        outcomes=dict(Counter(r.outcome for r in closed).most_common()),
        open_states=dict(Counter(r.outcome for r in runs if not r.closed).most_common()),
        completed=len(completed),
        success_rate=len(completed) / len(closed) if closed else None,
        per_step=StepStats(
            source="run results (steps, retries); the audit log has no per-step outcomes yet",
            steps=steps,
            failed_steps=failed_steps,
            retries=retries,
            success_rate=(steps - failed_steps) / steps if steps else None,
            first_try_rate=steps / (steps + retries) if steps else None,
        ),
        latency_p50_s=percentile(latencies, 0.50),
        latency_p95_s=percentile(latencies, 0.95),
        cost_total_usd=cost_total,
        cost_per_success_usd=cost_total / len(completed) if completed else None,
        failures=failures,
        budget_allowed_failures=round(allowed, 6),
        budget_remaining=None if remaining is None else max(remaining, 0.0),
        budget_exhausted=remaining is None or remaining <= 0,
        budget_over_by=round(max(failures - allowed, 0.0), 6),
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}s" if value < 120 else f"{value / 60:.1f}min"


def render(report: SloReport) -> list[str]:
    """The report as terminal lines."""
    scope = f"since {report.since:%Y-%m-%d %H:%M:%S} UTC"
    if report.agent:
        scope += f"  agent {report.agent}"
    if report.task_queue:
        scope += f"  task queue {report.task_queue}"
    if not report.runs:
        return [f"no {WORKFLOW_TYPE} runs started {scope}"]
    outcomes = ", ".join(f"{k} {v}" for k, v in report.outcomes.items()) or "-"
    open_states = ", ".join(f"{k} {v}" for k, v in report.open_states.items())
    step = report.per_step
    if report.budget_remaining is None:
        budget = "exhausted (no failures allowed)"
    elif report.budget_over_by > 0:
        budget = f"exhausted, over budget by {report.budget_over_by:g} failures"
    elif report.budget_exhausted:
        budget = "exhausted (0.00% left)"
    else:
        budget = f"{_pct(report.budget_remaining)} left"
    cost_each = (
        "-" if report.cost_per_success_usd is None else f"${report.cost_per_success_usd:.6f}"
    )
    return [
        f"window      {scope}",
        f"runs        {report.closed} closed, {report.open} open"
        + (f" ({open_states})" if open_states else ""),
        f"outcomes    {outcomes}",
        f"success     {_pct(report.success_rate)}  "
        f"({report.completed} of {report.closed} closed runs completed)",
        f"per step    {_pct(step.success_rate)} of {step.steps} steps succeeded; "
        f"{_pct(step.first_try_rate)} needed no retry ({step.retries} retries)  "
        "[from run results]",
        f"latency     p50 {_secs(report.latency_p50_s)}  p95 {_secs(report.latency_p95_s)}  "
        "(close - start, closed runs)",
        f"cost        {cost_each} per successful run "
        f"(${report.cost_total_usd:.6f} over {report.closed} closed run"
        + ("s)" if report.closed != 1 else ")"),
        f"budget      target {_pct(report.target)}: {report.budget_allowed_failures:g} failures "
        f"allowed, {report.failures} happened; {budget}",
    ]


async def _slo(
    now: datetime, since: datetime, agent: str | None, task_queue: str | None, target: float
) -> SloReport:
    client = await connect()
    runs = await collect_runs(client, since=since, agent=agent, task_queue=task_queue)
    return slo_report(
        runs, target=target, since=since, until=now, agent=agent, task_queue=task_queue
    )


@click.command("slo")
@click.option("--since", "since_text", default="24h", show_default=True, help="24h, 90m, 7d...")
@click.option("--agent", help="Only this agent's runs (SpineAgent).")
@click.option("--task-queue", help="Only runs on this task queue.")
@click.option(
    "--target",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.99,
    show_default=True,
    help="Success-rate objective; sets the error budget.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def slo(
    since_text: str, agent: str | None, task_queue: str | None, target: float, as_json: bool
) -> None:
    """Success rate, per-step success, latency, cost and error budget of recent runs."""
    now = datetime.now(UTC)
    since = parse_since(since_text, now)
    visibility_query(since, agent, task_queue)  # refuse a bad filter before connecting
    report = asyncio.run(_slo(now, since, agent, task_queue, target))
    if as_json:
        click.echo(json.dumps(report.model_dump(mode="json")))
        return
    for line in render(report):
        click.echo(line)
