"""`spine audit`: read a run's audit log as a story, and check that nobody changed it.

The store comes from the environment, as the worker's does: ``SPINE_AUDIT_DSN``
(``sqlite:///PATH`` or ``postgresql://...``), else ``SPINE_STATE_DIR/audit.db`` (default
``.spine``). The commands only read; a broken chain is one ``spine: error:`` line and exit 1.

The story line of each kind reads these keys of `data` (missing ones print as ``?``; any other
key is shown as ``[key=value ...]``, so nothing stored is hidden):

=================  ===========================================================================
run_started        user, role, provider, model, goal_digest
model_turn         model, input_tokens, output_tokens, usd, finish_reason, tool_calls [{name}]
tool_call          tool, version, args_digest, outcome, error, idempotency_key, reconciled
policy_decision    decision, tool, reason
budget             spent_usd, limit_usd, decision, reason
approval           approval_id, decision, by, role, reason, accepted (false: refused)
operator           action, by, role, reason, accepted (false: refused)
compensation       tool, compensates, outcome, error, idempotency_key
run_outcome        status, reason, steps, usd
sub_agent          decision (started, finished; started_by in the child), agent, workflow_id,
                   carve_usd, status, usd, reason
alert              message or reason
=================  ===========================================================================

This module does not import ``spine.client.cli`` (which adds `audit` to the ``spine`` group), so
there
is no import cycle.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from spine.activities.errors import SpineError
from spine.client.runs import SpineClientError
from spine.observability.audit import AuditStore, StoredEntry, VerifyResult, store_from_env, verify

if TYPE_CHECKING:
    from temporalio.client import Client

T = TypeVar("T")


def open_store(env: Mapping[str, str] | None = None) -> AuditStore:
    """The configured audit store, read-only.

    Raises:
        SpineClientError: the DSN is not supported or the SQLite file does not exist.
    """
    env = os.environ if env is None else env
    state_dir = Path(env.get("SPINE_STATE_DIR") or ".spine")
    try:
        return store_from_env(env, state_dir, read_only=True)
    except FileNotFoundError as e:
        raise SpineClientError(
            f"{e}; set SPINE_STATE_DIR to the worker's state directory or SPINE_AUDIT_DSN"
        ) from e
    except (ValueError, ImportError) as e:
        raise SpineClientError(str(e)) from e


def _with_store(action: Callable[[AuditStore], Awaitable[T]]) -> T:
    """Run `action` on the configured store, closing it afterwards; store errors in one line."""

    async def run() -> T:
        store = open_store()
        try:
            return await action(store)
        except SpineError as e:
            raise SpineClientError(e.message) from e
        finally:
            await store.close()

    return asyncio.run(run())


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# --- the story -------------------------------------------------------------------------------


def short(value: object) -> str:
    """A digest cut to something a person can compare (`sha256:3f2a9c1be0d4`); others as is."""
    text = str(value)
    if text.startswith("sha256:"):
        return text[:19]
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text


def _usd(value: object) -> str:
    return f"${value:.4f}" if isinstance(value, int | float) else "$?"


def _by(data: Mapping[str, object]) -> str:
    who = data.get("by") or "?"
    return f"{who} ({data['role']})" if data.get("role") else str(who)


def _generic(data: Mapping[str, object]) -> str:
    return " ".join(
        f"{k}={short(v) if not isinstance(v, dict | list) else json.dumps(v, default=str)}"
        for k, v in sorted(data.items())
    )


def _tail(data: Mapping[str, object], known: set[str]) -> str:
    """Whatever the summary did not say, as `key=value` pairs, so nothing stored is hidden."""
    rest = {k: v for k, v in data.items() if k not in known}
    return f"  [{_generic(rest)}]" if rest else ""


def _refused(data: Mapping[str, object]) -> str:
    return "refused " if data.get("accepted") is False or data.get("refused") else ""


def summarize(kind: str, data: Mapping[str, object]) -> str:
    """A short human summary of an entry's data; unknown keys follow in brackets."""
    d = data
    match kind:
        case "run_started":
            known = {"user", "role", "goal", "goal_digest", "provider", "model"}
            text = f"for {d.get('user', '?')} ({d.get('role', '?')})"
            if d.get("provider") or d.get("model"):
                text += f", model {d.get('provider', '?')}:{d.get('model', '?')}"
            if d.get("goal_digest") or d.get("goal"):
                text += f", goal {short(d.get('goal_digest') or d.get('goal'))}"
        case "model_turn":
            known = {
                "model",
                "provider",
                "input_tokens",
                "output_tokens",
                "usd",
                "cost_usd",
                "finish_reason",
                "finish",
                "tool_calls",
            }
            text = (
                f"{d.get('model', '?')}: {d.get('input_tokens', '?')} in / "
                f"{d.get('output_tokens', '?')} out tokens, "
                f"{_usd(d.get('usd', d.get('cost_usd')))}, "
                f"finish {d.get('finish_reason', d.get('finish', '?'))}"
            )
            calls = d.get("tool_calls")
            if isinstance(calls, list) and calls:
                text += " -> " + ", ".join(
                    str(c.get("name", "?")) if isinstance(c, dict) else str(c) for c in calls
                )
        case "tool_call":
            known = {
                "tool",
                "version",
                "args_digest",
                "outcome",
                "idempotency_key",
                "error",
                "reconciled",
            }
            version = f"@{d['version']}" if d.get("version") is not None else ""
            text = (
                f"{d.get('tool', '?')}{version}({short(d.get('args_digest', ''))}) -> "
                f"{d.get('outcome', '?')}"
            )
            if d.get("reconciled"):
                text += " (already done: found by its reconcile tool, not called again)"
            if d.get("error"):
                text += f": {d['error']}"
            if d.get("idempotency_key"):
                text += f"  key {d['idempotency_key']}"
        case "policy_decision":
            known = {"decision", "reason", "tool"}
            text = f"{d.get('decision', '?')}"
            if d.get("tool"):
                text += f" {d['tool']}"
            if d.get("reason"):
                text += f": {d['reason']}"
        case "budget":
            known = {"spent_usd", "usd", "limit_usd", "decision", "reason"}
            text = f"{_usd(d.get('spent_usd', d.get('usd')))} of {_usd(d.get('limit_usd'))}"
            if d.get("decision"):
                text += f" -> {d['decision']}"
            if d.get("reason"):
                text += f": {d['reason']}"
        case "approval":
            known = {"approval_id", "decision", "by", "role", "reason", "accepted", "refused"}
            text = f"{_refused(d)}{d.get('decision', '?')} {d.get('approval_id', '?')} by {_by(d)}"
            if d.get("reason"):
                text += f": {d['reason']}"
        case "operator":
            known = {"action", "by", "role", "reason", "accepted", "refused"}
            text = f"{_refused(d)}{d.get('action', '?')} by {_by(d)}"
            if d.get("reason"):
                text += f": {d['reason']}"
        case "compensation":
            known = {"tool", "compensates", "step", "outcome", "idempotency_key", "error"}
            text = f"{d.get('tool', '?')} undoes {d.get('compensates', '?')}"
            text += f" -> {d.get('outcome', '?')}"
            if d.get("error"):
                text += f": {d['error']}"
            if d.get("idempotency_key"):
                text += f"  key {d['idempotency_key']}"
        case "run_outcome":
            known = {"status", "reason", "steps", "usd", "input_tokens", "output_tokens"}
            text = str(d.get("status", "?"))
            if d.get("reason"):
                text += f": {d['reason']}"
            if d.get("steps") is not None or d.get("usd") is not None:
                text += f"  ({d.get('steps', '?')} steps, {_usd(d.get('usd'))})"
        case "sub_agent":
            known = {"decision", "agent", "workflow_id", "status", "reason", "usd", "carve_usd"}
            text = f"{d.get('decision', '?')} {d.get('agent', '?')} {d.get('workflow_id', '?')}"
            if d.get("carve_usd") is not None:
                text += f", budget {_usd(d.get('carve_usd'))}"
            if d.get("status"):
                text += f" -> {d['status']}"
                if d.get("usd") is not None:
                    text += f" ({_usd(d.get('usd'))})"
            if d.get("reason"):
                text += f": {d['reason']}"
        case "alert":
            known = {"message", "reason"}
            text = str(d.get("message") or d.get("reason") or "")
        case _:
            return _generic(d)
    return text + _tail(d, known)


