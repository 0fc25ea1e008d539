"""Cost of the guard path per tool call, measured on its parts in one run.

Workflow side (pure, per call): the allowlist and schema check the loop does before scheduling,
the approval rules and the untrusted-data check. Activity side: the Vault secret read and the
account-ledger round trip (settle-and-reserve) a model call pays, against a real OpenBao and a
real Temporal dev server. Prints microseconds or milliseconds per call and the share of a step.

    python -m bench.guards [--calls 2000] [--ledger-calls 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import jsonschema
from temporalio.worker import Worker

from spine.activities.budget import BudgetActivities
from spine.activities.tools import SecretRef
from spine.client.testing import start_vault_dev, temporal_dev_server
from spine.demo.agent import issue_refund
from spine.guardrails.approvals import approval_rule, tainted_args
from spine.guardrails.policy import load_policy
from spine.guardrails.secrets import VaultSecrets
from spine.payloads import BudgetCall, LedgerOp
from spine.plugin import ledger_worker


def workflow_side(calls: int) -> float:
    """Microseconds per call for allowlist + JSON Schema + approval rules + taint check."""
    policy = load_policy()
    rules = policy.approval_rules("refund-agent")
    allowed = policy.allowed_tools("refund-agent", "support")
    descriptor = issue_refund.descriptor()
    validator = jsonschema.Draft202012Validator(descriptor.input_schema)
    args = {"order_id": "o-1001", "amount": 42.5, "reason": "arrived broken"}
    untrusted = "Hello, my parcel arrived broken. Order o-1001, please refund 42.50. " * 20
    start = time.perf_counter()
    for _ in range(calls):
        assert descriptor.name in allowed
        assert not list(validator.iter_errors(args))
        tainted = tainted_args(args, untrusted)
        approval_rule(descriptor.name, args, 0.9, rules, tainted=tainted)
    return (time.perf_counter() - start) / calls * 1e6


async def activity_side(ledger_calls: int) -> tuple[float, float]:
    """Milliseconds per Vault secret read and per ledger settle-and-reserve."""
    vault = start_vault_dev()
    try:
        vault.put_secret("spine/acme", {"api_key": "bench-key"})
        secrets = VaultSecrets(vault.url, token=vault.token)
        ref = SecretRef(name="api_key", path="spine/{account}", key="api_key")
        await secrets.resolve([ref], "acme")
        samples = []
        for _ in range(ledger_calls):
            t = time.perf_counter()
            await secrets.resolve([ref], "acme")
            samples.append(time.perf_counter() - t)
        vault_ms = statistics.median(samples) * 1000
        vault.seed_principals({})  # the worker's own principal, which signs ledger operations
        async with temporal_dev_server() as env:
            queue = "bench-ledger"
            budget = BudgetActivities(vault.worker_client(env.client), queue)
            async with (
                ledger_worker(env.client, queue, keyring=vault.keyring()),
                Worker(env.client, task_queue="bench-none", activities=[budget.apply]),
            ):
                samples = []
                previous: str | None = None
                for i in range(ledger_calls + 1):
                    op = LedgerOp(
                        run_id="bench",
                        commit={f"bench/{previous}": 0.001} if previous else {},
                        reserve_id=f"bench/{i}",
                        reserve_usd=0.002,
                        daily_limit_usd=1_000.0,
                    )
                    t = time.perf_counter()
                    await budget.apply(BudgetCall(account="bench", op=op))
                    if i:  # the first call starts the ledger
                        samples.append(time.perf_counter() - t)
                    previous = str(i)
    finally:
        vault.stop()
    return vault_ms, statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--ledger-calls", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="500 checks, 30 ledger calls")
    args = parser.parse_args()
    calls, ledger_calls = (500, 30) if args.quick else (args.calls, args.ledger_calls)
    checks_us = workflow_side(calls)
    vault_ms, ledger_ms = asyncio.run(activity_side(ledger_calls))
    print(
        f"workflow-side checks per tool call (allowlist+schema+approval+taint): {checks_us:.0f} us"
    )
    print(f"Vault secret read per tool call (median of {ledger_calls}): {vault_ms:.2f} ms")
    print(
        f"ledger settle-and-reserve per model call (median of {ledger_calls}): {ledger_ms:.2f} ms"
    )
    print(f"guard path per step: {checks_us / 1000 + vault_ms + ledger_ms:.2f} ms")


if __name__ == "__main__":
    main()
