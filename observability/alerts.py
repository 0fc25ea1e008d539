"""Anomaly alerts over the audit log: failure-rate and cost spikes, looping runs, tool-use drift.

The audit log already holds what the rules need, on the worker host: ``run_outcome`` entries
give a run's agent, account, time, status and cost; ``tool_call`` entries give the tool and the
digest of its arguments. :func:`load_records` reads them as :class:`RunRecord` and
:class:`ToolCallRecord`; pure rule functions turn records into :class:`Alert` s;
:class:`AlertEngine` runs the rules "now" and emits what is new.

The *window* is ``[now - window_s, now)``, the *baseline* the ``baseline_s`` just before it
(policy ``[alerts]``). The rules, per agent unless said otherwise:

====================  =============================================================================
failure_rate_spike    share of the window's finished runs whose status is one of ``statuses`` >
                      max(baseline share x ``factor``, ``floor``); needs ``min_runs`` finished runs
                      in the window (with fewer in the baseline, only the floor applies)
cost_per_run_spike    mean ``usd`` per finished run in the window > baseline mean x ``factor`` and
                      >= ``min_usd``; needs ``min_runs`` finished runs in both
loop                  per run: one tool called with one ``args_digest`` >= ``loop_repeats`` times
                      (over the run's whole chain) by a run that made a tool call in the window
drift                 distance between the agent's tool mix (share of calls per tool) in the
                      window and in the baseline > ``threshold``: Jensen-Shannon divergence
                      (base 2) or total variation distance, both 0 (same mix) .. 1 (disjoint);
                      needs ``min_calls`` tool calls in both
====================  =============================================================================

Emitting, in this order: one ``alert`` entry per alert on the day's alert chain in the audit log
(run id ``alerts:YYYY-MM-DD``; hash-chained like every run, so `spine audit verify` covers it),
one JSON line per alert on the ``spine.alerts`` logger (WARNING), and a POST of
``{"text": ..., "alert": {...}}`` to the webhook when one is set (failures are logged, never
raised). Recording first makes the chain the single source of truth for deduplication: an alert
is *the same* as one already on the chains when rule and subject match and their windows overlap
(a loop alert's window is the run itself). So a condition that persists is reported once per
window length however often the check runs, and two checkers racing cannot both report it: the
loser's append conflicts, it re-reads the chain and drops the duplicate. The price is that a
crash between recording and notifying loses that notification (the alert stays in the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
from pydantic import BaseModel, Field, ValidationError
from temporalio import activity

from spine.activities.errors import DependencyUnavailable, SpineError
from spine.contract import ACTIVITY_ALERTS_CHECK, JsonObject
from spine.guardrails.policy import AlertRule, Alerts, Policy
from spine.observability.audit import AuditConflict, AuditStore, DatabaseAuditStore
from spine.payloads import AuditBatch, AuditEntry

log = logging.getLogger("spine.alerts")
#: Set on the log record of each new alert's JSON line (``spine alerts check`` keeps those off
#: the terminal unless asked, with ``--log-json``).
ALERT_LINE = "spine_alert_line"

ALERT_CHAIN_PREFIX = "alerts:"
"""Alert chains in the audit log are ``alerts:YYYY-MM-DD`` (UTC date of the check)."""

ALERT_ACTOR = "spine.alerts"
WEBHOOK_ENV = "SPINE_ALERT_WEBHOOK"

_APPEND_ATTEMPTS = 5  # concurrent checkers appending to one alert chain: re-read and retry


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A finished run, from its ``run_outcome`` audit entry."""

    run_id: str
    agent: str
    account: str
    at: datetime
    status: str
    usd: float


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One tool call of a run, from a ``tool_call`` audit entry."""

    run_id: str
    agent: str
    account: str
    at: datetime
    tool: str
    args_digest: str
    outcome: str


@dataclass(frozen=True, slots=True)
class Records:
    """What the rules read: finished runs and tool calls."""

    runs: tuple[RunRecord, ...] = ()
    tool_calls: tuple[ToolCallRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open time range ``[start, end)``."""

    start: datetime
    end: datetime

    def __contains__(self, at: object) -> bool:
        return isinstance(at, datetime) and self.start <= at < self.end

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def windows(now: datetime, config: Alerts, window_s: float | None = None) -> tuple[Window, Window]:
    """The evaluated window ending at `now` and the baseline just before it."""
    length = timedelta(seconds=window_s or config.window_s)
    current = Window(now - length, now)
    return current, Window(current.start - timedelta(seconds=config.baseline_s), current.start)


