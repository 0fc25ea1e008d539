"""`spine alerts`: anomaly alerts from the audit log (rules in ``guardrails/alerts.py``).

``spine alerts check [--since 1h] [--json] [--webhook URL] [--dry-run]`` evaluates the rules now,
records the new alerts on the day's alert chain in the audit log, logs them, POSTs them to the
webhook and prints them. Exit status:

- 0: no new alert (none found, or all already reported: an alert whose rule and subject match an
  earlier one over an overlapping window is not repeated);
- 3: new alerts fired (with ``--dry-run``: would fire; nothing is written or sent);
- 1: an error (the audit log or the policy cannot be read), one ``spine: error:`` line;
- 2: bad usage.

With ``--log-json`` each new alert is also one JSON line on stderr (the ``spine.alerts``
logger), for log collectors; without it the terminal gets only the text on stdout (``--json``:
the whole result as JSON on stdout). In a worker (the Temporal Schedule below) the JSON lines
always go to the worker's log.

The audit store is the worker's (``SPINE_AUDIT_DSN``, else ``SPINE_STATE_DIR/audit.db``), the
policy ``SPINE_POLICY`` or the default, the webhook ``--webhook``, else ``SPINE_ALERT_WEBHOOK``,
else the policy's ``[alerts] webhook_url``.

Continuously, either from cron (the exit status tells the cron mailer whether to speak)::

    */5 * * * *  cd /srv/spine && SPINE_STATE_DIR=/srv/spine/.spine .venv/bin/spine alerts check

or Temporal-native: ``spine alerts schedule --every 5m`` creates (or updates) the Temporal
Schedule ``spine-alerts``, which starts `SpineAlertsWorkflow` on the Spine task queue; a worker
registering that workflow and the ``spine.alerts_check`` activity runs the check.
``spine alerts unschedule`` deletes it.

This module does not import ``spine.client.cli`` (which adds `alerts` to the ``spine`` group).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import click
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError, RPCStatusCode

from spine.activities.errors import SpineError
from spine.client.audit_cli import open_store
from spine.client.runs import SpineClientError, connect
from spine.client.slo_cli import parse_since
from spine.contract import DEFAULT_TASK_QUEUE
from spine.guardrails.policy import Policy, PolicyError, load_policy
from spine.observability.alerts import (
    ALERT_LINE,
    Alert,
    AlertEngine,
    AlertsCheckInput,
    AlertsCheckResult,
)
from spine.observability.audit import AuditStore, store_from_env
from spine.workflows.alerts import ALERTS_SCHEDULE_ID, ALERTS_WORKFLOW_TYPE

EXIT_ALERTS = 3
"""Exit status of `spine alerts check` when new alerts fired."""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> timedelta:
    """`30s`, `5m`, `1h`, `2d` as a positive timedelta; a usage error names `option`."""
    found = _DURATION.match(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30s, 5m, 1h, 2d", param_hint=f"'{option}'"
        )
    return timedelta(seconds=float(found.group(1)) * _SECONDS[found.group(2)])


def _policy(env: Mapping[str, str]) -> Policy:
    try:
        return load_policy(env.get("SPINE_POLICY") or None)
    except PolicyError as e:
        raise SpineClientError(str(e)) from e


def _writable_store(env: Mapping[str, str]) -> AuditStore:
    """The worker's audit store, for appending alerts; refuses to create a missing SQLite file."""
    probe = open_store(env)  # read-only: a clear error when the log is not there
    asyncio.run(probe.close())
    try:
        return store_from_env(env, Path(env.get("SPINE_STATE_DIR") or ".spine"))
    except (ValueError, ImportError) as e:
        raise SpineClientError(str(e)) from e


async def run_check(
    store: AuditStore,
    policy: Policy,
    *,
    env: Mapping[str, str],
    now: datetime,
    window_s: float | None,
    webhook_url: str | None,
    dry_run: bool,
) -> AlertsCheckResult:
    """One check with the CLI's settings; store errors become one-line client errors."""
    engine = AlertEngine.from_policy(store, policy, env, webhook_url=webhook_url)
    try:
        return await engine.check(
            now=now, window_s=window_s, emit=not dry_run, source="spine alerts check"
        )
    except SpineError as e:
        raise SpineClientError(e.message) from e
    finally:
        await store.close()


def render(result: AlertsCheckResult, *, dry_run: bool) -> list[str]:
    """The result as terminal lines: one per new alert, then a summary."""
    lines = [f"{a.severity.upper():<8}  {a.rule:<18}  {a.message}" for a in result.fired]
    verb = "would fire" if dry_run else "fired"
    count = len(result.fired)
    lines.append(f"{count} alert{'s' if count != 1 else ''} {verb}" if count else "no new alerts")
    lines.append(
        f"window {result.window_start:%Y-%m-%d %H:%M:%S} - {result.window_end:%H:%M:%S} UTC "
        f"(baseline from {result.baseline_start:%Y-%m-%d %H:%M:%S}); read {result.runs} "
        f"finished runs and {result.tool_calls} tool calls"
    )
    if result.suppressed:
        lines.append(f"{len(result.suppressed)} already reported, not repeated:")
        lines += [f"  {_short(a)}" for a in result.suppressed]
    return lines


