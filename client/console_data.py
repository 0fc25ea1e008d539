"""What the console shows, read from Temporal, the audit store, the ledgers and the traces.

Everything here only reads: lists of runs from Temporal visibility (``SpineStatus``), a run's
`state` query, its event history (decoded with the client's data converter, as ``spine replay``
reads it), its audit chain (verified as ``spine audit verify`` does), its account's ledger (the
``show`` query behind ``spine budget show``) and its spans (as ``spine trace``). Decisions and
operator commands are sent by :mod:`spine.client.console` as the signed-in person.

Every value here comes from outside the console (a run's input, the model's tool calls, tool
output, people's reasons) and is treated as hostile: it is rendered escaped by the templates,
long values are cut (:func:`shown`), and nothing of it is used to build a query or a path
without validation (:func:`valid_workflow_id`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError

from spine.client.runs import QUERY_TIMEOUT, SpineClientError, get_run, get_state, web_ui_url
from spine.contract import (
    ACCOUNT_PATTERN,
    ACTIVITY_MODEL_CALL,
    ACTIVITY_RESOLVE_AGENT,
    LABEL_PATTERN,
    LEDGER_WORKFLOW_TYPE,
    SA_ACCOUNT,
    SA_AGENT,
    SA_COST,
    SA_STATUS,
    SA_STEPS,
    WORKFLOW_TYPE,
    AgentResult,
    PendingApproval,
    StateView,
    ledger_workflow_id,
    tool_of,
)
from spine.guardrails.policy import Policy
from spine.payloads import (
    AgentSpec,
    BudgetView,
    ModelCallInput,
    ModelCallResult,
    ToolCallInput,
    ToolCallResult,
)
from spine.workflows.state import AgentWorkflowInput

#: Workflow ids the console accepts in a URL: what Temporal allows, less control characters.
WORKFLOW_ID = re.compile(r"^[^\x00-\x1f\x7f]{1,255}$")
#: At most this many runs per list (inbox, parked); the page says when there were more.
MAX_LISTED = 100
#: Longest text of one value (arguments, output, reasons) a page shows; the rest is cut.
MAX_SHOWN = 4000
#: Runs read at once while building a list.
CONCURRENCY = 8
#: Statuses the lists are built from (values of the `SpineStatus` search attribute).
LIST_STATUSES = ("awaiting_approval", "parked")


def valid_workflow_id(value: str) -> bool:
    """Whether `value` may be a workflow id (used before any call to Temporal)."""
    return bool(WORKFLOW_ID.match(value))


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as text for a page: JSON for structures, cut at `limit` characters."""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    )
    if len(text) > limit:
        return text[:limit] + f"… ({len(text) - limit} more characters not shown)"
    return text