def _when(at: object) -> str:
    """`2026-01-02 10:00:00Z` for an ISO time (UTC); anything else as stored."""
    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        return str(at)
    if when.tzinfo is None:
        return when.strftime("%Y-%m-%d %H:%M:%S")
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def safe(text: str) -> str:
    """`text` with control characters escaped, so a stored value cannot forge a line."""
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text
    )


def story_line(entry: StoredEntry) -> str:
    """One entry as `time  #seq  step N  kind  actor  summary`; nothing stored can add a line."""
    data = entry.data if isinstance(entry.data, dict) else {"data": entry.data}
    return safe(
        f"{_when(entry.at)}  #{entry.seq:<3} step {entry.step!s:<3} {entry.kind!s:<15} "
        f"{entry.actor!s:<12} {summarize(str(entry.kind), data)}"
    )


def chain_line(result: VerifyResult) -> str:
    """`chain: ok (N entries)` or `chain: broken at run 'r' seq 3: ...`."""
    if result.first_broken is None:
        runs = f"{len(result.runs)} runs, " if len(result.runs) != 1 else ""
        return f"chain: ok ({runs}{result.entries} entries)"
    return f"chain: BROKEN at {result.first_broken.line()}"


def _broken_error(result: VerifyResult) -> SpineClientError:
    assert result.first_broken is not None
    return SpineClientError(f"audit chain broken: {result.first_broken.line()}")


