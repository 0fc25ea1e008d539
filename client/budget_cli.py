"""`spine budget show ACCOUNT`: what the account's ledger holds."""

from __future__ import annotations

import click
from temporalio.service import RPCError

from spine.client.output import echo_json, run_async
from spine.client.runs import SpineClientError, connect
from spine.contract import ledger_workflow_id
from spine.payloads import BudgetView


@click.group("budget")
def budget() -> None:
    """Per-account budgets (the account's ledger workflow)."""


@budget.command("show")
@click.argument("account")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(account: str, as_json: bool) -> None:
    """Show ACCOUNT's committed and reserved spend per day and month."""
    view = run_async(_show(account))
    if as_json:
        echo_json(view.model_dump(mode="json"))
        return
    click.echo(f"account {view.account}  (ledger {ledger_workflow_id(account)})")
    for w in view.windows:
        committed, reserved = w.committed_usd, w.reserved_usd
        click.echo(f"  {w.window:<16} committed {committed:>10.4f} USD  reserved {reserved:.4f}")
    click.echo(
        f"  open reservations {view.open_reservations}, overspend {view.overspend_usd:.4f} USD"
    )


async def _show(account: str) -> BudgetView:
    client = await connect()
    handle = client.get_workflow_handle(ledger_workflow_id(account))
    try:
        return await handle.query("show", result_type=BudgetView)
    except RPCError as err:
        raise SpineClientError(
            f"no budget ledger for account {account!r} (it starts with the account's first "
            f"model call): {err.message}"
        ) from err