def compact(args: Mapping[str, object], limit: int = 160) -> str:
    """Arguments on one line: ``order_id="o-1", amount=150.0``."""
    text = ", ".join(
        f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in args.items()
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def when(value: object) -> str:
    """An ISO time (or datetime) as ``2026-11-29 10:00:00Z``; anything else as text."""
    if isinstance(value, datetime):
        at = value
    else:
        try:
            at = datetime.fromisoformat(str(value))
        except ValueError:
            return str(value)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ------------------------------------------------------------------------------------ lists


@dataclass
class RunRow:
    """A run as visibility lists it."""

    workflow_id: str
    run_id: str
    agent: str
    account: str
    status: str
    steps: int | None
    cost: float | None
    started: str


@dataclass(frozen=True)
class Filter:
    """Which runs a list shows: one account, one agent, or all (validated before any query)."""

    account: str | None = None
    agent: str | None = None

    @classmethod
    def of(cls, account: str | None, agent: str | None) -> Filter:
        """The filter from a page's query parameters.

        Raises:
            ValueError: a value that is not an account or agent name.
        """
        account, agent = (account or "").strip() or None, (agent or "").strip() or None
        if account is not None and not re.match(ACCOUNT_PATTERN, account):
            raise ValueError("not an account name (lower case letters, digits, '_' and '-')")
        if agent is not None and not re.match(LABEL_PATTERN, agent):
            raise ValueError("not an agent name (letters, digits, '.', '_' and '-')")
        return cls(account, agent)

    def clause(self) -> str:
        # Safe to quote: both match patterns without quotes or spaces.
        parts = [f" AND {SA_ACCOUNT.name} = '{self.account}'" if self.account else ""]
        parts.append(f" AND {SA_AGENT.name} = '{self.agent}'" if self.agent else "")
        return "".join(parts)


async def list_runs(
    client: Client, status: str, only: Filter | None = None
) -> tuple[list[RunRow], bool]:
    """Open Spine runs whose ``SpineStatus`` is `status` (newest first), and whether there were
    more than :data:`MAX_LISTED`."""
    if status not in LIST_STATUSES:
        raise ValueError(f"not a listed status: {status!r}")
    query = (
        f"WorkflowType = '{WORKFLOW_TYPE}' AND ExecutionStatus = 'Running' "
        f"AND {SA_STATUS.name} = '{status}'" + (only or Filter()).clause()
    )
    rows: list[RunRow] = []
    more = False
    try:
        async for execution in client.list_workflows(query, limit=MAX_LISTED + 1):
            if len(rows) == MAX_LISTED:
                more = True
                break
            attrs = execution.typed_search_attributes
            rows.append(
                RunRow(
                    workflow_id=execution.id,
                    run_id=execution.run_id,
                    agent=attrs.get(SA_AGENT) or "",
                    account=attrs.get(SA_ACCOUNT) or "",
                    status=attrs.get(SA_STATUS) or "",
                    steps=attrs.get(SA_STEPS),
                    cost=attrs.get(SA_COST),
                    started=when(execution.start_time) if execution.start_time else "",
                )
            )
    except RPCError as err:
        raise SpineClientError(f"cannot list {status} runs: {err.message}") from err
    return rows, more


# ---------------------------------------------------------------------------------- history


@dataclass
class ToolStep:
    """A tool call the run made (or tried), as its history tells it."""

    step: int
    tool: str
    call_id: str
    purpose: str
    args: dict[str, Any]
    output: dict[str, Any] | None
    outcome: str
    """``completed``, ``failed`` or ``running`` (scheduled, no result yet)."""
    attempt: int
    side_effects: bool = False


@dataclass
class ModelStep:
    """A model turn."""

    step: int
    model: str
    text: str | None
    calls: list[str]
    confidence: float | None
    input_tokens: int
    output_tokens: int
    outcome: str


@dataclass
class Story:
    """What a run's history says: its request, its pinned agent, its steps."""

    request: AgentWorkflowInput | None = None
    spec: AgentSpec | None = None
    steps: list[ModelStep | ToolStep] = field(default_factory=list)
    result: AgentResult | None = None
    problem: str | None = None
    """Why (part of) the history could not be read, or None."""

    @property
    def tool_calls(self) -> list[ToolStep]:
        return [s for s in self.steps if isinstance(s, ToolStep)]


async def _decode(client: Client, payloads: Payloads, cls: type[BaseModel]) -> Any:
    [value] = await client.data_converter.decode(payloads.payloads, [cls])
    return value


async def story(client: Client, workflow_id: str) -> Story:
    """The run's request, agent and steps from its history (every run of its chain)."""
    from spine.client.forks import load_history  # lazily: it imports the tool registry

    found = Story()
    try:
        history = await load_history(client, workflow_id)
    except SpineClientError as err:
        found.problem = str(err)
        return found
    except Exception as err:  # noqa: BLE001  # a history that does not decode is shown, not fatal
        found.problem = f"cannot decode the history: {type(err).__name__}: {err}"[:500]
        return found
    found.request = history.segments[0].input if history.segments else None
    for segment in history.segments:
        if segment.result is not None:
            found.result = segment.result
        for activity in segment.activities:
            try:
                await _add_step(client, found, activity)
            except Exception as err:  # noqa: BLE001  # one bad payload does not hide the rest
                found.problem = f"a {activity.kind} payload did not decode: {type(err).__name__}"
    return found


async def _add_step(client: Client, found: Story, activity: Any) -> None:
    done = activity.result is not None
    failed = not done and activity.retry_state != 0
    outcome = "completed" if done else "failed" if failed else "running"
    if activity.kind == ACTIVITY_RESOLVE_AGENT and done:
        found.spec = await _decode(client, activity.result, AgentSpec)
    elif activity.kind == ACTIVITY_MODEL_CALL:
        call: ModelCallInput = await _decode(client, activity.input, ModelCallInput)
        result: ModelCallResult | None = (
            await _decode(client, activity.result, ModelCallResult) if done else None
        )
        found.steps.append(
            ModelStep(
                step=call.step,
                model=f"{call.provider}:{call.model}",
                text=result.message.content if result else None,
                calls=[c.name for c in result.message.tool_calls] if result else [],
                confidence=result.confidence if result else None,
                input_tokens=result.usage.input_tokens if result else 0,
                output_tokens=result.usage.output_tokens if result else 0,
                outcome=outcome,
            )
        )
    elif tool_of(activity.kind) is not None:
        call_in: ToolCallInput = await _decode(client, activity.input, ToolCallInput)
        output: ToolCallResult | None = (
            await _decode(client, activity.result, ToolCallResult) if done else None
        )
        described = {t.name: t for t in found.spec.tools} if found.spec else {}
        tool = described.get(call_in.tool)
        found.steps.append(
            ToolStep(
                step=call_in.step,
                tool=call_in.tool,
                call_id=call_in.call_id,
                purpose=call_in.purpose,
                args=call_in.args,
                output=output.output if output else None,
                outcome=outcome,
                attempt=activity.attempt,
                side_effects=bool(tool and tool.side_effects),
            )
        )


# ------------------------------------------------------------------------------------- inbox


@dataclass
class InboxItem:
    """A run waiting for a person, with each of its open approvals."""

    row: RunRow
    approvals: list[PendingApproval] = field(default_factory=list)
    request: AgentWorkflowInput | None = None
    done: list[ToolStep] = field(default_factory=list)
    usage_usd: float | None = None
    problem: str | None = None


async def _state(client: Client, workflow_id: str) -> StateView:
    return await get_state(get_run(client, workflow_id))


async def inbox(client: Client, only: Filter | None = None) -> tuple[list[InboxItem], bool]:
    """Every open approval of every run awaiting one, with what the approver needs to judge."""
    rows, more = await list_runs(client, "awaiting_approval", only)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def read(row: RunRow) -> InboxItem:
        item = InboxItem(row)
        async with gate:
            try:
                state = await _state(client, row.workflow_id)
                item.approvals, item.usage_usd = state.pending_approvals, state.usage.usd
            except SpineClientError as err:
                item.problem = str(err)
            told = await story(client, row.workflow_id)
            item.request = told.request
            item.done = [s for s in told.tool_calls if s.purpose != "compensation"]
            item.problem = item.problem or told.problem
        return item

    items = await asyncio.gather(*(read(r) for r in rows))
    return [i for i in items if i.approvals or i.problem], more


# ------------------------------------------------------------------------------------ parked


@dataclass
class ParkedItem:
    """A parked run: why, what it has done that an operator's choice would keep or undo."""

    row: RunRow
    reason: str | None = None
    request: AgentWorkflowInput | None = None
    effects: list[ToolStep] = field(default_factory=list)
    operator_roles: list[str] = field(default_factory=list)
    last_tool: str | None = None
    problem: str | None = None


async def parked(client: Client, only: Filter | None = None) -> tuple[list[ParkedItem], bool]:
    """Every parked run (the dead-letter queue), with its reason and side effects."""
    rows, more = await list_runs(client, "parked", only)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def read(row: RunRow) -> ParkedItem:
        item = ParkedItem(row)
        async with gate:
            try:
                state = await _state(client, row.workflow_id)
                item.reason, item.last_tool = state.reason, state.last_tool
            except SpineClientError as err:
                item.problem = str(err)
            told = await story(client, row.workflow_id)
            item.request = told.request
            item.effects = [
                s for s in told.tool_calls if s.side_effects and s.outcome == "completed"
            ]
            item.operator_roles = list(told.spec.operator_roles) if told.spec else []
            item.problem = item.problem or told.problem
        return item

    return list(await asyncio.gather(*(read(r) for r in rows))), more


# --------------------------------------------------------------------------------- a run


@dataclass
class AuditView:
    """A run's audit chain, verified."""

    entries: list[Any] = field(default_factory=list)
    verified: bool | None = None
    """True: the chain holds (and matches what the run anchored); False: broken; None: unread."""
    verdict: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """Approval and operator entries: who decided what, accepted or refused."""
    lines: list[str] = field(default_factory=list)
    """The story, one line per entry, as ``spine audit show`` prints it."""


@dataclass
class RunPage:
    workflow_id: str
    run_id: str = ""
    workflow_status: str = ""
    status: str = ""
    state: StateView | None = None
    story: Story = field(default_factory=Story)
    audit: AuditView = field(default_factory=AuditView)
    web_ui: str = ""
    limit_usd: float | None = None
    spent_usd: float = 0.0
    account_today: tuple[float, float] | None = None
    """The account's (committed, reserved) spend today, from its ledger."""
    account_daily_limit: float | None = None
    started: str = ""
    closed: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.workflow_status == "running"


async def run_page(
    client: Client, workflow_id: str, env: Mapping[str, str], policy: Policy | None
) -> RunPage:
    """Everything the run's page shows.

    Raises:
        SpineClientError: there is no such run (or Temporal refuses).
    """
    from spine.client.runs import describe

    handle = get_run(client, workflow_id)
    desc = await describe(handle)
    if desc.workflow_type != WORKFLOW_TYPE:
        raise SpineClientError(f"{workflow_id!r} is not a Spine run ({desc.workflow_type})")
    page = RunPage(
        workflow_id=desc.id,
        run_id=desc.run_id,
        workflow_status=desc.status.name.lower() if desc.status else "unknown",
        status=desc.typed_search_attributes.get(SA_STATUS) or "",
        web_ui=web_ui_url(desc.id, desc.run_id, client.namespace, env.get("SPINE_UI_URL")),
        started=when(desc.start_time) if desc.start_time else "",
        closed=when(desc.close_time) if desc.close_time else "",
    )
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            page.state = await get_state(handle)
            page.status = page.state.status
            page.spent_usd = page.state.usage.usd
        except SpineClientError as err:
            page.problems.append(str(err))
    page.story = await story(client, workflow_id)
    if page.story.problem:
        page.problems.append(page.story.problem)
    result = page.story.result
    if result is not None and desc.status != WorkflowExecutionStatus.RUNNING:
        page.status, page.spent_usd = result.status, result.usage.usd
    request, spec = page.story.request, page.story.spec
    asked = request.limits.max_usd if request and request.limits else None
    limits = [x for x in (asked, spec.max_usd if spec else None) if x is not None]
    page.limit_usd = min(limits) if limits else None
    if request is not None:
        page.account_today = await account_today(client, request.account)
        if policy is not None and request.account in policy.accounts:
            page.account_daily_limit = policy.accounts[request.account].daily_usd
    page.audit = await audit_view(client, env, desc.id, closed=result is not None)
    return page


async def audit_view(
    client: Client, env: Mapping[str, str], workflow_id: str, *, closed: bool
) -> AuditView:
    """The run's audit chain, checked as ``spine audit verify RUN`` checks it."""
    from spine.client.audit_cli import chain_entries, cross_check, open_store, story_line
    from spine.observability.audit import verify

    view = AuditView()
    try:
        store = open_store(env)
    except SpineClientError as err:
        view.verdict = f"cannot open the audit store: {err}"
        return view
    # The cross-check names the run in a visibility query: an id that could break out of the
    # query's quotes is not checked against its anchor (and the page says so).
    quotable = not any(c in workflow_id for c in "'\"\\")
    try:
        entries = await chain_entries(store, workflow_id)
        checked = closed and quotable
        problems = await cross_check(store, entries, workflow_id, client=client) if checked else []
    except Exception as err:  # noqa: BLE001  # a store that fails is said, not fatal
        view.verdict = f"cannot read the audit log: {type(err).__name__}: {err}"[:500]
        return view
    finally:
        await store.close()
    view.entries = entries
    view.lines = [story_line(e) for e in entries]
    if not entries:
        view.verdict = "no audit entries for this run yet"
        return view
    result = verify(entries)
    if result.first_broken is not None:
        view.verified, view.verdict = False, f"broken at {result.first_broken.line()}"
    elif problems:
        view.verified, view.verdict = False, f"does not match Temporal: {problems[0]}"
    else:
        anchored = (
            " and matches the head the run anchored in Temporal"
            if closed and quotable
            else " (not cross-checked with Temporal: the workflow id has quotes)"
            if closed
            else ""
        )
        view.verified, view.verdict = True, f"verified: {len(entries)} entries{anchored}"
    for entry in entries:
        data = entry.data if isinstance(entry.data, dict) else {}
        if entry.kind in ("approval", "operator") or (
            entry.kind == "policy_decision"
            and data.get("decision") in ("needs_approval", "escalated", "parked")
        ):
            view.decisions.append({**data, "at": when(entry.at), "kind": entry.kind})
    return view


# ------------------------------------------------------------------------------------ budgets


@dataclass
class AccountBudget:
    account: str
    day_committed: float = 0.0
    day_reserved: float = 0.0
    daily_limit: float | None = None
    month_committed: float = 0.0
    month_reserved: float = 0.0
    monthly_limit: float | None = None
    open_reservations: int = 0
    overspend: float = 0.0
    problem: str | None = None

    @property
    def day_used(self) -> float:
        return self.day_committed + self.day_reserved

    @property
    def day_fraction(self) -> float | None:
        if not self.daily_limit:
            return None
        return min(self.day_used / self.daily_limit, 1.0)


async def _ledger(client: Client, account: str) -> BudgetView | None:
    handle = client.get_workflow_handle(ledger_workflow_id(account))
    try:
        return await handle.query("show", result_type=BudgetView, rpc_timeout=QUERY_TIMEOUT)
    except RPCError:
        return None


async def account_today(client: Client, account: str) -> tuple[float, float] | None:
    """(committed, reserved) USD of `account` today, or None without a ledger."""
    view = await _ledger(client, account)
    if view is None:
        return None
    day = f"day:{datetime.now(UTC):%Y-%m-%d}"
    for window in view.windows:
        if window.window == day:
            return window.committed_usd, window.reserved_usd
    return 0.0, 0.0


async def budgets(
    client: Client, policy: Policy | None, only: Filter | None = None
) -> list[AccountBudget]:
    """Each account's spend today and this month against its limits (``spine budget show``)."""
    if only is not None and only.account:
        accounts = {only.account}
    else:
        accounts = set(policy.accounts) if policy is not None else set()
        query = f"WorkflowType = '{LEDGER_WORKFLOW_TYPE}'"
        try:
            async for execution in client.list_workflows(query, limit=MAX_LISTED * 2):
                account = execution.id.removeprefix(ledger_workflow_id(""))
                if execution.id != account and re.match(ACCOUNT_PATTERN, account):
                    accounts.add(account)
        except RPCError as err:
            raise SpineClientError(f"cannot list budget ledgers: {err.message}") from err
    now = datetime.now(UTC)
    day, month = f"day:{now:%Y-%m-%d}", f"mon:{now:%Y-%m}"
    gate = asyncio.Semaphore(CONCURRENCY)

    async def read(account: str) -> AccountBudget:
        row = AccountBudget(account)
        if policy is not None and account in policy.accounts:
            limits = policy.accounts[account]
            row.daily_limit, row.monthly_limit = limits.daily_usd, limits.monthly_usd
        async with gate:
            view = await _ledger(client, account)
        if view is None:
            row.problem = "no ledger yet (it starts with the account's first model call)"
            return row
        for window in view.windows:
            if window.window == day:
                row.day_committed, row.day_reserved = window.committed_usd, window.reserved_usd
            elif window.window == month:
                row.month_committed, row.month_reserved = window.committed_usd, window.reserved_usd
        row.open_reservations, row.overspend = view.open_reservations, view.overspend_usd
        return row

    return list(await asyncio.gather(*(read(a) for a in sorted(accounts))))


# -------------------------------------------------------------------------------------- trace


async def trace_lines(env: Mapping[str, str], workflow_id: str) -> tuple[list[str], str | None]:
    """The run's span tree as ``spine trace`` prints it, or why there is none."""
    from spine.client.trace_cli import load_spans, render, spans_for_run
    from spine.store import shared_database

    if shared_database(env) and not env.get("SPINE_TRACE_FILE"):
        from spine.observability.spans import SpanStore
        from spine.store import database_from_env

        try:
            database = database_from_env(env, read_only=True)
            try:
                spans = await SpanStore(database).for_run(workflow_id)
            finally:
                await database.close()
        except Exception as err:  # noqa: BLE001
            return [], f"cannot read spans from the shared database: {type(err).__name__}"
    else:
        from spine.observability.telemetry import default_trace_file

        path = Path(default_trace_file(env))
        if not await asyncio.to_thread(path.exists):
            where = (
                f"spans go to the OTLP endpoint {env['OTEL_EXPORTER_OTLP_ENDPOINT']}; "
                if env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                else ""
            )
            return [], f"{where}no trace file at {path}"
        spans = spans_for_run(await asyncio.to_thread(load_spans, path), workflow_id)
    if not spans:
        return [], "no spans for this run yet (they are written about a second after they end)"
    return render(spans, workflow_id), None