# --- commands --------------------------------------------------------------------------------


@click.group("audit")
def audit() -> None:
    """Read and check the tamper-evident audit log.

    The log is read from SPINE_AUDIT_DSN (sqlite:///PATH or postgresql://...), else from
    SPINE_STATE_DIR/audit.db (default .spine/audit.db).
    """


async def chain_entries(store: AuditStore, run: str) -> list[StoredEntry]:
    """Entries of RUN: an exact chain id, or a workflow id.

    A run's chain id is ``<workflow id>:<first run id>``, so a workflow id reused for a new run
    starts a new chain; given a workflow id, this returns the newest of its chains.
    """
    entries = await store.entries(run)
    if entries:
        return entries
    chains = [r for r in await store.run_ids() if r.startswith(f"{run}:")]
    loaded = [await store.entries(chain) for chain in chains]
    loaded = [e for e in loaded if e]
    return max(loaded, key=lambda e: e[0].at, default=[])


@audit.command("show")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(run: str, as_json: bool) -> None:
    """Print the story of RUN (a workflow id), one line per entry, then check its chain."""

    async def load(store: AuditStore) -> tuple[str, list[StoredEntry]]:
        return str(store), await chain_entries(store, run)

    where, entries = _with_store(load)
    if not entries:
        raise SpineClientError(f"no audit entries for run {run!r} in {where}")
    result = verify(entries)
    if as_json:
        _echo_json(
            {
                "run_id": run,
                "entries": [e.model_dump(mode="json", warnings=False) for e in entries],
                "chain": result.model_dump(mode="json"),
            }
        )
    else:
        for entry in entries:
            click.echo(story_line(entry))
        click.echo(chain_line(result))
    if not result.ok:
        raise _broken_error(result)


