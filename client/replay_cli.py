"""`spine replay`: fork a run from a step, with changes, without redoing what it did.

    spine replay RUN --from-step N [--set KEY=VALUE ...] [--id NEW] [--dry-run] [--wait] [--json]
    spine replay --query '<visibility query>' --from-step N [--set ...] [--dry-run] [--json]

The new run carries RUN's state at the end of step N (transcript, completed side effects with
their compensations and idempotency keys, spend, pinned tool versions) and goes on with step N+1;
see :mod:`spine.client.forks`. It is linked to RUN by the memo ``forked_from`` and, where
registered,
the search attribute ``SpineForkedFrom``. With ``--query``, every matching run that is parked or
ended without completing is forked the same way, except runs already forked (found through
``SpineForkedFrom``), so running it again does not fork twice; ``--dry-run`` lists what would
happen.

A refusal (a pinned tool version the current workers do not serve, a step that did not finish,
a side effect the original already undid, a model with no price) is one ``spine: error:`` line
and exit 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import click

from spine.client.forks import (
    ForkPlan,
    current_registry,
    existing_forks,
    find_runs,
    forked_from_registered,
    parse_sets,
    plan_fork,
    start_fork,
)
from spine.client.output import echo_json, follow, run_async
from spine.client.runs import SpineClientError, connect, task_queue, web_ui_url


@click.command("replay")
@click.argument("run", required=False)
@click.option(
    "--from-step",
    "step",
    type=click.IntRange(min=0),
    required=True,
    help="Carry the run's state at the end of this step; the fork goes on with the next one.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change goal, model.provider, model.name, model.fallback, model.script (JSON or "
    "@FILE), model.fail_rate, limits.max_steps or limits.max_usd. Repeatable.",
)
@click.option("--id", "new_id", help="Workflow id of the fork (default RUN-fork<N>-<random>).")
@click.option("--query", help="Fork every parked or failed run matching this visibility query.")
@click.option("--dry-run", is_flag=True, help="Only show what would be forked.")
@click.option("--wait", is_flag=True, help="Follow the fork and print its result.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def replay(
    ctx: click.Context,
    run: str | None,
    step: int,
    sets: tuple[str, ...],
    new_id: str | None,
    query: str | None,
    dry_run: bool,
    wait: bool,
    as_json: bool,
) -> None:
    """Start a new run from RUN's state at the end of step N, with changes (--set).

    Steps 1..N are not executed again: their side effects stay done (and are still compensated
    if the new run fails), their spend counts, and the tool versions RUN pinned must still be
    served. The new run's memo `forked_from` names RUN and the step.
    """
    if (run is None) == (query is None):
        raise click.UsageError("give either RUN or --query (not both)")
    if query is not None and (new_id or wait):
        raise click.UsageError("--id and --wait work on a single RUN, not with --query")
    try:
        changes = parse_sets(sets)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if query is not None:
        ctx.exit(run_async(_bulk(query, step, changes, dry_run, as_json)))
    assert run is not None
    ctx.exit(run_async(_single(run, step, changes, new_id, dry_run, wait, as_json)))


def _describe_plan(plan: ForkPlan) -> list[str]:
    carry = plan.point.carry
    effects = ", ".join(f"{e.tool}@step{e.step}" for e in carry.side_effects) or "none"
    lines = [
        f"carried   {plan.point.step} step(s), {len(carry.pending_messages)} messages, "
        f"${carry.usage.usd:.4f} spent",
        f"          side effects: {effects}",
        f"          tools: {', '.join(f'{t.name}@{t.version}' for t in carry.spec.tools)}",
    ]
    if plan.sets:
        lines.append("changed   " + ", ".join(f"{k}={v}" for k, v in plan.sets.items()))
    return lines


async def _single(
    workflow_id: str,
    step: int,
    changes: Mapping[str, str],
    new_id: str | None,
    dry_run: bool,
    wait: bool,
    as_json: bool,
) -> int:
    registry = current_registry()
    client = await connect()
    try:
        plan = await plan_fork(client, workflow_id, step, changes, registry=registry, new_id=new_id)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    if dry_run:
        if as_json:
            echo_json({"dry_run": True, **plan.as_json()})
        else:
            click.echo(f"would fork {workflow_id} at step {step} -> {plan.new_id}")
            for line in _describe_plan(plan):
                click.echo(line)
        return 0
    linked = await forked_from_registered(client)
    handle = await start_fork(client, plan, task_queue=task_queue(), link_attribute=linked)
    url = web_ui_url(handle.id, handle.result_run_id, client.namespace)
    started = {**plan.as_json(), "run_id": handle.result_run_id, "web_ui_url": url}
    if not as_json:
        click.echo(f"forked {workflow_id} at step {step} -> {handle.id}")
        for line in _describe_plan(plan):
            click.echo(line)
        click.echo(f"Web UI    {url}")
        if plan.point.status == "parked":
            click.echo(
                f"note: {workflow_id} is still parked; `spine operator {workflow_id} compensate` "
                "or `abort` would undo the side effects this fork carried: terminate it instead "
                f"(temporal workflow terminate --workflow-id {workflow_id})"
            )
    return await follow(handle, started, wait=wait, as_json=as_json, noun="fork")


async def _bulk(
    query: str, step: int, changes: Mapping[str, str], dry_run: bool, as_json: bool
) -> int:
    registry = current_registry()
    client = await connect()
    candidates = await find_runs(client, query)
    linked = await forked_from_registered(client)
    rows: list[dict[str, object]] = []
    for found in candidates:
        row: dict[str, object] = {
            "workflow_id": found.workflow_id,
            "run_id": found.run_id,
            "status": found.status,
        }
        rows.append(row)
        if not found.eligible:
            row.update(action="skip", reason="not parked or failed")
            continue
        forks = await existing_forks(client, found.workflow_id) if linked else []
        if forks:
            row.update(
                action="skip",
                reason=f"already forked as {', '.join(forks)} (fork it by id to fork it again)",
            )
            continue
        try:
            plan = await plan_fork(client, found.workflow_id, step, changes, registry=registry)
            if not dry_run:
                handle = await start_fork(
                    client, plan, task_queue=task_queue(), link_attribute=linked
                )
                row["run_id_fork"] = handle.result_run_id
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        except SpineClientError as e:  # ForkRefused included: one line per run
            row.update(action="refuse", reason=str(e))
            continue
        row.update(action="fork", fork_id=plan.new_id, step=step)
    refused = [r for r in rows if r["action"] == "refuse"]
    forked = [r for r in rows if r["action"] == "fork"]
    if as_json:
        echo_json({"dry_run": dry_run, "query": query, "from_step": step, "runs": rows})
    else:
        verb = "would fork" if dry_run else "forked"
        for row in rows:
            head = f"{row['workflow_id']} ({row['status']})"
            if row["action"] == "fork":
                click.echo(f"{verb:<10} {head} at step {step} -> {row['fork_id']}")
            else:
                click.echo(f"{row['action']:<10} {head}: {row['reason']}")
        click.echo(
            f"{'dry run: ' if dry_run else ''}{len(forked)} run(s) {verb}, "
            f"{len(rows) - len(forked) - len(refused)} skipped, {len(refused)} refused"
        )
    if refused:
        if not as_json:
            click.echo(
                f"spine: error: {len(refused)} matching run(s) could not be forked", err=True
            )
        return 1
    return 0
