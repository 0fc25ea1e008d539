"""Printing a run's live stream: model tokens as they arrive, one line per step.

``spine run --wait`` and ``spine status RUN --follow`` read the run's stream
(:mod:`spine.observability.streams`) from the store the workers write it to (``SPINE_DATABASE_URL``,
else SQLite in ``SPINE_STATE_DIR``): first what already happened, then the live tail. Each
sub-agent the run starts is followed too, its lines prefixed with its agent's name. When the
store holds nothing for the run (a worker on another host writing to its own SQLite file), the
run's state is polled instead, as before streams existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from spine.client.audit_cli import summarize
from spine.client.runs import RunHandle, SpineClientError, watch
from spine.observability.streams import StreamEvent, StreamStore, follow, stream_store_from_env

Echo = Callable[..., None]
"""``echo(text, nl=True)``: click.echo, or print-like."""

#: With no stream event this long, the run's state is polled and printed instead.
FALLBACK_AFTER_S = 3.0


class _Screen:
    """One terminal shared by the printers of a run and its sub-agents: a printer that starts a
    line ends the token line another left open."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.open_line: object | None = None

    def line(self, owner: object, text: str) -> None:
        self.end_tokens()
        self.echo(text)

    def tokens(self, owner: object, header: str, text: str) -> None:
        if self.open_line is not owner:
            self.end_tokens()
            self.echo(header, nl=False)
            self.open_line = owner
        self.echo(text, nl=False)

    def end_tokens(self) -> None:
        if self.open_line is not None:
            self.echo("")
            self.open_line = None


class LivePrinter:
    """Prints one run's stream events (`prefix` for a sub-agent's)."""

    def __init__(self, screen: _Screen, run_id: str, prefix: str = "") -> None:
        self.screen = screen
        self.run_id = run_id
        self.prefix = prefix
        self.header = ""
        self.children: list[tuple[str, str]] = []
        """Sub-agent runs started, as (workflow id, agent), for the caller to follow."""

    def event(self, event: StreamEvent) -> None:
        data, p = event.data, self.prefix
        if event.kind == "model_started":
            attempt = int(data.get("attempt") or 1)  # type: ignore[call-overload]  # an int
            if attempt > 1:
                self.screen.line(
                    self,
                    f"{p}  model  step {data.get('step')}: attempt {attempt} starts over "
                    "(the earlier attempt failed; its partial answer does not count)",
                )
            self.header = f"{p}  model  step {data.get('step')} {data.get('model')}: "
            if self.screen.open_line is self:
                self.screen.end_tokens()
        elif event.kind == "token":
            self.screen.tokens(self, self.header or f"{p}  model: ", str(data.get("text", "")))
        elif event.kind == "tool_started":
            purpose = data.get("purpose")
            why = "" if purpose == "call" else f" ({purpose})"
            self.screen.line(self, f"{p}  tool   step {data.get('step')} {data.get('tool')}{why}")
        elif event.kind in ("step", "end"):
            kind = str(data.get("kind", "?"))
            entry = data.get("data") if isinstance(data.get("data"), dict) else {}
            assert isinstance(entry, dict)
            # The audit story line, without its bracketed extras (`spine audit show` has them).
            text = summarize(kind, entry).split("  [", 1)[0]
            self.screen.line(self, f"{p}step {data.get('step', '?')}  {kind:<15} {text}")
            if kind == "policy_decision" and entry.get("decision") == "needs_approval":
                self.screen.line(
                    self,
                    f"{p}          spine approve {self.run_id} {entry.get('approval_id')} "
                    "--by NAME --role ROLE",
                )
            if kind == "sub_agent" and entry.get("decision") == "started":
                self.children.append((str(entry.get("workflow_id")), str(entry.get("agent"))))


async def print_live(handle: RunHandle, echo: Echo, *, store: StreamStore | None = None) -> None:
    """Print the run's stream until the run closes (with its sub-agents' streams)."""
    own_store = store is None
    try:
        store = store or stream_store_from_env(os.environ)
    except ValueError as err:
        raise SpineClientError(str(err)) from err
    done = asyncio.ensure_future(handle.result())
    screen = _Screen(echo)
    seen = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_follow(store, handle.id, screen, "", done, seen, group))
            group.create_task(_fallback(handle, screen, seen, done))
    finally:
        screen.end_tokens()
        if not done.done():
            done.cancel()
        await asyncio.gather(done, return_exceptions=True)
        if own_store:
            await store.close()


async def _follow(
    store: StreamStore,
    run_id: str,
    screen: _Screen,
    prefix: str,
    done: asyncio.Future[object],
    seen: asyncio.Event,
    group: asyncio.TaskGroup,
) -> None:
    printer = LivePrinter(screen, run_id, prefix)
    async for event in follow(store, run_id, until=done.done):
        seen.set()
        printer.event(event)
        while printer.children:
            child_id, agent = printer.children.pop(0)
            group.create_task(
                _follow(store, child_id, screen, f"{prefix}[{agent}] ", done, seen, group)
            )


async def _fallback(
    handle: RunHandle, screen: _Screen, seen: asyncio.Event, done: asyncio.Future[object]
) -> None:
    """No stream for the run after a while: print its state as it changes, as before."""
    from spine.client.output import state_line  # lazily: output imports this module

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(seen.wait(), FALLBACK_AFTER_S)
        return
    if done.done():
        return
    screen.line(None, "(no live stream for this run here; showing its state as it changes)")
    async for state in watch(handle):
        if seen.is_set():
            return
        screen.line(None, state_line(state))