# --- alerts ----------------------------------------------------------------------------------


class Alert(BaseModel):
    """One anomaly: which rule, about what, how far past its threshold, over which window."""

    rule: AlertRule
    subject: str = Field(description="`agent:NAME`, or `run:RUN_ID/TOOL/ARGS_DIGEST` for loops.")
    severity: Literal["warning", "critical"]
    message: str
    value: float
    threshold: float
    at: datetime = Field(description="When the check ran (the window's end).")
    window_start: datetime | None = Field(description="None for a loop: its window is the run.")
    window_end: datetime | None
    agent: str = ""
    run_id: str | None = Field(default=None, description="Audit run id: WORKFLOW_ID:FIRST_RUN.")
    details: JsonObject = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """`rule|subject|window`, the alert's identity for logs and webhooks."""
        if self.window_start is None or self.window_end is None:
            return f"{self.rule}|{self.subject}|run"
        return f"{self.rule}|{self.subject}|{_iso(self.window_start)}/{_iso(self.window_end)}"

    def same_as(self, other: Alert) -> bool:
        """Same rule and subject, and overlapping windows (loops: the same run, tool, args)."""
        if (self.rule, self.subject) != (other.rule, other.subject):
            return False
        start, end = self.window_start, self.window_end
        other_start, other_end = other.window_start, other.window_end
        if start is None or end is None or other_start is None or other_end is None:
            return True
        return start < other_end and other_start < end


class AlertsCheckInput(BaseModel):
    """Input of the ``spine.alerts_check`` activity and of `SpineAlertsWorkflow`."""

    at: datetime | None = Field(default=None, description="Evaluate as of this time (now).")
    window_s: float | None = Field(default=None, gt=0, description="Overrides the policy's.")


class AlertsCheckResult(BaseModel):
    """What one check found: the new alerts and those already reported."""

    at: datetime
    window_start: datetime
    window_end: datetime
    baseline_start: datetime
    runs: int = Field(description="Finished runs read (window and baseline).")
    tool_calls: int = Field(description="Tool calls read.")
    fired: list[Alert] = Field(default_factory=list)
    suppressed: list[Alert] = Field(default_factory=list, description="Already reported.")


# --- the rules (pure) ------------------------------------------------------------------------


def failure_rate_spikes(
    runs: Iterable[RunRecord], current: Window, baseline: Window, config: Alerts
) -> list[Alert]:
    """Agents whose share of failed runs in `current` is past max(baseline x factor, floor)."""
    rule = config.failure_rate_spike
    failing = set(rule.statuses)
    alerts = []
    for agent, (now_runs, base_runs) in sorted(_split_by_agent(runs, current, baseline).items()):
        if len(now_runs) < config.min_runs:
            continue
        failed = sum(r.status in failing for r in now_runs)
        rate = failed / len(now_runs)
        base_rate: float | None = None
        if len(base_runs) >= config.min_runs:
            base_rate = sum(r.status in failing for r in base_runs) / len(base_runs)
        threshold = max((base_rate or 0.0) * rule.factor, rule.floor)
        if rate <= threshold:
            continue
        against = (
            f"baseline {base_rate:.0%} x {rule.factor:g}, floor {rule.floor:.0%}"
            if base_rate is not None
            else f"floor; baseline has {len(base_runs)} runs"
        )
        alerts.append(
            _alert(
                "failure_rate_spike",
                f"agent:{agent}",
                value=rate,
                threshold=threshold,
                critical=rate >= min(1.0, 2 * threshold),
                current=current,
                agent=agent,
                message=(
                    f"agent {agent!r}: {failed} of {len(now_runs)} runs failed in the last "
                    f"{duration_text(current.seconds)} ({rate:.0%}), above {threshold:.0%} "
                    f"({against})"
                ),
                details={
                    "runs": len(now_runs),
                    "failed": failed,
                    "statuses": dict(Counter(r.status for r in now_runs).most_common()),
                    "baseline_runs": len(base_runs),
                    "baseline_rate": base_rate,
                },
            )
        )
    return alerts