@audit.command("verify")
@click.argument("run", required=False)
@click.option(
    "--offline",
    is_flag=True,
    help="Only recompute the chains; do not cross-check them with Temporal.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(run: str | None, offline: bool, as_json: bool) -> None:
    """Recompute the hash chain of RUN, or of every run, and check it against Temporal.

    Each finished run anchors its chain's head (entries and hash) in its result in Temporal,
    so a store whose tail was cut, whose run was deleted, or whose chain was recomputed by
    someone with write access fails here, naming what is wrong. Exit 1 on the first problem.
    """

    async def load(store: AuditStore) -> tuple[str, list[StoredEntry], list[str]]:
        if run is not None:
            entries = await chain_entries(store, run)
        else:
            entries = []
            for run_id in await store.run_ids():
                entries.extend(await store.entries(run_id))
        problems = [] if offline else await cross_check(store, entries, run)
        return str(store), entries, problems

    where, entries, problems = _with_store(load)
    if run is not None and not entries and not problems:
        raise SpineClientError(f"no audit entries for run {run!r} in {where}")
    result = verify(entries)
    if as_json:
        _echo_json({**result.model_dump(mode="json"), "anchors": problems or "ok"})
    else:
        for check in result.runs:
            state = "ok" if check.broken is None else f"BROKEN at seq {check.broken.seq}"
            click.echo(f"{safe(check.run_id)}: {state} ({check.entries} entries)")
        click.echo(chain_line(result))
        if not offline:
            click.echo(f"anchors: {'ok' if not problems else problems[0]}")
    if not result.ok:
        raise _broken_error(result)
    if problems:
        raise SpineClientError(f"audit log does not match Temporal: {problems[0]}")


async def cross_check(
    store: AuditStore, entries: list[StoredEntry], run: str | None, *, client: Client | None = None
) -> list[str]:
    """Where the store disagrees with the heads finished runs anchored in Temporal (through
    `client`, else a connection from the environment)."""
    from temporalio.client import WorkflowExecutionStatus

    from spine.client.runs import connect
    from spine.contract import WORKFLOW_TYPE, AgentResult

    if client is None:
        try:
            client = await connect(signer=None)
        except SpineClientError as e:
            return [
                f"cannot cross-check with Temporal ({e}); use --offline to check the chains only"
            ]
    by_run: dict[str, list[StoredEntry]] = {}
    for entry in entries:
        by_run.setdefault(entry.run_id, []).append(entry)
    query = f"WorkflowType = '{WORKFLOW_TYPE}' AND ExecutionStatus = 'Completed'"
    if run is not None:
        query += f" AND WorkflowId = '{run.split(':', 1)[0]}'"
    problems: list[str] = []
    async for execution in client.list_workflows(query):
        if execution.status != WorkflowExecutionStatus.COMPLETED:
            continue
        handle = client.get_workflow_handle(
            execution.id, run_id=execution.run_id, result_type=AgentResult
        )
        result = await handle.result(follow_runs=False)
        anchor = result.audit
        if anchor is None or anchor.entries == 0:
            continue
        first = (await handle.describe()).raw_description.workflow_execution_info.first_run_id
        chain = f"{execution.id}:{first or execution.run_id}"
        stored = sorted(by_run.get(chain) or await store.entries(chain), key=lambda e: e.seq)
        if not stored:
            problems.append(
                f"run {chain!r} is missing from the audit store (it anchored {anchor.entries} "
                "entries)"
            )
        elif len(stored) < anchor.entries:
            problems.append(
                f"run {chain!r} lost the tail of its chain: the store has {len(stored)} entries, "
                f"the run anchored {anchor.entries}"
            )
        elif stored[anchor.entries - 1].hash != anchor.head:
            problems.append(
                f"run {chain!r} seq {anchor.entries - 1}: hash differs from the head the run "
                "anchored (the chain was recomputed or rewritten)"
            )
    return problems
