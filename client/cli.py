"""The `spine` command: start, watch and steer agent runs, run a worker, run the demo.

Errors are one line on stderr (`spine: error: ...`) with exit status 2 for bad usage or input and
1 for everything else; `--json` prints machine-readable output on stdout.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import click
from pydantic import TypeAdapter, ValidationError
from temporalio.client import WorkflowExecutionStatus

from spine.client.alerts_cli import alerts
from spine.client.audit_cli import audit
from spine.client.budget_cli import budget
from spine.client.codec_cli import codec_server
from spine.client.console_cli import console
from spine.client.identity_cli import login_cmd, sign_cmd, whoami_cmd
from spine.client.output import (
    compact,
    echo_json,
    failed_call_lines,
    follow,
    operator_lines,
    result_lines,
    run_async,
    usage_text,
)
from spine.client.replay_cli import replay
from spine.client.runs import (
    SpineClientError,
    check_agent,
    connect,
    decide,
    describe,
    get_run,
    get_state,
    operate,
    signal_approval,
    start_run,
    wait_result,
    web_ui_url,
)
from spine.client.slo_cli import slo
from spine.client.stream_cli import stream_server
from spine.client.tools_cli import tools
from spine.client.trace_cli import trace
from spine.contract import (
    AgentRequest,
    AgentResult,
    ApprovalDecision,
    Limits,
    ModelChoice,
    OperatorCommand,
    Provider,
    ScriptTurn,
    StateView,
)

_SCRIPT = TypeAdapter(list[ScriptTurn])
_PROVIDERS: dict[str, Provider] = {p: p for p in get_args(Provider)}


# --- input parsing ---------------------------------------------------------------------------


def summarise_validation(error: ValidationError, root: str = "") -> str:
    """A pydantic `ValidationError` as one line: the first problem and how many more."""
    errors = error.errors(include_url=False)
    if not errors:
        return str(error).splitlines()[0]
    first = errors[0]
    loc = root
    for part in first["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    text = f"{loc}: {first['msg']}" if loc else first["msg"]
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text


def load_script(path: Path) -> list[ScriptTurn]:
    """Read a scripted-model script: a JSON list of turns, or an object with a `script` list.

    Raises:
        click.UsageError: the file cannot be read, is not JSON, or is not a valid script; the
            message names the file (and the position for JSON errors).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise click.UsageError(f"cannot read script file '{path}': {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise click.UsageError(f"script file '{path}' is not UTF-8 text: {e.reason}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.UsageError(
            f"script file '{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    if isinstance(data, dict) and "script" in data:
        data = data["script"]
    try:
        return _SCRIPT.validate_python(data)
    except ValidationError as e:
        raise click.UsageError(
            f"script file '{path}' is not a valid script: {summarise_validation(e, 'script')}"
        ) from e


def load_sub_agent_scripts(path: Path) -> dict[str, ModelChoice]:
    """The sub-agents' scripts in a script file: ``{"script": [...], "sub_agents": {agent:
    [turns]}}`` (an already checked file; a plain list of turns has none).

    Raises:
        click.UsageError: `sub_agents` is not an object of valid scripts; names the agent.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    found = data.get("sub_agents", {}) if isinstance(data, dict) else {}
    if not isinstance(found, dict):
        raise click.UsageError(f"script file '{path}': sub_agents must be an object")
    scripts = {}
    for agent, turns in found.items():
        try:
            scripts[str(agent)] = ModelChoice(
                provider="scripted", script=_SCRIPT.validate_python(turns)
            )
        except ValidationError as e:
            raise click.UsageError(
                f"script file '{path}' is not a valid script: "
                f"{summarise_validation(e, f'sub_agents.{agent}')}"
            ) from e
    return scripts


def parse_model(spec: str | None, script: list[ScriptTurn] | None) -> ModelChoice | None:
    """`--model PROVIDER[:NAME]` (and `--script`) as a `ModelChoice`; None keeps the default."""
    if spec is None and script is None:
        return None
    given, _, name = (spec or "scripted").partition(":")
    provider = _PROVIDERS.get(given)
    if provider is None:
        raise click.UsageError(
            f"unknown model provider {given!r} in --model {spec!r}; "
            f"use one of {', '.join(_PROVIDERS)}, optionally with ':NAME'"
        )
    if script is not None and provider != "scripted":
        raise click.UsageError(f"--script needs the scripted provider, not {provider!r}")
    try:
        return ModelChoice(provider=provider, name=name or None, script=script or [])
    except ValidationError as e:
        raise click.UsageError(f"invalid --model: {summarise_validation(e)}") from e


def _me(given: str | None, flag: str) -> str:
    """`given`, else the logged-in principal (the one calls are signed as)."""
    if given:
        return given
    from spine.client.identity import signer_from_env

    signer = signer_from_env()
    if signer is None or signer.default is None:
        raise click.UsageError(f"{flag} is required when nobody is logged in (`spine login`)")
    return signer.default


# --- the command group -----------------------------------------------------------------------


class _SpineGroup(click.Group):
    """A click group whose every expected failure is one `spine: error:` line on stderr."""

    def main(  # type: ignore[override]  # narrower than click's catch-all signature on purpose
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: object,
    ) -> object:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        message: str | None = None
        try:
            rv = super().main(args, prog_name or "spine", complete_var, False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            code = e.exit_code
        except click.UsageError as e:
            message, code = e.format_message(), 2
        except click.ClickException as e:
            message, code = e.format_message(), e.exit_code
        except SpineClientError as e:
            message, code = str(e), 1
        except (click.Abort, KeyboardInterrupt):
            message, code = "interrupted", 130
        # Exit only after the exception and its traceback are gone: a Temporal client still
        # reachable from them at interpreter shutdown can crash the process (SIGSEGV/SIGABRT).
        gc.collect()
        if message is not None:
            click.echo(f"spine: error: {message}", err=True)
        sys.exit(code)


@click.group(cls=_SpineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Spine: durable execution for AI agents on Temporal.

    Connection settings come from Temporal's environment configuration (TEMPORAL_ADDRESS,
    TEMPORAL_NAMESPACE, TEMPORAL_PROFILE, ...); the task queue from SPINE_TASK_QUEUE.
    """


@cli.command("worker")
def worker_cmd() -> None:
    """Run a Spine worker (the same as `python worker.py`)."""
    from spine.worker import main  # lazily: it pulls in every activity and provider SDK

    main()


@cli.command("run")
@click.argument("agent")
@click.argument("goal")
@click.option("--user", help="Who the agent acts for: you (default: who `spine login` logged in).")
@click.option("--role", required=True, help="The user's role; the policy decides what it may do.")
@click.option("--account", required=True, help="The account the run is billed to.")
@click.option(
    "--model", "model_spec", metavar="PROVIDER[:NAME]", help="openai, anthropic or scripted."
)
@click.option(
    "--script",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file of scripted-model turns (implies --model scripted); as an object, "
    '{"script": [...], "sub_agents": {"AGENT": [...]}} also scripts sub-agents.',
)
@click.option("--max-steps", type=click.IntRange(min=1), help="Tighten the policy's step limit.")
@click.option("--max-usd", type=click.FloatRange(min=0), help="Tighten the policy's cost limit.")
@click.option("--id", "workflow_id", help="Workflow id (default AGENT-<random>).")
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the run and print its result; stop as soon as it parks (exit 3).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def run_cmd(
    ctx: click.Context,
    agent: str,
    goal: str,
    user: str | None,
    role: str,
    account: str,
    model_spec: str | None,
    script: Path | None,
    max_steps: int | None,
    max_usd: float | None,
    workflow_id: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Start AGENT on GOAL; print the workflow id and its Web UI link.

    \b
    Exit status with --wait:
      0  the run completed
      1  it ended failed, compensated or rejected (or could not be started or followed)
      2  bad usage or input
      3  it parked for an operator (still open): the reason and the
         `spine operator` commands are printed
    """
    model = parse_model(model_spec, load_script(script) if script is not None else None)
    if model is not None and script is not None:
        model.sub_agents = load_sub_agent_scripts(script)  # a script file may script sub-agents
    limits = (
        Limits(max_steps=max_steps, max_usd=max_usd)
        if max_steps is not None or max_usd is not None
        else None
    )
    try:
        request = AgentRequest(
            agent=agent,
            goal=goal,
            user=_me(user, "--user"),
            role=role,
            account=account,
            model=model,
            limits=limits,
        )
    except ValidationError as e:
        raise click.UsageError(f"invalid run request: {summarise_validation(e)}") from e
    ctx.exit(run_async(_run(request, workflow_id, wait, as_json)))


async def _run(request: AgentRequest, workflow_id: str | None, wait: bool, as_json: bool) -> int:
    client = await connect()
    await check_agent(client, request)  # an agent no worker serves: one line, nothing started
    handle = await start_run(client, request, workflow_id=workflow_id)
    run_id = handle.result_run_id
    url = web_ui_url(handle.id, run_id, client.namespace)
    started = {"workflow_id": handle.id, "run_id": run_id, "web_ui_url": url}
    if not as_json:
        click.echo(f"started {handle.id}")
        click.echo(f"Web UI  {url}")
    return await follow(handle, started, wait=wait, as_json=as_json)


@cli.command("status")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--follow",
    "live",
    is_flag=True,
    help="Print the run's stream (model tokens, steps) from its start, live, then its result.",
)
@click.pass_context
def status_cmd(ctx: click.Context, run: str, as_json: bool, live: bool) -> None:
    """Show RUN's state (a workflow id); for a closed run, its result."""
    if live:
        ctx.exit(run_async(_follow_status(run, as_json)))
    run_async(_status(run, as_json))


async def _follow_status(workflow_id: str, as_json: bool) -> int:
    client = await connect()
    handle = get_run(client, workflow_id)
    desc = await describe(handle)
    started = {"workflow_id": desc.id, "run_id": desc.run_id}
    return await follow(handle, started, wait=True, as_json=as_json)


async def _status(workflow_id: str, as_json: bool) -> None:
    client = await connect()
    handle = get_run(client, workflow_id)
    desc = await describe(handle)
    wf_status = desc.status.name if desc.status is not None else "UNKNOWN"
    url = web_ui_url(desc.id, desc.run_id, client.namespace)
    state: StateView | None = None
    result: AgentResult | None = None
    error: str | None = None
    if desc.status == WorkflowExecutionStatus.RUNNING:
        state = await get_state(handle)
    else:
        try:
            result = await wait_result(handle)
        except SpineClientError as e:
            error = str(e)
    if as_json:
        echo_json(
            {
                "workflow_id": desc.id,
                "run_id": desc.run_id,
                "workflow_status": wf_status,
                "state": state.model_dump(mode="json") if state else None,
                "result": result.model_dump(mode="json") if result else None,
                "error": error,
                "web_ui_url": url,
            }
        )
        return
    click.echo(f"run       {desc.id}  ({desc.workflow_type}, {wf_status.lower()})")
    if state is not None:
        click.echo(f"status    {state.status}")
        click.echo(f"step      {state.step}")
        click.echo(f"usage     {usage_text(state.usage)}")
        if state.last_tool:
            click.echo(f"last tool {state.last_tool}")
        if state.reason:
            click.echo(f"reason    {state.reason}")
        if state.status == "parked":
            for line in operator_lines(desc.id, state.reason)[1:]:
                click.echo(line)
        for line in failed_call_lines(state.failed_calls):
            click.echo(line)
        for p in state.pending_approvals:
            click.echo(f"approval  {p.approval_id}  {p.tool} {compact(p.args)}: {p.reason}")
            click.echo(f"          spine approve {desc.id} {p.approval_id} --by NAME --role ROLE")
    elif result is not None:
        for line in result_lines(result):
            click.echo(line)
    else:
        click.echo(f"error     {error}")
    click.echo(f"Web UI    {url}")


def _decision_command(decision: Literal["approve", "reject"]) -> click.Command:
    past = "approved" if decision == "approve" else "rejected"

    @click.argument("run")
    @click.argument("approval")
    @click.option("--by", "by", help="Who decides: you (default: who `spine login` logged in).")
    @click.option("--role", required=True, help="Their role; the policy says who may approve.")
    @click.option("--reason", default="", help="Why, for the audit log.")
    @click.option(
        "--signal",
        "use_signal",
        is_flag=True,
        help="Send the `approval` signal instead of the `decide` update (no immediate refusal).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def command(
        run: str,
        approval: str,
        by: str | None,
        role: str,
        reason: str,
        use_signal: bool,
        as_json: bool,
    ) -> None:
        try:
            payload = ApprovalDecision(
                approval_id=approval,
                decision=decision,
                by=_me(by, "--by"),
                role=role,
                reason=reason,
            )
        except ValidationError as e:
            raise click.UsageError(f"invalid decision: {summarise_validation(e)}") from e
        run_async(_decide(run, payload, use_signal, as_json, past))

    command.__doc__ = (
        f"{decision.capitalize()} APPROVAL on RUN. By default through the `decide` update, so a "
        "refusal (unknown approval, already decided, role not allowed) is reported at once."
    )
    return click.command(decision)(command)


async def _decide(
    workflow_id: str, payload: ApprovalDecision, use_signal: bool, as_json: bool, past: str
) -> None:
    client = await connect()
    handle = get_run(client, workflow_id)
    if use_signal:
        await signal_approval(handle, payload)
        if as_json:
            echo_json({"workflow_id": workflow_id, "signal": "approval", **payload.model_dump()})
        else:
            click.echo(
                f"sent {payload.decision} of {payload.approval_id} to {workflow_id} as a signal; "
                f"the run checks it itself (see `spine status {workflow_id}`)"
            )
        return
    ack = await decide(handle, payload)
    if as_json:
        echo_json(ack.model_dump(mode="json"))
    else:
        click.echo(f"{past} {ack.approval_id} on {workflow_id}; the run is now {ack.status}")


cli.add_command(_decision_command("approve"))
cli.add_command(_decision_command("reject"))


@cli.command("operator")
@click.argument("run")
@click.argument("action", type=click.Choice(["retry", "skip", "compensate", "abort"]))
@click.option("--by", "by", help="Who acts: you (default: who `spine login` logged in).")
@click.option("--role", required=True, help="Their role; the policy's operator_roles may act.")
@click.option("--reason", default="", help="Why, for the record.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def operator_cmd(
    run: str, action: str, by: str | None, role: str, reason: str, as_json: bool
) -> None:
    """Tell a parked RUN what to do: retry the step, skip it, compensate, or abort.

    Parked runs (the dead-letter queue) are `temporal workflow list --query
    'SpineStatus="parked"'`. Sent through the `operate` update, signed as the logged-in
    principal: a refusal (not an operator, not parked, not skippable) exits 1 with the reason.
    """
    # click.Choice has checked `action` against the Literal's values.
    try:
        command = OperatorCommand(action=action, by=_me(by, "--by"), role=role, reason=reason)  # type: ignore[arg-type]  # click.Choice checked it
    except ValidationError as e:
        raise click.UsageError(f"invalid command: {summarise_validation(e)}") from e
    run_async(_operate(run, command, as_json))


async def _operate(workflow_id: str, command: OperatorCommand, as_json: bool) -> None:
    client = await connect()
    handle = get_run(client, workflow_id)
    state = await operate(handle, command)
    if as_json:
        echo_json({"workflow_id": workflow_id, "update": "operate", "state": state.model_dump()})
    else:
        click.echo(f"{command.action} accepted by {workflow_id} (it was {state.status})")


for _verb in (
    alerts,
    audit,
    budget,
    codec_server,
    console,
    login_cmd,
    replay,
    sign_cmd,
    slo,
    stream_server,
    tools,
    trace,
    whoami_cmd,
):
    cli.add_command(_verb)


@cli.command("demo")
@click.pass_context
def demo_cmd(ctx: click.Context) -> None:
    """Run the refund demo end to end on the scripted model, with an in-process worker.

    One refund needs approval; the demo approves it itself and says so.
    """
    from spine.client.demo import run_demo  # lazily: it imports the worker

    result = run_async(run_demo(click.echo))
    if result.status != "completed":
        reason = f" ({result.reason})" if result.reason else ""
        click.echo(f"spine: error: the demo run ended {result.status}{reason}", err=True)
        ctx.exit(1)


def main() -> None:
    """Entry point of the `spine` console script."""
    cli.main(prog_name="spine")