def cost_per_run_spikes(
    runs: Iterable[RunRecord], current: Window, baseline: Window, config: Alerts
) -> list[Alert]:
    """Agents whose mean cost per finished run in `current` is past baseline mean x factor."""
    rule = config.cost_per_run_spike
    alerts = []
    for agent, (now_runs, base_runs) in sorted(_split_by_agent(runs, current, baseline).items()):
        if len(now_runs) < config.min_runs or len(base_runs) < config.min_runs:
            continue
        mean = sum(r.usd for r in now_runs) / len(now_runs)
        base_mean = sum(r.usd for r in base_runs) / len(base_runs)
        threshold = base_mean * rule.factor
        if mean <= threshold or mean < rule.min_usd:
            continue
        ratio = mean / base_mean if base_mean > 0 else math.inf
        alerts.append(
            _alert(
                "cost_per_run_spike",
                f"agent:{agent}",
                value=mean,
                threshold=threshold,
                critical=mean >= 2 * threshold,
                current=current,
                agent=agent,
                message=(
                    f"agent {agent!r}: mean cost per run ${mean:.4f} over {len(now_runs)} runs "
                    f"in the last {duration_text(current.seconds)}, {ratio:.1f}x the baseline "
                    f"${base_mean:.4f} (limit x{rule.factor:g})"
                ),
                details={
                    "runs": len(now_runs),
                    "total_usd": round(sum(r.usd for r in now_runs), 8),
                    "baseline_runs": len(base_runs),
                    "baseline_mean_usd": round(base_mean, 8),
                },
            )
        )
    return alerts


def loops(tool_calls: Iterable[ToolCallRecord], current: Window, config: Alerts) -> list[Alert]:
    """Runs active in `current` that called one tool with one argument digest too often.

    Calls are counted over everything given up to `current.end` (the engine gives each active
    run's whole chain), so a loop that spans windows is still one loop.
    """
    counts: Counter[tuple[str, str, str]] = Counter()
    first: dict[tuple[str, str, str], ToolCallRecord] = {}
    active: set[str] = set()
    for call in tool_calls:
        if call.at >= current.end:
            continue
        if call.at in current:
            active.add(call.run_id)
        key = (call.run_id, call.tool, call.args_digest)
        counts[key] += 1
        first.setdefault(key, call)
    alerts = []
    for key, count in sorted(counts.items()):
        run_id, tool, args_digest = key
        if run_id not in active or count < config.loop_repeats:
            continue
        call = first[key]
        workflow_id = run_id.rsplit(":", 1)[0]
        alerts.append(
            _alert(
                "loop",
                f"run:{run_id}/{tool}/{args_digest}",
                value=count,
                threshold=config.loop_repeats,
                critical=count >= 2 * config.loop_repeats,
                current=None,
                at=current.end,
                agent=call.agent,
                run_id=run_id,
                message=(
                    f"run {workflow_id!r} (agent {call.agent!r}) called {tool!r} {count} times "
                    f"with the same arguments ({args_digest[:19]}); the limit is "
                    f"{config.loop_repeats}"
                ),
                details={
                    "workflow_id": workflow_id,
                    "tool": tool,
                    "args_digest": args_digest,
                    "count": count,
                    "account": call.account,
                },
            )
        )
    return alerts


def drifts(
    tool_calls: Iterable[ToolCallRecord], current: Window, baseline: Window, config: Alerts
) -> list[Alert]:
    """Agents whose tool mix in `current` moved away from the baseline's past the threshold."""
    rule = config.drift
    now_mix: dict[str, Counter[str]] = defaultdict(Counter)
    base_mix: dict[str, Counter[str]] = defaultdict(Counter)
    for call in tool_calls:
        if call.at in current:
            now_mix[call.agent][call.tool] += 1
        elif call.at in baseline:
            base_mix[call.agent][call.tool] += 1
    metric = jensen_shannon if rule.metric == "jsd" else total_variation
    alerts = []
    for agent in sorted(now_mix):
        now_counts, base_counts = now_mix[agent], base_mix.get(agent, Counter())
        n, m = sum(now_counts.values()), sum(base_counts.values())
        if n < rule.min_calls or m < rule.min_calls:
            continue
        p, q = shares(now_counts), shares(base_counts)
        distance = metric(p, q)
        if distance <= rule.threshold:
            continue
        moved = max(p.keys() | q.keys(), key=lambda t: (abs(p.get(t, 0) - q.get(t, 0)), t))
        alerts.append(
            _alert(
                "drift",
                f"agent:{agent}",
                value=distance,
                threshold=rule.threshold,
                critical=distance >= min(1.0, 2 * rule.threshold),
                current=current,
                agent=agent,
                message=(
                    f"agent {agent!r}: tool mix drifted ({rule.metric} {distance:.2f} > "
                    f"{rule.threshold:g}; {n} calls in the last {duration_text(current.seconds)} "
                    f"vs {m} before); biggest change {moved!r} {q.get(moved, 0):.0%} -> "
                    f"{p.get(moved, 0):.0%}"
                ),
                details={
                    "metric": rule.metric,
                    "calls": n,
                    "baseline_calls": m,
                    "mix": {t: round(s, 4) for t, s in sorted(p.items())},
                    "baseline_mix": {t: round(s, 4) for t, s in sorted(q.items())},
                },
            )
        )
    return alerts


