"""Small helpers shared by Spine's tests (servers live in client/testing.py)."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from spine.client.runs import RunHandle, get_state
from spine.contract import (
    AgentRequest,
    ModelChoice,
    ScriptToolCall,
    ScriptTurn,
    StateView,
    TokenUsage,
)

#: The `spine` command of the venv running the tests.
SPINE = str(Path(sys.executable).parent / "spine")


def in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose outside dependency (PostgreSQL, Chromium) is missing; under CI fail
    instead, so a green CI run means every such test ran."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dependency fails the test instead of skipping)")
    pytest.skip(reason)


def require_module(name: str, reason: str) -> ModuleType:
    """`pytest.importorskip`, but failing under CI (see :func:`unavailable`)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(reason)


def call(name: str, **args: object) -> ScriptToolCall:
    return ScriptToolCall(name=name, args=args)


#: Principals the tests sign as, beyond the demo's: a second supervisor (N distinct approvers)
#: and one the policy grants nothing.
TEST_PRINCIPALS: dict[str, tuple[str, ...]] = {"carol": (), "mallory": ()}


def policy_for_tests(*, cumulative: bool = False) -> dict:
    """The default policy with the principals the tests use allowed on every account.

    Without `cumulative` the refund total rule is left out: most tests refund one order more
    than once on purpose, for other reasons; the tests of that rule ask for it.
    """
    import tomllib

    from spine.guardrails.policy import DEFAULT_POLICY_PATH

    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
    if not cumulative:
        rules = data["agents"]["refund-agent"]["approvals"]
        data["agents"]["refund-agent"]["approvals"] = [
            r for r in rules if "cumulative_above" not in r
        ]
    for grant in data["principals"].values():
        grant["accounts"] = ["*"]
    data["principals"]["carol"] = {"roles": ["supervisor"], "accounts": ["*"]}
    data["principals"]["mallory"] = {"roles": [], "accounts": []}
    return data


def write_test_policy(path, data: dict | None = None):
    """Write :func:`policy_for_tests` (or `data`) as TOML to `path`; returns `path`."""
    import tomli_w

    path.write_text(tomli_w.dumps(data if data is not None else policy_for_tests()))
    return path


def turn(
    *calls: ScriptToolCall,
    text: str | None = None,
    confidence: float | None = 0.9,
    tokens: tuple[int, int] = (100, 20),
) -> ScriptTurn:
    return ScriptTurn(
        text=text,
        tool_calls=list(calls),
        confidence=confidence,
        usage=TokenUsage(input_tokens=tokens[0], output_tokens=tokens[1]),
    )


#: The principal the tests act as for each role (the default policy grants them these).
ROLE_USERS = {
    "support": "alice",
    "viewer": "vera",
    "supervisor": "bob",
    "director": "dana",
    "operator": "ops",
}


def scripted_request(
    script: list[ScriptTurn],
    *,
    role: str = "support",
    goal: str = "help",
    user: str | None = None,
    **model: object,
) -> AgentRequest:
    """A refund-agent run on the scripted model, by the principal who holds `role`."""
    return AgentRequest(
        agent="refund-agent",
        goal=goal,
        user=user or ROLE_USERS.get(role, "alice"),
        role=role,
        account="acme",
        model=ModelChoice(provider="scripted", script=script, **model),  # type: ignore[arg-type]
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 60.0, what: str = "condition"
) -> None:
    """Await `check()` until it is true, polling; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except Exception as err:  # noqa: BLE001  # polling: the next try decides
            last = err
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


async def wait_for_status(handle: RunHandle, status: str, timeout: float = 60.0) -> StateView:
    """Poll the `state` query until the run reports `status`."""
    seen: list[StateView] = []

    async def check() -> bool:
        seen.append(await get_state(handle))
        return seen[-1].status == status

    await eventually(check, timeout=timeout, what=f"status {status!r}")
    return seen[-1]


async def approve_first_pending(
    handle: RunHandle,
    state: StateView,
    *,
    by: str = "bob",
    role: str = "supervisor",
    reason: str = "",
) -> None:
    """Approve the run's first pending approval through the `decide` update."""
    from spine.client.runs import decide
    from spine.contract import ApprovalDecision

    await decide(
        handle,
        ApprovalDecision(
            approval_id=state.pending_approvals[0].approval_id,
            decision="approve",
            by=by,
            role=role,
            reason=reason,
        ),
    )


