"""Circuit breakers against the real demo service: trip, fail fast, recover; runs park on them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from spine.activities.breakers import Breakers
from spine.activities.tools import ToolRunner
from spine.client.runs import describe, get_state, signal_operator, start_run, wait_result
from spine.client.testing import DemoService, VaultDev
from spine.contract import SA_STATUS, OperatorCommand
from spine.guardrails.secrets import VaultSecrets
from spine.payloads import ToolCallInput, ToolCallResult
from spine.plugin import load_registry
from tests.helpers import call, eventually, policy_file, scripted_request, turn, wait_for_status

DEPENDENCY = "demo-service"


async def _chaos(service: DemoService, setting: dict[str, object]) -> dict:
    return await asyncio.to_thread(service.post, "/v1/chaos", setting)  # type: ignore[return-value]


async def _fired(service: DemoService) -> int:
    """How many injected failures the service has answered since chaos was last set."""
    snapshot = await asyncio.to_thread(service.get, "/v1/chaos")
    return snapshot["injected"]["fail"]  # type: ignore[index]


@pytest.fixture
async def runner_and_breakers(
    vault: VaultDev, service: DemoService
) -> AsyncIterator[tuple[ToolRunner, Breakers]]:
    breakers = Breakers(threshold=3, reset_s=1.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)) as http:
        runner = ToolRunner(
            load_registry(("spine.demo.agent",)),
            VaultSecrets(vault.url, token=vault.token),
            http,
            {"SPINE_DEMO_URL": service.url},
            breakers,
        )
        yield runner, breakers


def _lookup(order_id: str, n: int) -> ToolCallInput:
    return ToolCallInput(
        run_id=f"breaker-test-{uuid.uuid4().hex[:8]}",
        step=n,
        call_id=f"call-{n}",
        tool="lookup_order",
        version=1,
        args={"order_id": order_id},
        account="acme",
        user="alice",
    )


async def test_breaker_opens_fails_fast_then_recovers(runner_and_breakers, service):
    """Three 503s open the breaker; the 4th call fails fast without reaching the service; it
    closes again after the reset time once the service is healthy."""
    runner, breakers = runner_and_breakers
    order = "o-1450"
    await _chaos(service, {"fail_rate": 1.0})
    try:
        errors = []
        for n in range(1, 5):
            started = time.monotonic()
            with pytest.raises(ApplicationError) as caught:
                await runner.run(_lookup(order, n), attempt=n)
            errors.append((caught.value, time.monotonic() - started))
        # Checked only now: the 4th call must come within reset_s (1 s) of the 3rd failure.
        for err, _ in errors[:3]:
            assert err.type == "DependencyUnavailable", err
            assert "HTTP 503" in err.message and "injected failure" in err.message, err.message
            assert not err.non_retryable
        err, fast = errors[3]
        assert err.type == "DependencyUnavailable", err
        assert "circuit breaker" in err.message and "is open" in err.message, err.message
        assert not err.non_retryable
        assert err.next_retry_delay is not None
        assert timedelta(0) < err.next_retry_delay <= timedelta(seconds=1.0), err.next_retry_delay
        assert await _fired(service) == 3, "the open breaker let a request through"
        assert await breakers.state(DEPENDENCY) == "opened"
        print(f"\nbreaker: 4th call failed fast in {fast * 1000:.0f} ms")
    finally:
        await _chaos(service, {})

    async def succeeds() -> bool:
        try:
            result = await runner.run(_lookup(order, 5), attempt=5)
        except ApplicationError as err:
            # Still open (fail fast) until reset_s has passed; anything else is a real failure.
            assert "circuit breaker" in err.message, err.message
            return False
        assert isinstance(result, ToolCallResult)
        assert result.output["order_id"] == order
        return True

    await eventually(succeeds, timeout=30, what="a call through the breaker to succeed")
    assert await breakers.state(DEPENDENCY) == "closed"
    # Closed means counting from zero again: one more failure does not open it.
    await _chaos(service, {"fail_rate": 1.0})
    try:
        with pytest.raises(ApplicationError) as caught:
            await runner.run(_lookup(order, 6), attempt=1)
        assert "HTTP 503" in caught.value.message
        assert await breakers.state(DEPENDENCY) == "closed"
    finally:
        await _chaos(service, {})


async def test_run_parks_on_dead_dependency_then_finishes_after_operator_retry(
    client, make_worker, task_queue, service, tmp_path
):
    """A run whose tool's service stays down parks (SpineStatus "parked") instead of failing;
    once the service is back an operator retry finishes it."""
    # Tools retry 8 times with 1 s doubling backoff (about 90 s before parking). The run's retry
    # budget caps that at 5 attempts (0, 1, 3, 7 s, then about 11 s); attempts 1-3 open the
    # breaker, and a reset (8 s) longer than the 4 s gap before attempt 4 makes the breaker
    # reject it without calling the service.
    policy = policy_file(
        tmp_path,
        runtime={"breaker_threshold": 3, "breaker_reset_s": 8, "max_retries_per_run": 4},
    )
    order = "o-1451"
    script = [turn(call("lookup_order", order_id=order)), turn(text="Order looked up.")]
    await _chaos(service, {"fail_rate": 1.0})
    try:
        async with make_worker(policy_path=policy):
            started = time.monotonic()
            handle = await start_run(client, scripted_request(script), task_queue=task_queue)
            parked = await wait_for_status(handle, "parked", timeout=90)
            parked_after = time.monotonic() - started
            assert "lookup_order" in (parked.reason or "")
            assert "exhausted its retries" in (parked.reason or "")
            assert "DependencyUnavailable" in (parked.reason or "")

            async def sa_parked() -> bool:
                found = (await describe(handle)).typed_search_attributes.get(SA_STATUS)
                return found == "parked"

            await eventually(sa_parked, timeout=30, what='SpineStatus="parked"')
            reached = await _fired(service)
            print(
                f"\nparked after {parked_after:.1f}s; {reached} of 5 attempts reached the "
                f"service (the rest failed fast at the open breaker)"
            )
            assert 3 <= reached < 5, reached

            await _chaos(service, {})
            # The breaker may still be open for up to breaker_reset_s: a retry then fails fast
            # (its retry budget is spent) and parks again, so retry until it goes through.
            retries_sent = 0
            last_retry = 0.0

            async def finished() -> bool:
                nonlocal retries_sent, last_retry
                state = await get_state(handle)
                if state.status == "parked" and time.monotonic() - last_retry > 2.0:
                    retries_sent += 1
                    last_retry = time.monotonic()
                    await signal_operator(
                        handle,
                        OperatorCommand(action="retry", by="ops", role="operator", reason="up"),
                    )
                return state.status == "completed"

            await eventually(finished, timeout=60, what="the retried run to complete")
            result = await wait_result(handle)
    finally:
        await _chaos(service, {})
    assert result.status == "completed", result.reason
    assert result.output == "Order looked up."
    assert any("chose retry" in p for p in result.path)
    print(f"operator retries sent: {retries_sent}; result.retries={result.retries}")