def evaluate(
    records: Records, *, now: datetime, config: Alerts, window_s: float | None = None
) -> list[Alert]:
    """Every enabled rule over `records`, for the window ending at `now`."""
    current, baseline = windows(now, config, window_s)
    found: list[Alert] = []
    if "failure_rate_spike" in config.rules:
        found += failure_rate_spikes(records.runs, current, baseline, config)
    if "cost_per_run_spike" in config.rules:
        found += cost_per_run_spikes(records.runs, current, baseline, config)
    if "loop" in config.rules:
        found += loops(records.tool_calls, current, config)
    if "drift" in config.rules:
        found += drifts(records.tool_calls, current, baseline, config)
    return found


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Counts as fractions of their total (empty for no counts)."""
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items() if v} if total else {}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Total variation distance of two distributions: half the L1 distance, 0..1."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in p.keys() | q.keys())


def jensen_shannon(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence of two distributions, base 2, 0..1."""

    def kl(a: Mapping[str, float], mid: Mapping[str, float]) -> float:
        return sum(v * math.log2(v / mid[k]) for k, v in a.items() if v > 0)

    mid = {k: (p.get(k, 0.0) + q.get(k, 0.0)) / 2 for k in p.keys() | q.keys()}
    return max(0.0, min(1.0, 0.5 * kl(p, mid) + 0.5 * kl(q, mid)))


def duration_text(seconds: float) -> str:
    """`1h`, `90m`, `2d`, `45s`: the largest unit that divides `seconds` evenly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _split_by_agent(
    runs: Iterable[RunRecord], current: Window, baseline: Window
) -> dict[str, tuple[list[RunRecord], list[RunRecord]]]:
    split: dict[str, tuple[list[RunRecord], list[RunRecord]]] = defaultdict(lambda: ([], []))
    for run in runs:
        if run.at in current:
            split[run.agent][0].append(run)
        elif run.at in baseline:
            split[run.agent][1].append(run)
    return split


def _alert(
    rule: AlertRule,
    subject: str,
    *,
    value: float,
    threshold: float,
    critical: bool,
    current: Window | None,
    message: str,
    agent: str,
    details: JsonObject,
    at: datetime | None = None,
    run_id: str | None = None,
) -> Alert:
    when = current.end if current is not None else at
    assert when is not None, "an alert needs its window or its time"
    return Alert(
        rule=rule,
        subject=subject,
        severity="critical" if critical else "warning",
        message=message,
        value=round(value, 8),
        threshold=round(threshold, 8),
        at=when,
        window_start=current.start if current is not None else None,
        window_end=current.end if current is not None else None,
        agent=agent,
        run_id=run_id,
        details=details,
    )


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- reading the audit log -------------------------------------------------------------------


async def load_records(store: AuditStore, *, since: datetime, active_since: datetime) -> Records:
    """Finished runs and tool calls from `since` on, plus every tool call of the runs that made
    one from `active_since` on (the loop rule counts whole runs).

    Spine's stores (SQLite or PostgreSQL) are read with one query; any other store run by run.

    Raises:
        DependencyUnavailable: the store cannot be read.
    """
    if isinstance(store, DatabaseAuditStore):
        found = await store.recent(_second(since), _second(active_since))
        rows = [
            (r["run_id"], r["agent"], r["account"], r["kind"], r["at"], _json(r["data"]))
            for r in found
        ]
    else:
        rows = await _generic_rows(store, since, active_since)
    runs: list[RunRecord] = []
    calls: list[ToolCallRecord] = []
    for run_id, agent, account, kind, at_text, data in rows:
        at = _parse_at(at_text)
        if at is None or not isinstance(data, dict):  # a damaged row: `spine audit verify` says
            continue
        if kind == "run_outcome" and at >= since:
            usd = data.get("usd")
            runs.append(
                RunRecord(
                    run_id=run_id,
                    agent=agent,
                    account=account,
                    at=at,
                    status=str(data.get("status", "")),
                    usd=float(usd) if isinstance(usd, int | float) else 0.0,
                )
            )
        elif kind == "tool_call":
            calls.append(
                ToolCallRecord(
                    run_id=run_id,
                    agent=agent,
                    account=account,
                    at=at,
                    tool=str(data.get("tool", "")),
                    args_digest=str(data.get("args_digest", "")),
                    outcome=str(data.get("outcome", "")),
                )
            )
    return Records(runs=tuple(runs), tool_calls=tuple(calls))


_Row = tuple[str, str, str, str, str, object]


async def _generic_rows(store: AuditStore, since: datetime, active_since: datetime) -> list[_Row]:
    rows: list[_Row] = []
    for run_id in await store.run_ids():
        if run_id.startswith(ALERT_CHAIN_PREFIX):
            continue
        chain = [e for e in await store.entries(run_id) if e.kind in ("run_outcome", "tool_call")]
        active = any(
            e.kind == "tool_call" and (at := _parse_at(e.at)) is not None and at >= active_since
            for e in chain
        )
        for e in chain:
            at = _parse_at(e.at)
            if at is not None and (at >= since or (active and e.kind == "tool_call")):
                rows.append((e.run_id, e.agent, e.account, e.kind, e.at, e.data))
    return rows


def _second(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _json(text: object) -> object:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _parse_at(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


# --- the engine ------------------------------------------------------------------------------


def alert_chain_id(at: datetime) -> str:
    """The audit run id of the alert chain for `at`'s UTC day: ``alerts:YYYY-MM-DD``."""
    return f"{ALERT_CHAIN_PREFIX}{at.astimezone(UTC).date().isoformat()}"


