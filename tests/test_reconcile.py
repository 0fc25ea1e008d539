"""Reconcile-before-retry: a tool on an API without idempotency keys declares a reconcile tool,
so a retry after an ambiguous failure finds the effect instead of doing it twice."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
from pydantic import BaseModel
from temporalio.exceptions import ApplicationError

from spine.activities.errors import DependencyUnavailable
from spine.activities.tools import Registry, ToolContext, ToolDefinitionError, ToolRunner, tool
from spine.client.runs import start_run, wait_result
from spine.client.testing import DemoService, script
from spine.contract import AgentRequest, ModelChoice
from spine.guardrails.secrets import NoSecrets
from spine.payloads import ReconcileAnswer, ReconcileQuery, ToolCallInput, ToolCallResult
from tests.extra_agents import POLICY
from tests.helpers import eventually, policy_file
from tests.test_worker_process import spawn_worker

RUNS = 50
#: With this seed the service's first 50 rolls at 15% hit 8 times (random.Random(10)).
SEED = 10


async def _arm(client, make_worker, task_queue, service, tmp_path, agent: str, tool: str):
    """50 runs of `agent` giving store credit at 15% commit-then-timeout; per-run rows."""
    policy = policy_file(tmp_path, name=f"{agent}.toml")
    policy.write_text(policy.read_text() + POLICY)
    # The injected hang is 30 s; 5 s (the tool's default) keeps an answer that is merely slow on
    # a loaded machine from timing out as well (with 2 s, one run in a full suite did).
    settings = {"SPINE_DEMO_URL": service.url, "SPINE_LEGACY_TIMEOUT_S": "5"}
    service.post("/v1/chaos", {"commit_then_timeout_rate": 0.15, "seed": SEED})
    try:
        async with make_worker(
            policy_path=policy,
            agent_modules=("spine.demo.agent", "tests.extra_agents"),
            settings=settings,
        ):
            handles = []
            for i in range(RUNS):
                turns = script().tool(tool, order_id=f"o-{1370 + i % 20}", amount=5.0).text("ok")
                request = AgentRequest(
                    agent=agent,
                    goal="Give 5.00 store credit.",
                    user="alice",
                    role="support",
                    account="acme",
                    model=ModelChoice(provider="scripted", script=list(turns)),
                )
                handles.append(await start_run(client, request, task_queue=task_queue))
            results = await asyncio.wait_for(
                asyncio.gather(*(wait_result(h) for h in handles)), timeout=300
            )
        injected = service.get("/v1/chaos")["injected"]["commit_then_timeout"]  # type: ignore[index]
    finally:
        service.post("/v1/chaos", {})
    # The call's reference is its idempotency key: <run key>/<step>/<index>.
    rows = [
        service.get(f"/v1/legacy/credits?reference={h.id}/{h.first_execution_run_id}/1/0")
        for h in handles
    ]
    return results, rows, injected


def _unfinished(results) -> list[tuple[int, str, str | None, list[str]]]:  # type: ignore[no-untyped-def]
    """The runs that did not complete: index, status, reason and the path they took."""
    return [
        (i, r.status, r.reason, r.path) for i, r in enumerate(results) if r.status != "completed"
    ]


async def test_fifty_runs_at_15pct_commit_then_timeout_make_no_duplicate_with_reconcile(
    client, make_worker, task_queue, service: DemoService, tmp_path
):
    """Reconcile arm: 0 duplicate credits, every lost answer found by the reconcile tool.
    Control arm (same API call, no reconcile): one duplicate credit per lost answer."""
    results, rows, injected = await _arm(
        client, make_worker, task_queue, service, tmp_path, "refund-agent", "issue_store_credit"
    )
    assert [r.status for r in results] == ["completed"] * RUNS, _unfinished(results)
    duplicates = sum(len(found) - 1 for found in rows)
    reconciled = sum(any("had already happened" in p for p in r.path) for r in results)
    assert all(len(found) == 1 for found in rows), [len(f) for f in rows]
    assert injected >= 8 and reconciled == injected, (injected, reconciled)
    for result, [credit] in zip(results, rows, strict=True):
        [effect] = result.side_effects
        assert effect.output["credit_id"] == credit["credit_id"]  # the recorded effect is real

    control, control_rows, control_injected = await _arm(
        client,
        make_worker,
        task_queue,
        service,
        tmp_path,
        "credit-naive",
        "issue_store_credit_naive",
    )
    assert [r.status for r in control] == ["completed"] * RUNS, _unfinished(control)
    control_duplicates = sum(len(found) - 1 for found in control_rows)
    print(
        f"\nreconcile: {duplicates} duplicates, {reconciled} found by reconcile "
        f"({injected} commit-then-timeouts); control: {control_duplicates} duplicates "
        f"({control_injected} commit-then-timeouts)"
    )
    assert control_injected >= 8 and control_duplicates == control_injected


# ------------------------------------------------------------------ the runner, no server


class Order(BaseModel):
    order_id: str


class Paid(BaseModel):
    payment_id: str


def _registry(found: dict[str, str] | None, calls: list[str], *, reconcile_fails: bool = False):
    @tool(side_effects=True, reconcile="find_payment")
    async def pay(args: Order, ctx: ToolContext) -> Paid:
        calls.append(f"pay {ctx.idempotency_key} attempt {ctx.attempt}")
        return Paid(payment_id="p-new")

    @tool(reconciles="pay")
    async def find_payment(args: ReconcileQuery, ctx: ToolContext) -> ReconcileAnswer:
        calls.append(f"find {args.reference}")
        if reconcile_fails:
            raise DependencyUnavailable("payments search is down")
        return ReconcileAnswer(found=found is not None, output=found)

    registry = Registry()
    registry.add_tool(pay)
    registry.add_tool(find_payment)
    registry.check()
    return registry


def _call(*, tried_before: bool = False) -> ToolCallInput:
    return ToolCallInput(
        run_id="r",
        step=2,
        call_id="c",
        tool="pay",
        version=1,
        args={"order_id": "o-1"},
        idempotency_key="r/2/0",
        tried_before=tried_before,
    )


async def _run(registry: Registry, call: ToolCallInput, attempt: int) -> ToolCallResult:
    async with httpx.AsyncClient() as http:
        return await ToolRunner(registry, NoSecrets(), http, {}).run(call, attempt=attempt)


async def test_a_first_attempt_calls_the_tool_without_asking():
    calls: list[str] = []
    result = await _run(_registry({"payment_id": "p-old"}, calls), _call(), 1)
    assert calls == ["pay r/2/0 attempt 1"] and not result.reconciled


async def test_a_retry_records_the_effect_it_finds_instead_of_calling_again():
    calls: list[str] = []
    result = await _run(_registry({"payment_id": "p-old"}, calls), _call(), 2)
    assert calls == ["find r/2/0"]
    assert result.reconciled and result.output == {"payment_id": "p-old"}


async def test_an_operator_retry_of_a_parked_call_asks_first_too():
    calls: list[str] = []
    result = await _run(_registry({"payment_id": "p-old"}, calls), _call(tried_before=True), 1)
    assert calls == ["find r/2/0"] and result.reconciled


async def test_a_retry_that_finds_nothing_calls_the_tool():
    calls: list[str] = []
    result = await _run(_registry(None, calls), _call(), 3)
    assert calls == ["find r/2/0", "pay r/2/0 attempt 3"] and not result.reconciled


async def test_when_reconcile_cannot_tell_the_tool_is_not_called():
    """Fail closed: a reconcile tool that is down fails the attempt (Temporal retries it)."""
    calls: list[str] = []
    with pytest.raises(ApplicationError) as failed:
        await _run(_registry(None, calls, reconcile_fails=True), _call(), 2)
    assert calls == ["find r/2/0"]
    assert failed.value.type == "DependencyUnavailable" and not failed.value.non_retryable


async def test_a_found_effect_must_match_the_tools_output():
    """What a reconcile tool reports is checked against the tool's output schema."""
    calls: list[str] = []
    with pytest.raises(ApplicationError) as failed:
        await _run(_registry({"unexpected": "x"}, calls), _call(), 2)
    assert failed.value.type == "ToolOutputInvalid"