def policy_file(
    tmp_path, *, runtime: dict | None = None, agent: dict | None = None, name: str = "policy.toml"
):
    """The test policy with `runtime` and refund-agent settings overridden."""
    data = policy_for_tests()
    data["runtime"].update(runtime or {})
    data["agents"]["refund-agent"].update(agent or {})
    return write_test_policy(tmp_path / name, data)


def worker_keyring(vault):
    """A keyring loaded from `vault` the way a worker loads it, on the test policy (for ledgers
    run on their own)."""
    from spine.guardrails.policy import Policy

    return vault.keyring(Policy.model_validate(policy_for_tests()))


def worker_client(client, vault):
    """`client`, signing as the worker's own principal (what a worker's budget activity uses)."""
    return vault.worker_client(client)


def signed_client(base, vault):
    """`base` (a Temporal client) signing each call as the principal it names, with the tokens
    the test OpenBao (`vault`) holds for them, as the session's `client` does."""
    return vault.signed(base)


def signing_env(client, principal: str) -> dict[str, str]:
    """Environment for a `spine` command that signs as `principal`, with the token the session's
    signing client holds for them (what `spine login` would have stored)."""
    from spine.client.identity import SigningInterceptor

    [signer] = [
        i.signer for i in client.config()["interceptors"] if isinstance(i, SigningInterceptor)
    ]
    return {
        "VAULT_ADDR": signer.url,
        "SPINE_VAULT_TOKEN": signer.tokens[principal],
        "SPINE_PRINCIPAL": principal,
        "SPINE_CREDENTIALS": "/nonexistent/spine-credentials.json",
    }


def principal_in(args: tuple[str, ...], default: str = "alice") -> str:
    """Who a `spine` command line acts as: its --by, else its --user, else `default`."""
    for flag in ("--by", "--user"):
        if flag in args:
            return args[args.index(flag) + 1]
    return default


class ForgedClaims:
    """A client interceptor that sends whatever claim a test hands it (or none), as an attacker
    with a Temporal client would: ``claims.next = claim`` before the call."""

    def __new__(cls):  # a real temporalio client Interceptor, built lazily (imports are heavy)
        from temporalio.client import Interceptor, OutboundInterceptor

        from spine.client.identity import header
        from spine.contract import PRINCIPAL_HEADER

        class _Out(OutboundInterceptor):
            def __init__(self, next, owner):
                super().__init__(next)
                self.owner = owner

            def _stamp(self, input):
                claim = self.owner.next
                if claim is not None:
                    input.headers = {**input.headers, PRINCIPAL_HEADER: header(claim)}

            async def start_workflow(self, input):
                self._stamp(input)
                return await self.next.start_workflow(input)

            async def signal_workflow(self, input):
                self._stamp(input)
                await self.next.signal_workflow(input)

            async def start_workflow_update(self, input):
                self._stamp(input)
                return await self.next.start_workflow_update(input)

        class _Forged(Interceptor):
            next = None

            def intercept_client(self, next):
                return _Out(next, self)

        return _Forged()


def forged_client(client):
    """A client on `client`'s server whose calls carry ``interceptor.next`` as their claim."""
    from temporalio.client import Client

    forged = ForgedClaims()
    return (
        Client(
            client.service_client,
            namespace=client.namespace,
            data_converter=client.data_converter,
            interceptors=[forged],
        ),
        forged,
    )


def signer_as(vault, name: str):
    """A signer holding only `name`'s token (a person logged in as them)."""
    from spine.guardrails.principals import VaultSigner

    return VaultSigner(vault.url, {name: vault.tokens[name]}, default=name)


def client_as(client, vault, name: str):
    """`client`'s server, with every call signed as `name` (whatever the payload says)."""
    from temporalio.client import Client

    from spine.client.identity import SigningInterceptor

    return Client(
        client.service_client,
        namespace=client.namespace,
        data_converter=client.data_converter,
        interceptors=[SigningInterceptor(signer_as(vault, name))],
    )


def custom_policy(tmp_path, change, *, cumulative: bool = False, name: str = "policy.toml"):
    """The test policy after ``change(data)`` (a function that edits the parsed TOML)."""
    data = policy_for_tests(cumulative=cumulative)
    change(data)
    return write_test_policy(tmp_path / name, data)