class AlertEngine:
    """Evaluates the rules against the audit log and emits new alerts (see the module doc).

    Args:
        store: the audit store to read runs from and to append alerts to.
        config: the policy's ``[alerts]`` section.
        policy_version: stamped on the alert entries.
        webhook_url: where to POST new alerts; None for no webhook.
        http: the client to POST with (the worker's); a short-lived one is made when None.
    """

    def __init__(
        self,
        store: AuditStore,
        config: Alerts,
        *,
        policy_version: str = "",
        webhook_url: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.policy_version = policy_version
        self.webhook_url = webhook_url or None
        self._http = http

    @classmethod
    def from_policy(
        cls,
        store: AuditStore,
        policy: Policy,
        settings: Mapping[str, str] | None = None,
        *,
        webhook_url: str | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> AlertEngine:
        """An engine for `policy`; the webhook is `webhook_url`, else ``SPINE_ALERT_WEBHOOK``
        in `settings`, else the policy's ``webhook_url``."""
        url = webhook_url or (settings or {}).get(WEBHOOK_ENV) or policy.alerts.webhook_url
        return cls(
            store,
            policy.alerts,
            policy_version=policy.full_version,
            webhook_url=url or None,
            http=http,
        )

    async def check(
        self,
        *,
        now: datetime | None = None,
        window_s: float | None = None,
        emit: bool = True,
        source: str = "spine.alerts",
    ) -> AlertsCheckResult:
        """Evaluate every rule for the window ending at `now`; emit and return the new alerts.

        With `emit` False nothing is written or sent: the result says what would fire.
        `source` names the checker in the alert entries (their workflow run id column).

        Raises:
            DependencyUnavailable: the audit store cannot be read or written, or the alert
                chain kept changing under concurrent appends (both retryable).
        """
        now = (now or datetime.now(UTC)).astimezone(UTC)
        current, baseline = windows(now, self.config, window_s)
        records = await load_records(self.store, since=baseline.start, active_since=current.start)
        found = evaluate(records, now=now, config=self.config, window_s=window_s)
        fired, suppressed = await self._record(found, now, current, emit=emit, source=source)
        result = AlertsCheckResult(
            at=now,
            window_start=current.start,
            window_end=current.end,
            baseline_start=baseline.start,
            runs=len(records.runs),
            tool_calls=len(records.tool_calls),
            fired=fired,
            suppressed=suppressed,
        )
        if emit:
            for alert in fired:
                log.warning(alert_log_line(alert), extra={ALERT_LINE: True})
            await self._notify(fired)
        return result

    async def reported(self, now: datetime, window: Window) -> list[Alert]:
        """Alerts on the chains of the days a duplicate of a check at `now` could be on."""
        first = min(window.start, now - timedelta(days=1)).astimezone(UTC).date()
        day, last = first, now.astimezone(UTC).date()
        found: list[Alert] = []
        while day <= last:
            for entry in await self.store.entries(f"{ALERT_CHAIN_PREFIX}{day.isoformat()}"):
                if entry.kind != "alert" or not isinstance(entry.data, dict):
                    continue
                try:
                    found.append(Alert.model_validate(entry.data))
                except ValidationError:  # an entry written by something else, or damaged
                    continue
            day += timedelta(days=1)
        return found

    async def _record(
        self, found: Sequence[Alert], now: datetime, window: Window, *, emit: bool, source: str
    ) -> tuple[list[Alert], list[Alert]]:
        """Split `found` into new and already reported; append the new ones to today's chain."""
        if not found:
            return [], []
        chain = alert_chain_id(now)
        for _ in range(_APPEND_ATTEMPTS):
            known = await self.reported(now, window)
            fresh: list[Alert] = []
            suppressed: list[Alert] = []
            for alert in found:
                duplicate = any(alert.same_as(k) for k in (*known, *fresh))
                (suppressed if duplicate else fresh).append(alert)
            if not emit or not fresh:
                return fresh, suppressed
            stored = await self.store.entries(chain)
            seq = max((e.seq for e in stored), default=-1) + 1
            batch = AuditBatch(
                run_id=chain,
                workflow_run_id=source,
                agent=ALERT_ACTOR,
                account="",
                entries=[
                    AuditEntry(
                        seq=seq + i,
                        kind="alert",
                        step=0,
                        actor=ALERT_ACTOR,
                        at=now.isoformat(),
                        data=alert.model_dump(mode="json"),
                        policy_version=self.policy_version,
                    )
                    for i, alert in enumerate(fresh)
                ],
            )
            try:
                await self.store.append(batch)
            except AuditConflict:
                continue  # another checker appended first: re-read and re-check for duplicates
            return fresh, suppressed
        raise DependencyUnavailable(
            f"alert chain {chain!r} kept changing while {_APPEND_ATTEMPTS} appends were tried; "
            "too many checkers at once (run one schedule, not several); retrying later"
        )

    async def _notify(self, alerts: Sequence[Alert]) -> None:
        if not self.webhook_url or not alerts:
            return
        if self._http is not None:
            await asyncio.gather(*(self._post(self._http, a) for a in alerts))
            return
        async with httpx.AsyncClient() as http:
            await asyncio.gather(*(self._post(http, a) for a in alerts))

    async def _post(self, http: httpx.AsyncClient, alert: Alert) -> None:
        url = self.webhook_url or ""
        body = {"text": f"[spine] {alert.severity}: {alert.message}", "alert": _plain(alert)}
        try:
            response = await http.post(url, json=body, timeout=self.config.webhook_timeout_s)
        except Exception as e:  # noqa: BLE001  # a webhook must never break the check
            log.error(f"alert webhook {redact_url(url)} failed for {alert.key}: {e!r}")
            return
        if response.status_code >= 300:
            log.error(
                f"alert webhook {redact_url(url)} answered {response.status_code} for {alert.key}"
            )


def _plain(alert: Alert) -> JsonObject:
    return {**alert.model_dump(mode="json"), "key": alert.key}


def alert_log_line(alert: Alert) -> str:
    """The one-line JSON form of an alert on the ``spine.alerts`` logger."""
    return json.dumps({"event": "spine.alert", **_plain(alert)}, sort_keys=True)


def redact_url(url: str) -> str:
    """Scheme and host only: webhook paths often carry a token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/..."


# --- the activity ----------------------------------------------------------------------------


class AlertActivities:
    """The ``spine.alerts_check`` activity over an engine (run by `SpineAlertsWorkflow`)."""

    def __init__(self, engine: AlertEngine) -> None:
        self.engine = engine

    @activity.defn(name=ACTIVITY_ALERTS_CHECK)
    async def check(self, request: AlertsCheckInput) -> AlertsCheckResult:
        """Evaluate the alert rules as of `request.at` and emit what is new."""
        info = activity.info()
        try:
            return await self.engine.check(
                now=request.at,
                window_s=request.window_s,
                source=f"{info.workflow_id}/{info.workflow_run_id}",
            )
        except SpineError as err:
            raise err.to_application_error() from err
