"""`spine demo`: the refund agent end to end on the scripted model, with an in-process worker.

The script refunds 180.00, above the policy's 100.00 approval threshold, so the run waits for a
supervisor; the demo gives that approval itself, through the `decide` update, and says so.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable

import httpx

from spine.client.console_cli import console_run_url
from spine.client.output import compact, result_lines, state_line
from spine.client.runs import (
    SpineClientError,
    TemporalUnreachable,
    connect,
    decide,
    start_run,
    task_queue,
    wait_result,
    watch,
    web_ui_url,
)
from spine.contract import (
    AgentRequest,
    AgentResult,
    ApprovalDecision,
    ModelChoice,
    ScriptToolCall,
    ScriptTurn,
    TokenUsage,
)
from spine.guardrails.identity import IdentityError
from spine.guardrails.principals import VaultSigner, login_userpass

DEMO_AGENT = "refund-agent"
DEMO_USER = "alice"
DEMO_ROLE = "support"
DEMO_ACCOUNT = "acme"
DEMO_APPROVER = "bob"
DEMO_APPROVER_ROLE = "supervisor"
DEMO_SERVICE_URL = "http://127.0.0.1:8400"


def build_demo_request(order_id: str) -> AgentRequest:
    """The demo's run request for `order_id`: a scripted five-turn refund conversation."""

    def turn(
        input_tokens: int,
        *calls: ScriptToolCall,
        text: str | None = None,
        conf: float | None = None,
    ) -> ScriptTurn:
        return ScriptTurn(
            text=text,
            tool_calls=list(calls),
            confidence=conf,
            usage=TokenUsage(input_tokens=input_tokens, output_tokens=30),
        )

    script = [
        turn(220, ScriptToolCall(name="lookup_order", args={"order_id": order_id})),
        turn(
            310,
            ScriptToolCall(
                name="issue_refund",
                args={"order_id": order_id, "amount": 180.0, "reason": "arrived broken"},
            ),
            conf=0.9,
        ),
        turn(
            400,
            ScriptToolCall(
                name="send_email",
                args={
                    "order_id": order_id,
                    "subject": "Your refund",
                    "body": "We refunded 180.00 for your broken order.",
                },
            ),
        ),
        turn(
            480,
            ScriptToolCall(
                name="update_ticket",
                args={"order_id": order_id, "status": "resolved", "note": "refunded 180.00"},
            ),
        ),
        turn(
            560,
            text=(f"Refunded 180.00 for {order_id}, emailed the customer and resolved the ticket."),
        ),
    ]
    return AgentRequest(
        agent=DEMO_AGENT,
        goal=f"Order {order_id} arrived broken; refund it and tell the customer.",
        user=DEMO_USER,
        role=DEMO_ROLE,
        account=DEMO_ACCOUNT,
        model=ModelChoice(provider="scripted", script=script),
    )


def _call_text(tool: str, args: dict[str, object]) -> str:
    """`issue_refund(o-1234, 180.00, arrived broken)`: a tool call as a person reads it."""
    shown = [
        f"{v:.2f}" if isinstance(v, float) else (v if isinstance(v, str) else compact(v))
        for v in args.values()
    ]
    return f"{tool}({', '.join(shown)})"


async def _check_service() -> None:
    """Fail fast when the demo's business service is down: otherwise tools retry forever."""
    url = (os.environ.get("SPINE_DEMO_URL") or DEMO_SERVICE_URL).rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=3.0) as http:
            (await http.get(f"{url}/healthz")).raise_for_status()
    except httpx.HTTPError as e:
        raise SpineClientError(
            f"the demo's business service is not running at {url!r} ({e}); "
            "run `make demo` or temporal-dev/up"
        ) from e