class _NoAlertLines(logging.Filter):
    """Drops the alerts' JSON log lines (webhook errors and the rest still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, ALERT_LINE, False)


def _short(alert: Alert) -> str:
    return f"{alert.rule} {alert.subject}"


@click.group("alerts")
def alerts() -> None:
    """Anomaly alerts from the audit log: failure-rate and cost spikes, loops, tool-mix drift."""


@alerts.command("check")
@click.option(
    "--since",
    "since_text",
    help="Window to evaluate: 1h, 90m, 1d... or an ISO time (default: the policy's window_s).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--webhook", help="POST new alerts here (overrides SPINE_ALERT_WEBHOOK).")
@click.option("--dry-run", is_flag=True, help="Evaluate only: record, log and send nothing.")
@click.option(
    "--log-json", is_flag=True, help="Also write each new alert as one JSON line to stderr."
)
@click.pass_context
def check_cmd(
    ctx: click.Context,
    since_text: str | None,
    as_json: bool,
    webhook: str | None,
    dry_run: bool,
    log_json: bool,
) -> None:
    """Evaluate the alert rules now and print the new alerts.

    \b
    Exit status:
      0  no new alert (none, or all already reported)
      1  error (the audit log or the policy cannot be read)
      2  bad usage
      3  new alerts fired (with --dry-run: would fire)
    """
    quiet = _NoAlertLines()
    logger = logging.getLogger("spine.alerts")
    if not log_json:  # the JSON lines are for collectors; the terminal gets the text
        logger.addFilter(quiet)
    try:
        _check(ctx, since_text, as_json, webhook, dry_run)
    finally:
        logger.removeFilter(quiet)


def _check(
    ctx: click.Context, since_text: str | None, as_json: bool, webhook: str | None, dry_run: bool
) -> None:
    env = dict(os.environ)
    now = datetime.now(UTC)
    window_s: float | None = None
    if since_text is not None:
        window_s = (now - parse_since(since_text, now)).total_seconds()
        if window_s <= 0:
            raise click.BadParameter(f"{since_text!r} is not in the past", param_hint="'--since'")
    policy = _policy(env)
    store = open_store(env) if dry_run else _writable_store(env)
    result = asyncio.run(
        run_check(
            store,
            policy,
            env=env,
            now=now,
            window_s=window_s,
            webhook_url=webhook,
            dry_run=dry_run,
        )
    )
    if as_json:
        click.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        for line in render(result, dry_run=dry_run):
            click.echo(line)
    ctx.exit(EXIT_ALERTS if result.fired else 0)


# --- continuous mode -------------------------------------------------------------------------


def alerts_schedule(
    every: timedelta,
    task_queue: str,
    window_s: float | None = None,
    schedule_id: str = ALERTS_SCHEDULE_ID,
) -> Schedule:
    """The Schedule that starts `SpineAlertsWorkflow` every `every`, skipping overlaps.

    Its workflows are named after the schedule (Temporal appends the start time).
    """
    return Schedule(
        action=ScheduleActionStartWorkflow(
            ALERTS_WORKFLOW_TYPE,
            AlertsCheckInput(window_s=window_s),
            id=schedule_id,
            task_queue=task_queue,
            execution_timeout=max(every * 2, timedelta(minutes=10)),
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def create_schedule(
    client: Client,
    *,
    every: timedelta,
    task_queue: str,
    window_s: float | None = None,
    schedule_id: str = ALERTS_SCHEDULE_ID,
) -> Literal["created", "updated"]:
    """Create the alerts Schedule (its first check starts at once), or update it in place."""
    schedule = alerts_schedule(every, task_queue, window_s, schedule_id)
    try:
        await client.create_schedule(schedule_id, schedule, trigger_immediately=True)
        return "created"
    except ScheduleAlreadyRunningError:
        pass

    def replace(_: ScheduleUpdateInput) -> ScheduleUpdate:
        return ScheduleUpdate(schedule=schedule)

    await client.get_schedule_handle(schedule_id).update(replace)
    return "updated"


async def delete_schedule(client: Client, schedule_id: str = ALERTS_SCHEDULE_ID) -> None:
    """Delete the alerts Schedule; a client error when there is none."""
    try:
        await client.get_schedule_handle(schedule_id).delete()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise SpineClientError(f"there is no schedule {schedule_id!r}") from e
        raise SpineClientError(f"cannot delete schedule {schedule_id!r}: {e.message}") from e


@alerts.command("schedule")
@click.option("--every", default="5m", show_default=True, help="How often: 30s, 5m, 1h...")
@click.option("--since", "since_text", help="Window per check (default: the policy's window_s).")
@click.option("--task-queue", help="Task queue of the worker (default SPINE_TASK_QUEUE).")
@click.option("--id", "schedule_id", default=ALERTS_SCHEDULE_ID, show_default=True)
def schedule_cmd(
    every: str, since_text: str | None, task_queue: str | None, schedule_id: str
) -> None:
    """Check continuously: a Temporal Schedule starting SpineAlertsWorkflow every --every."""
    interval = parse_duration(every, "--every")
    window_s = parse_duration(since_text, "--since").total_seconds() if since_text else None
    queue = task_queue or os.environ.get("SPINE_TASK_QUEUE") or DEFAULT_TASK_QUEUE

    async def go() -> str:
        client = await connect()
        try:
            return await create_schedule(
                client,
                every=interval,
                task_queue=queue,
                window_s=window_s,
                schedule_id=schedule_id,
            )
        except RPCError as e:
            raise SpineClientError(f"cannot create schedule {schedule_id!r}: {e.message}") from e

    done = asyncio.run(go())
    click.echo(
        f"schedule {schedule_id!r} {done}: {ALERTS_WORKFLOW_TYPE} every {every} on task queue "
        f"{queue!r}; the worker there must register SpineAlertsWorkflow and spine.alerts_check"
    )


@alerts.command("unschedule")
@click.option("--id", "schedule_id", default=ALERTS_SCHEDULE_ID, show_default=True)
def unschedule_cmd(schedule_id: str) -> None:
    """Delete the alerts Schedule."""

    async def go() -> None:
        await delete_schedule(await connect(), schedule_id)

    asyncio.run(go())
    click.echo(f"schedule {schedule_id!r} deleted")
