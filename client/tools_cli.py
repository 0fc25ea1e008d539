"""`spine tools check` and `spine tools lock`: keep tool contracts versioned.

Both build the registry a worker would serve (agent modules from ``--agents``, else
``SPINE_AGENTS``, else ``spine.demo.agent``) and compare it with the lock file (``--lock``, else
``SPINE_TOOLS_LOCK``, else ``tools.lock.json`` in the current directory). The rules are in
:mod:`spine.activities.contracts`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from spine.activities.contracts import DEFAULT_LOCK_PATH, Change, LockError, check_lock, load_lock
from spine.activities.contracts import write_lock as _write_lock
from spine.activities.tools import Registry, ToolDefinitionError


def _registry(agents: str | None) -> Registry:
    from spine.plugin import load_registry  # lazily: it imports every activity
    from spine.worker import importable_cwd

    importable_cwd()  # `--agents my_agent` finds ./my_agent.py, as the worker does
    spec = agents or os.environ.get("SPINE_AGENTS") or "spine.demo.agent"
    modules = tuple(m.strip() for m in spec.split(",") if m.strip())
    try:
        return load_registry(modules)
    except ToolDefinitionError as err:
        raise click.ClickException(f"tool definitions are wrong: {err}") from err
    except ImportError as err:  # AgentModuleError: names the module and why, in one line
        raise click.ClickException(str(err)) from err
    except ValueError as err:
        raise click.ClickException(f"cannot load agent modules {spec!r}: {err}") from err


def _lock_path(lock: Path | None) -> Path:
    return lock or Path(os.environ.get("SPINE_TOOLS_LOCK") or DEFAULT_LOCK_PATH)


def _changes(
    agents: str | None, lock: Path, *, must_exist: bool = False
) -> tuple[Registry, list[Change]]:
    registry = _registry(agents)
    if must_exist and not lock.is_file():
        raise click.ClickException(f"no lock file {str(lock)!r}; create it with `spine tools lock`")
    try:
        locked = load_lock(lock)
    except LockError as err:
        raise click.ClickException(str(err)) from err
    return registry, check_lock(locked, registry.tools)


_AGENTS = click.option(
    "--agents", help="Comma-separated agent modules (default: $SPINE_AGENTS or demo.agent)."
)
_LOCK = click.option(
    "--lock",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Lock file (default: $SPINE_TOOLS_LOCK or ./tools.lock.json).",
)


@click.group("tools")
def tools() -> None:
    """Check and pin tool contracts (tools.lock.json)."""


@tools.command("check")
@_AGENTS
@_LOCK
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
@click.pass_context
def check_cmd(ctx: click.Context, agents: str | None, lock: Path | None, as_json: bool) -> None:
    """Fail (exit 1) on a breaking tool change without a version bump.

    One line per breaking change on stderr, naming tool, version and field. Compatible changes,
    new tools or versions, and locked versions no longer served are reported and pass.
    """
    path = _lock_path(lock)
    _, changes = _changes(agents, path, must_exist=True)
    breaking = [c for c in changes if c.breaking]
    if as_json:
        click.echo(json.dumps({"ok": not breaking, "changes": [c.as_json() for c in changes]}))
    else:
        for change in changes:
            if change.breaking:
                click.echo(f"spine tools check: breaking: {change.line()}", err=True)
            else:
                click.echo(f"{change.kind}: {change.line()}")
        if not breaking:
            stale = " (the lock is out of date: run `spine tools lock`)" if changes else ""
            click.echo(f"ok: tool contracts match {path}{stale}")
    if breaking:
        if not as_json:
            click.echo(
                f"spine tools check: {len(breaking)} breaking change(s) against {path}", err=True
            )
        ctx.exit(1)


@tools.command("lock")
@_AGENTS
@_LOCK
@click.option(
    "--force", is_flag=True, help="Write even if a pinned version changed in a breaking way."
)
@click.pass_context
def lock_cmd(ctx: click.Context, agents: str | None, lock: Path | None, force: bool) -> None:
    """Rewrite the lock file from the served tools (sorted keys, stable formatting).

    Refuses while a pinned version has a breaking change (bump its version instead), unless
    --force.
    """
    path = _lock_path(lock)
    registry, changes = _changes(agents, path)
    breaking = [c for c in changes if c.breaking]
    if breaking and not force:
        for change in breaking:
            click.echo(f"spine tools lock: breaking: {change.line()}", err=True)
        click.echo(
            f"spine tools lock: not written: {len(breaking)} breaking change(s); bump the "
            "versions, or pass --force to re-pin them",
            err=True,
        )
        ctx.exit(1)
    _write_lock(path, registry.tools)
    count = len(registry.tools)
    click.echo(f"wrote {path}: {count} tool version(s) from {len(registry.tool_names)} tool(s)")


def main() -> None:
    """``python -m client.tools_cli check|lock``, for use before `spine tools` is wired in."""
    tools.main(prog_name="spine tools")


if __name__ == "__main__":
    main()