def _demo_signer() -> VaultSigner:
    """The demo signs as its two people: alice starts the run, bob approves the refund, each
    with a real OpenBao login (`SPINE_DEMO_LOGINS`, dev-only, written by temporal-dev/up)."""
    url, logins = os.environ.get("VAULT_ADDR"), os.environ.get("SPINE_DEMO_LOGINS")
    if not (url and logins):
        raise SpineClientError(
            "the demo signs as alice and bob with their dev logins: run `make demo`, or "
            "`temporal-dev/up` and `source temporal-dev/.env` (VAULT_ADDR, SPINE_DEMO_LOGINS)"
        )
    tokens = {}
    try:
        for pair in logins.split(","):
            name, _, password = pair.partition(":")
            tokens[name] = login_userpass(url, name, password)
    except IdentityError as e:
        raise SpineClientError(f"the demo cannot log its people in: {e}") from e
    return VaultSigner(url=url, tokens=tokens)


async def run_demo(
    echo: Callable[[str], None] = print, *, order_id: str | None = None
) -> AgentResult:
    """Run the demo: start the run, approve its refund as the demo supervisor, return the result.

    Args:
        echo: Where progress lines go.
        order_id: The order to refund; a random one of `o-1001`..`o-1500` by default.

    Raises:
        SpineClientError: Temporal or the demo service is not running, the worker cannot be
            configured, or the run ended without a result.
    """
    try:
        signer, unsigned = _demo_signer(), None
    except SpineClientError as e:  # said after Temporal's state: that is the first thing to fix
        signer, unsigned = None, e
    try:
        client = await connect(signer=signer)
    except TemporalUnreachable as e:
        raise SpineClientError(
            f"Temporal is not running at {e.address!r} ({e.cause}); "
            "run `make demo` or temporal-dev/up"
        ) from e
    if unsigned is not None:
        raise unsigned
    await _check_service()
    queue = task_queue()
    try:
        # Lazily: the plugin pulls in every activity and provider SDK.
        from spine.guardrails.policy import load_policy
        from spine.observability.telemetry import telemetry_from_env
        from spine.plugin import SpineConfig, build_worker

        config = dataclasses.replace(SpineConfig.from_env(), task_queue=queue)
        policy = load_policy(config.policy_path)
        telemetry = telemetry_from_env(config.settings)
        demo_worker = build_worker(
            client,
            config=config,
            policy=policy,
            plugins=telemetry.worker_plugins(policy.price_table()),
        )
    # Vault settings, the policy file and tool definitions report problems as ValueError
    # (PolicyError, ToolDefinitionError); a missing dependency as ImportError.
    except (ImportError, ValueError, OSError) as e:
        raise SpineClientError(
            f"cannot set up the demo worker: {e}; did you `source temporal-dev/.env`?"
        ) from e

    oid = order_id or f"o-{random.randint(1001, 1500)}"
    request = build_demo_request(oid)
    async with demo_worker:
        handle = await start_run(client, request, task_queue=queue)
        url = web_ui_url(handle.id, handle.result_run_id, client.namespace)
        echo(f"demo: {DEMO_AGENT} for {DEMO_USER} ({DEMO_ROLE}, account {DEMO_ACCOUNT})")
        echo(f"goal: {request.goal}")
        echo(f"run:  {handle.id}  (worker in this process, task queue {queue!r})")
        echo(f"Web UI: {url}")
        decided: set[str] = set()
        async for state in watch(handle, interval=0.2):
            echo(f"  {state_line(state)}")
            for pending in state.pending_approvals:
                if pending.approval_id in decided:
                    continue
                decided.add(pending.approval_id)
                echo(
                    f"  approval {pending.approval_id} for {_call_text(pending.tool, pending.args)}"
                    f" — approved automatically by the demo, signed by {DEMO_APPROVER!r}"
                    f" (role {DEMO_APPROVER_ROLE})"
                )
                ack = await decide(
                    handle,
                    ApprovalDecision(
                        approval_id=pending.approval_id,
                        decision="approve",
                        by=DEMO_APPROVER,
                        role=DEMO_APPROVER_ROLE,
                        reason="auto-approved by spine demo",
                    ),
                )
                echo(f"  {ack.approval_id}: the run accepted the decision ({ack.decision})")
        result = await wait_result(handle)
    telemetry.shutdown()  # flush the run's spans, so `spine trace` sees them at once
    echo("")
    for line in result_lines(result):
        echo(line)
    echo(f"Web UI: {url}")
    console = console_run_url(handle.id)
    if console:
        echo(f"Console: {console}  (approvals, parked runs, budgets; sign in as bob or ops)")
    return result
