"""`spine login`, `spine whoami`, `spine sign`: who the `spine` command acts as.

``spine login --user alice`` logs in to OpenBao (``VAULT_ADDR``) and keeps the token (mode 0600)
for later commands, which then sign every start, decision and operator command as alice.
``spine sign`` prints the ``spine_principal`` header for the same call made with the Temporal
CLI (``--headers``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from spine.client.identity import login, signer_from_env
from spine.client.runs import SpineClientError
from spine.contract import PRINCIPAL_HEADER, AgentRequest, ApprovalDecision, OperatorCommand
from spine.guardrails.identity import IdentityError, Purpose, payload_digest, request_digest


@click.command("login")
@click.option("--user", "name", required=True, help="Your principal name (OpenBao user).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
def login_cmd(name: str, password_stdin: bool) -> None:
    """Log in to OpenBao (VAULT_ADDR) as USER; later commands sign as them."""
    url = os.environ.get("VAULT_ADDR")
    if not url:
        raise SpineClientError("VAULT_ADDR is not set (source temporal-dev/.env)")
    password = (
        sys.stdin.readline().rstrip("\n")
        if password_stdin
        else click.prompt(f"password for {name}", hide_input=True)
    )
    try:
        path = login(url, name, password)
    except IdentityError as e:
        raise SpineClientError(str(e)) from e
    click.echo(f"logged in as {name}; token kept in {path}")


@click.command("whoami")
def whoami_cmd() -> None:
    """Show the principal `spine` signs as."""
    try:
        signer = signer_from_env()
    except IdentityError as e:
        raise SpineClientError(str(e)) from e
    if signer is None:
        raise SpineClientError("not logged in: run `spine login --user NAME`")
    click.echo(signer.default or "")


def _load(text: str | None, path: Path | None) -> object:
    try:
        raw = path.read_text() if path is not None else (text or "")
        return json.loads(raw)
    except (OSError, ValueError) as e:
        raise click.UsageError(f"the payload is not readable JSON: {e}") from e


@click.command("sign")
@click.argument("purpose", type=click.Choice(["start", "decide", "operate"]))
@click.option("--workflow-id", required=True, help="The run (workflow id) the call goes to.")
@click.option("--input", "text", help="The call's JSON payload (as given to the Temporal CLI).")
@click.option(
    "--input-file", "path", type=click.Path(dir_okay=False, path_type=Path), help="... or a file."
)
def sign_cmd(purpose: str, workflow_id: str, text: str | None, path: Path | None) -> None:
    """Print the signed header for a Temporal CLI call, e.g.

    \b
    temporal workflow start --type AgentWorkflow --task-queue spine-agents \\
      --workflow-id refund-1 --input-file run.json \\
      --headers "$(spine sign start --workflow-id refund-1 --input-file run.json)"

    The claim binds the workflow id and this exact payload, and expires after a few minutes.
    """
    payload = _load(text, path)
    try:
        signer = signer_from_env()
        if signer is None or signer.default is None:
            raise SpineClientError("not logged in: run `spine login --user NAME`")
        if purpose == "start":
            request = AgentRequest.model_validate(payload)
            kind: Purpose = "fork" if request.fork_from is not None else "start"
            claim = signer.sign(signer.default, kind, workflow_id, request_digest(request))
        else:
            model = ApprovalDecision if purpose == "decide" else OperatorCommand
            body = model.model_validate(payload)
            claim = signer.sign(signer.default, purpose, workflow_id, payload_digest(body))  # type: ignore[arg-type]  # click.Choice checked it
    except IdentityError as e:
        raise SpineClientError(str(e)) from e
    except ValueError as e:  # pydantic's ValidationError
        raise click.UsageError(f"the payload is not a valid {purpose} payload: {e}") from e
    click.echo(f"{PRINCIPAL_HEADER}={claim.model_dump_json()}")
