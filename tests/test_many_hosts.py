"""Runs move between hosts: worker processes that share nothing but PostgreSQL.

Three `python worker.py` processes, each with its own empty ``SPINE_STATE_DIR`` (as if on three
hosts) and the same ``SPINE_DATABASE_URL`` on a PostgreSQL server the test starts, serve long runs
that continue as new every ~100 events. Mid-way the worker that has served the most runs is
SIGKILLed and replaced by a fourth with a fresh state dir. Every run completes, the runs it was
serving finish on other workers, no refund, email or ticket is made twice (counted in the demo
service), every audit chain verifies, and no worker wrote shared state to its own disk.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from spine.client.runs import RunHandle, get_state, start_run
from spine.client.testing import (
    DemoService,
    PostgresServer,
    VaultDev,
    start_worker_process,
    stop_worker_process,
)
from spine.contract import AgentResult
from spine.observability.audit import DatabaseAuditStore, verify
from spine.store import open_database
from tests.helpers import call, eventually, policy_file, scripted_request, turn

pytestmark = pytest.mark.slow

RUNS = 6
STEPS = 36  # tool steps per run: ~8 events each, so each run continues as new 2-3 times


def long_script(order: str) -> list:
    """36 tool steps with the side effects spread over them, then the answer."""
    script = []
    for step in range(1, STEPS + 1):
        if step == 8:
            script.append(
                turn(
                    call("issue_refund", order_id=order, amount=30, reason="late"),
                    confidence=0.95,
                )
            )
        elif step == 18:
            script.append(
                turn(call("send_email", order_id=order, subject="Refund", body="Refunded 30.00."))
            )
        elif step == 30:
            script.append(
                turn(call("update_ticket", order_id=order, status="resolved", note="refunded"))
            )
        else:
            script.append(turn(call("lookup_order", order_id=order)))
    script.append(turn(text=f"Refunded 30.00 for {order}."))
    return script


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop_worker_process(process, timeout=30)


async def identities(client: Client, workflow_id: str) -> list[str]:
    """Worker identities that completed workflow tasks of every run of `workflow_id`, in order."""
    found = []
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                found.append(event.workflow_task_completed_event_attributes.identity)
    return found


async def test_runs_move_between_hosts_sharing_only_postgres(
    client: Client,
    vault: VaultDev,
    service: DemoService,
    postgres: PostgresServer,
    new_account,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    url = postgres.database(f"hosts_{uuid.uuid4().hex[:8]}")
    queue = f"hosts-{uuid.uuid4().hex[:8]}"
    policy_path = policy_file(
        tmp_path, runtime={"continue_as_new_after_events": 100}, agent={"max_steps": STEPS + 5}
    )
    base = {
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": client.namespace,
        "SPINE_TASK_QUEUE": queue,
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
        "SPINE_DEMO_URL": service.url,
        "SPINE_POLICY": str(policy_path),
        "SPINE_DATABASE_URL": url,
    }
    hosts = [tmp_path / f"host-{i}" for i in range(4)]

    for host in hosts:
        host.mkdir()

    async def start(host: Path) -> subprocess.Popen[bytes]:
        env = {**base, "SPINE_STATE_DIR": str(host / "state")}
        process = await asyncio.to_thread(
            start_worker_process, env, log_file=host / "worker.log", timeout=180
        )
        processes.append(process)
        return process

    first = await asyncio.gather(*(start(h) for h in hosts[:3]))
    account = new_account("hosts")
    orders = [f"o-{1300 + i}" for i in range(RUNS)]
    handles: list[RunHandle] = []
    for order in orders:
        request = scripted_request(long_script(order), goal=f"Refund {order}")
        request.account = account
        handles.append(await start_run(client, request, task_queue=queue))

    # Mid-way: every run has continued as new at least once.
    async def mid_way() -> bool:
        states = await asyncio.gather(*(get_state(h) for h in handles))
        return all(s.step >= 14 for s in states)

    await eventually(mid_way, timeout=300, what="every run past step 14")
    served = Counter()
    for handle in handles:
        for identity in set(await identities(client, handle.id)):
            served[identity] += 1
    victim = max(first, key=lambda p: sum(served[i] for i in _ids(p, served)))
    victim_ids = set(_ids(victim, served))
    assert victim_ids, f"no run was served by worker pid {victim.pid}: {served}"
    victim_runs = [h for h in handles if victim_ids & set(await identities(client, h.id))]
    at_kill = [s.step for s in await asyncio.gather(*(get_state(h) for h in victim_runs))]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    replacement = await start(hosts[3])
    # Work left when the replacement is ready: on a slow machine its start (a new Python
    # process, OpenBao, migrations) can take longer than the survivors need to finish.
    left = sum(
        max(STEPS + 1 - s.step, 0)
        for s in await asyncio.gather(*(get_state(h) for h in handles))
        if s.status not in ("completed", "failed", "compensated", "rejected")
    )

    results: list[AgentResult] = await asyncio.wait_for(
        asyncio.gather(*(h.result() for h in handles)), timeout=600
    )
    assert [r.status for r in results] == ["completed"] * RUNS, [r.reason for r in results]
    assert [r.steps for r in results] == [STEPS + 1] * RUNS

    # Each run continued as new (history stays short), and the victim's runs moved on.
    chains = {}
    for handle in handles:
        chain = [w async for w in client.list_workflows(f"WorkflowId = '{handle.id}'")]
        chains[handle.id] = len(chain)
        assert len(chain) >= 3, f"{handle.id} ran as {len(chain)} run(s)"
    print(
        f"\n{RUNS} runs of {STEPS + 1} steps over 3 worker processes sharing PostgreSQL; "
        f"runs per chain {sorted(chains.values())}; SIGKILLed pid {victim.pid}, which had served "
        f"{len(victim_runs)} run(s) (at steps {at_kill} when killed); all completed on the others "
        "and its replacement"
    )
    for handle in victim_runs:
        after = await identities(client, handle.id)
        others = {i for i in after if i not in victim_ids}
        assert others, f"{handle.id} was never served by another worker"
    late = [i for h in handles for i in await identities(client, h.id)]
    if left >= 12:  # more than a few steps each for three workers: it must have taken some
        assert any(i.startswith(f"{replacement.pid}@") for i in late), (
            f"the replacement served nothing of the {left} steps left when it was ready"
        )
    else:
        print(f"the replacement was ready with {left} step(s) left; the survivors finished them")

    # Exactly one refund, email and ticket per order.
    for kind in ("refunds", "emails", "tickets"):
        for order, handle in zip(orders, handles, strict=True):
            made = await asyncio.to_thread(service.get, f"/v1/{kind}?order_id={order}")
            assert isinstance(made, list)
            mine = [r for r in made if str(r.get("idempotency_key")).startswith(f"{handle.id}/")]
            assert len(mine) == 1, f"{kind} for {order}: {made}"

    # Every audit chain verifies, from the shared database alone.
    database = open_database(url, read_only=True)
    try:
        audit = DatabaseAuditStore(database)
        chains = [r for r in await audit.run_ids() if r.split(":")[0] in {h.id for h in handles}]
        assert len(chains) == RUNS
        for run_id in chains:
            entries = await audit.entries(run_id)
            checked = verify(entries)
            assert checked.ok, checked.first_broken
            kinds = Counter(e.kind for e in entries)
            assert kinds["run_outcome"] == 1 and kinds["model_turn"] == STEPS + 1
    finally:
        await database.close()

    # Nothing shared was written to a host's own disk.
    for host in hosts:
        state = host / "state"
        leftovers = sorted(p.name for p in state.iterdir()) if state.exists() else []
        assert not [n for n in leftovers if n.endswith((".db", ".db-wal"))], (host, leftovers)


def _ids(process: subprocess.Popen[bytes], served: Counter) -> list[str]:
    """The identities (``<pid>@<host>...``) of `process` seen in the runs' histories."""
    return [i for i in served if i.startswith(f"{process.pid}@")]
