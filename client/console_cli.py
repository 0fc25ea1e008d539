"""`spine console`: serve the approvals and operations console (see :mod:`spine.client.console`).

Kept apart from the console itself so the `spine` command does not load the web stack until
the console is asked for.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from spine.client.runs import SpineClientError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8300


def console_run_url(workflow_id: str) -> str | None:
    """The console's page of a run, when ``SPINE_CONSOLE_URL`` says where the console is."""
    import urllib.parse

    base = (os.environ.get("SPINE_CONSOLE_URL") or "").strip().rstrip("/")
    if not base:
        return None
    return f"{base}/runs/{urllib.parse.quote(workflow_id, safe='')}"


def _env_port() -> int:
    raw = os.environ.get("SPINE_CONSOLE_PORT") or str(DEFAULT_PORT)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise click.UsageError(f"SPINE_CONSOLE_PORT {raw!r} is not a port number")
    return int(raw)


@click.command("console")
@click.option(
    "--host",
    default=lambda: os.environ.get("SPINE_CONSOLE_HOST") or DEFAULT_HOST,
    show_default=f"$SPINE_CONSOLE_HOST or {DEFAULT_HOST}",
    help="Address to listen on.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help=f"Port to listen on (default $SPINE_CONSOLE_PORT or {DEFAULT_PORT}).",
)
@click.option(
    "--vault-addr",
    default=lambda: os.environ.get("VAULT_ADDR") or "",
    help="OpenBao, where people sign in (default $VAULT_ADDR).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get("SPINE_POLICY") or None,
    help="The workers' policy file: budget limits and role hints (default $SPINE_POLICY or the "
    "shipped policy).",
)
@click.option(
    "--secure-cookies/--no-secure-cookies",
    default=lambda: os.environ.get("SPINE_CONSOLE_SECURE_COOKIES", "0").lower() in ("1", "true"),
    help="Mark the session cookie Secure: set when people reach the console over HTTPS "
    "(default $SPINE_CONSOLE_SECURE_COOKIES).",
)
def console(
    host: str, port: int | None, vault_addr: str, policy_path: Path | None, secure_cookies: bool
) -> None:
    """Serve the approvals and operations console (inbox, parked runs, runs, budgets).

    People sign in with their OpenBao login; each decision is signed as them.
    """
    from spine.client.console import ConsoleSettings, serving
    from spine.client.output import run_async
    from spine.client.runs import connect
    from spine.guardrails.policy import PolicyError, load_policy

    if not vault_addr:
        raise click.UsageError(
            "--vault-addr (or VAULT_ADDR) is required: people sign in to the console with "
            "their OpenBao login"
        )
    try:
        policy = load_policy(policy_path)
    except PolicyError as err:
        raise click.UsageError(str(err)) from err
    port = port or _env_port()

    async def main() -> None:
        client = await connect(signer=None)
        settings = ConsoleSettings(
            client=client, vault_url=vault_addr, policy=policy, secure_cookies=secure_cookies
        )
        try:
            async with serving(settings, host=host, port=port) as url:
                click.echo(f"Spine console  {url}  (sign in with your OpenBao login)")
                await asyncio.Event().wait()
        except OSError as err:
            raise SpineClientError(
                f"cannot listen on {host}:{port}: {err.strerror or err}"
            ) from err

    run_async(main())
