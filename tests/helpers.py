"""Small helpers shared by Spine's tests (servers live in client/testing.py)."""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import Awaitable, Callable
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


def policy_for_tests() -> dict:
    """The default policy with the principals the tests use allowed on every account."""
    import tomllib

    from spine.guardrails.policy import DEFAULT_POLICY_PATH

    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
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


def scripted_request(
    script: list[ScriptTurn], *, role: str = "support", goal: str = "help", **model: object
) -> AgentRequest:
    return AgentRequest(
        agent="refund-agent",
        goal=goal,
        user="alice",
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
    handle: RunHandle, state: StateView, *, by: str = "bob", role: str = "supervisor"
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
