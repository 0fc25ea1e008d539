"""How the `spine` command prints: one-line summaries, JSON, and following a run to its end.

Shared by every `spine` verb (`spine.client.cli` and the ``*_cli`` modules) and the demo; it
imports none of them, so the verbs can import it freely.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import TypeVar

import click

from spine.client.runs import RunHandle, wait_result, watch
from spine.contract import AgentResult, FailedCall, StateView, Usage

T = TypeVar("T")


def compact(value: object) -> str:
    """Compact one-line JSON for tool arguments and outputs."""
    return json.dumps(value, separators=(", ", ": "), default=str)


def state_line(state: StateView) -> str:
    """One progress line: `step 3  awaiting_approval  approval ap-1 issue_refund {...}: why`."""
    line = f"step {state.step}  {state.status}"
    if state.pending_approvals:
        line += "  " + "; ".join(
            f"approval {p.approval_id} {p.tool} {compact(p.args)}: {p.reason}"
            for p in state.pending_approvals
        )
    elif state.status == "running" and state.last_tool:
        line += f"  {state.last_tool}"
    elif state.reason:
        line += f"  {state.reason}"
    return line


def usage_text(usage: Usage) -> str:
    """`1200 input + 180 output tokens, $0.0042`."""
    return f"{usage.input_tokens} input + {usage.output_tokens} output tokens, ${usage.usd:.4f}"


def failed_call_lines(calls: list[FailedCall]) -> list[str]:
    """Tool calls that were refused, failed or skipped, one line each (none: no lines)."""
    if not calls:
        return []
    lines = [f"failed calls ({len(calls)})"]
    for c in calls:
        risky = "  [side effect]" if c.side_effects else ""
        lines.append(f"  step {c.step}  {c.tool} {c.outcome}: {c.reason}{risky}")
    return lines


def result_lines(result: AgentResult) -> list[str]:
    """A human summary of a run's result, one fact per line."""
    lines = [
        f"status    {result.status}",
        f"output    {result.output if result.output is not None else '-'}",
        f"steps     {result.steps}",
        f"usage     {usage_text(result.usage)}",
    ]
    if result.reason:
        lines.append(f"reason    {result.reason}")
    lines.extend(failed_call_lines(result.failed_calls))
    lines.append(f"side effects ({len(result.side_effects)})")
    for fx in result.side_effects:
        undone = "  [compensated]" if fx.compensated else ""
        lines.append(
            f"  step {fx.step}  {fx.tool} {compact(fx.args)} -> {compact(fx.output)}{undone}"
        )
    return lines


def echo_json(value: object) -> None:
    """Pretty JSON on stdout (`--json`)."""
    click.echo(json.dumps(value, indent=2))


def run_async(coro: Coroutine[object, object, T]) -> T:
    """Run a verb's coroutine to completion."""
    return asyncio.run(coro)


#: Exit statuses of ``spine run --wait`` (and ``spine replay --wait``), documented in --help.
EXIT_COMPLETED = 0
EXIT_NOT_COMPLETED = 1  # ended failed, compensated or rejected (or could not be followed)
EXIT_PARKED = 3  # parked for an operator: still open, waiting for retry/skip/compensate/abort


def operator_lines(workflow_id: str, reason: str | None) -> list[str]:
    """What a parked run is waiting for, and the commands that answer it."""
    lines = [f"parked    {reason or 'waiting for an operator'}"]
    for action in ("retry", "skip", "compensate", "abort"):
        lines.append(f"          spine operator {workflow_id} {action} --role operator")
    return lines


async def follow(
    handle: RunHandle,
    started: dict[str, object],
    *,
    wait: bool,
    as_json: bool,
    noun: str = "run",
) -> int:
    """Print `started`, or follow the run to its end.

    Returns `EXIT_COMPLETED`; `EXIT_PARKED` as soon as the run parks (it stays open, waiting
    for an operator: the reason and the operator commands are printed); else
    `EXIT_NOT_COMPLETED`.
    """
    if not wait:
        if as_json:
            echo_json(started)
        return 0
    parked = await _until_closed_or_parked(handle, live=not as_json)
    if parked is not None:
        if as_json:
            echo_json({**started, "state": parked.model_dump(mode="json"), "result": None})
        else:
            for line in operator_lines(handle.id, parked.reason):
                click.echo(line)
        click.echo(
            f"spine: error: {noun} {handle.id!r} is parked: {parked.reason or 'see above'}",
            err=True,
        )
        return EXIT_PARKED
    result = await wait_result(handle)
    if as_json:
        echo_json({**started, "result": result.model_dump(mode="json")})
    else:
        for line in result_lines(result):
            click.echo(line)
    if result.status != "completed":
        reason = f" ({result.reason})" if result.reason else ""
        click.echo(f"spine: error: {noun} {handle.id!r} ended {result.status}{reason}", err=True)
        return EXIT_NOT_COMPLETED
    return EXIT_COMPLETED


async def _first_parked(handle: RunHandle) -> StateView | None:
    """The run's state once it is parked, or None when it closed first."""
    async for state in watch(handle):
        if state.status == "parked":
            return state
    return None


async def _until_closed_or_parked(handle: RunHandle, *, live: bool) -> StateView | None:
    """Follow the run (printing its stream when `live`) until it closes, or until it parks:
    then return its state (a parked run stays open, waiting for an operator). A stream that
    cannot be read is one line on stderr; the run is still followed by its state."""
    parked = asyncio.ensure_future(_first_parked(handle))
    printing = None
    if live:
        from spine.client.live import print_live  # lazily: it imports this module's users

        printing = asyncio.ensure_future(print_live(handle, click.echo))  # tokens and steps
    try:
        while True:
            waiting = [t for t in (parked, printing) if t is not None]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if parked.done():
                if parked.result() is not None:
                    return parked.result()
                if printing is not None:
                    await asyncio.gather(printing, return_exceptions=True)  # its last lines
                return None
            assert printing is not None and printing.done()
            problem = printing.exception()
            if problem is None:
                return None  # the run closed
            click.echo(f"spine: live output unavailable: {_first_cause(problem)}", err=True)
            printing = None
    finally:
        for task in (parked, printing):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(parked, *([printing] if printing else []), return_exceptions=True)


def _first_cause(error: BaseException) -> str:
    """One line for an error (the first of a group)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return (str(error) or type(error).__name__).splitlines()[0][:300]