def test_declaration_mistakes_name_the_tool():
    with pytest.raises(ToolDefinitionError, match="or, for an API without idempotency keys"):

        @tool(side_effects=True)
        async def legacy(args: Order, ctx: ToolContext) -> Paid:
            return Paid(payment_id="p")

    with pytest.raises(ToolDefinitionError, match="must take ReconcileQuery"):

        @tool(reconciles="pay")
        async def wrong(args: Order, ctx: ToolContext) -> ReconcileAnswer:
            return ReconcileAnswer(found=False)

    @tool(side_effects=True, reconcile="lookup")
    async def pay(args: Order, ctx: ToolContext) -> Paid:
        return Paid(payment_id="p")

    @tool()
    async def lookup(args: ReconcileQuery, ctx: ToolContext) -> ReconcileAnswer:
        return ReconcileAnswer(found=False)

    registry = Registry()
    registry.add_tool(pay)
    registry.add_tool(lookup)
    with pytest.raises(ToolDefinitionError, match="does not declare reconciles='pay'"):
        registry.check()


@pytest.mark.slow
async def test_a_worker_killed_after_the_credit_committed_does_not_credit_twice(
    client, worker_env, worker_processes, service: DemoService, task_queue: str
):
    """The legacy API has committed the credit and hangs; the worker is SIGKILLed mid-call. The
    call's next attempt, on a fresh worker, finds the credit and records it: one credit."""
    env = {**worker_env, "SPINE_LEGACY_TIMEOUT_S": "60"}  # the worker dies before it times out
    first = await spawn_worker(env, worker_processes)
    await asyncio.to_thread(service.post, "/v1/chaos", {"commit_then_timeout_rate": 1.0})
    try:
        turns = script().tool("issue_store_credit", order_id="o-1369", amount=7.0).text("ok")
        request = AgentRequest(
            agent="refund-agent",
            goal="Say sorry with 7.00.",
            user="alice",
            role="support",
            account="acme",
            model=ModelChoice(provider="scripted", script=list(turns)),
        )
        handle = await start_run(client, request, task_queue=task_queue)
        reference = f"{handle.id}/{handle.first_execution_run_id}/1/0"

        async def committed() -> bool:
            found = await asyncio.to_thread(
                service.get, f"/v1/legacy/credits?reference={reference}"
            )
            return len(found) == 1  # type: ignore[arg-type]

        await eventually(committed, timeout=120, what="the committed credit")
        os.kill(first.pid, signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 30) == -signal.SIGKILL
        await asyncio.to_thread(service.post, "/v1/chaos", {})
        await spawn_worker(env, worker_processes)
        result = await asyncio.wait_for(wait_result(handle), timeout=300)
    finally:
        await asyncio.to_thread(service.post, "/v1/chaos", {})
    assert result.status == "completed", result.reason
    credits = service.get(f"/v1/legacy/credits?reference={reference}")
    assert len(credits) == 1  # type: ignore[arg-type]
    [effect] = result.side_effects
    assert effect.output["credit_id"] == credits[0]["credit_id"]  # type: ignore[index]
    assert any("had already happened" in p for p in result.path)
