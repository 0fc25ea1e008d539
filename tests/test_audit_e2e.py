"""The audit log as a real run writes it: the whole story, chained, secret-free, tamper-evident."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

from temporalio.api.enums.v1 import EventType

from spine.activities.errors import DependencyUnavailable
from spine.client.demo import build_demo_request
from spine.client.runs import start_run, wait_result
from spine.client.testing import DemoService
from spine.observability.audit import SQLiteAuditStore
from spine.payloads import AuditBatch
from tests.helpers import (
    SPINE,
    approve_first_pending,
    call,
    eventually,
    scripted_request,
    turn,
    wait_for_status,
)


async def spine_audit(state_dir: Path, *args: str, address: str = "") -> tuple[int, str, str]:
    """`spine audit ARGS` on a worker's state dir; with `address`, cross-checked with Temporal
    there (else `verify` checks the chains only)."""
    if args[0] == "verify" and not address:
        args = ("verify", "--offline", *args[1:])
    proc = await asyncio.create_subprocess_exec(
        SPINE,
        "audit",
        *args,
        env={**os.environ, "SPINE_STATE_DIR": str(state_dir), "TEMPORAL_ADDRESS": address},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_demo_run_tells_its_story_and_detects_tampering(
    client, make_worker, task_queue, worker_config, service: DemoService
):
    """Every decision of a demo run is chained in the log; editing one entry is caught."""
    async with make_worker():
        handle = await start_run(client, build_demo_request("o-1060"), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        await approve_first_pending(handle, state)
        result = await wait_result(handle)
    assert result.status == "completed"
    state_dir = worker_config.state_dir
    code, out, err = await spine_audit(state_dir, "show", handle.id)
    assert code == 0, err
    kinds = [line.split()[5] for line in out.splitlines() if line.startswith("20")]
    assert kinds[0] == "run_started" and kinds[-1] == "run_outcome"
    assert kinds.count("model_turn") == 5 and kinds.count("tool_call") == 4
    assert "approval" in kinds and "policy_decision" in kinds
    assert "chain: ok" in out
    db_bytes = (state_dir / "audit.db").read_bytes()
    assert service.api_key.encode() not in db_bytes
    code, out, _ = await spine_audit(state_dir, "verify", handle.id)
    assert code == 0 and "ok" in out

    with sqlite3.connect(state_dir / "audit.db") as db:
        db.execute("DROP TRIGGER spine_audit_no_update")
        db.execute(
            "UPDATE spine_audit SET data = replace(data, '180.0', '18.0') "
            "WHERE run_id LIKE ? AND kind = 'policy_decision'",
            (f"{handle.id}:%",),
        )
    code, out, err = await spine_audit(state_dir, "verify", handle.id)
    assert code == 1
    assert err.count("\n") == 1 and "content changed" in err and "seq" in err


class SwitchableAuditStore:
    """The real SQLite store behind a switch that makes every write fail while it is down."""

    def __init__(self, inner: SQLiteAuditStore) -> None:
        self.inner = inner
        self.down = True
        self.refused = 0

    async def append(self, batch: AuditBatch) -> int:
        if self.down:
            self.refused += 1
            raise DependencyUnavailable("audit store switched off by the test")
        return await self.inner.append(batch)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_audit_store_outage_holds_the_run_and_loses_no_entry(
    client, make_worker, task_queue, worker_config, service: DemoService
):
    """Entries ride with the next model call; when the store is down that call is refused
    before the model is asked, the run waits on the audit activity, and once the store is
    back every entry is there, chained, and the run completes."""
    store = SwitchableAuditStore(SQLiteAuditStore(worker_config.state_dir / "audit.db"))
    script = [
        turn(call("lookup_order", order_id="o-1061")),
        turn(call("lookup_order", order_id="o-1062")),
        turn(text="both looked up"),
    ]
    async with make_worker(audit_store=store):
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        # The model call carrying `run_started` is refused, then the audit activity retries.
        await eventually(lambda: _true(store.refused >= 3), timeout=90, what="3 refused writes")
        events = (await handle.fetch_history()).events
        tools = [
            e
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name.startswith("tool.")
        ]
        failed = [
            e.activity_task_failed_event_attributes.failure.application_failure_info.type
            for e in events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
        ]
        assert tools == [], "a tool ran while its decision could not be audited"
        assert "AuditWriteFailed" in failed
        store.down = False
        result = await asyncio.wait_for(wait_result(handle), timeout=120)
    assert result.status == "completed", result.reason
    code, out, err = await spine_audit(worker_config.state_dir, "show", handle.id)
    assert code == 0, err
    kinds = [line.split()[5] for line in out.splitlines() if line.startswith("20")]
    assert kinds[0] == "run_started" and kinds[-1] == "run_outcome"
    assert kinds.count("model_turn") == 3 and kinds.count("tool_call") == 2
    code, out, _ = await spine_audit(worker_config.state_dir, "verify", handle.id)
    assert code == 0 and "ok" in out


async def _true(value: bool) -> bool:
    return value


def _rechain(db: sqlite3.Connection, run_id: str) -> None:
    """What someone with write access would do after an edit: recompute every hash of a run."""
    from spine.observability.audit import GENESIS_HASH, chain_hash

    prev = GENESIS_HASH
    rows = db.execute(
        "SELECT * FROM spine_audit WHERE run_id = ? ORDER BY seq", (run_id,)
    ).fetchall()
    names = [d[0] for d in db.execute("SELECT * FROM spine_audit LIMIT 0").description]
    for row in rows:
        entry = dict(zip(names, row, strict=True))
        content = {
            k: (json.loads(entry[k]) if k == "data" else entry[k])
            for k in (
                "run_id",
                "workflow_run_id",
                "agent",
                "account",
                "seq",
                "kind",
                "step",
                "actor",
                "at",
                "data",
                "policy_version",
            )
        }
        digest = chain_hash(prev, content)
        db.execute(
            "UPDATE spine_audit SET prev_hash = ?, hash = ? WHERE run_id = ? AND seq = ?",
            (prev, digest, run_id, entry["seq"]),
        )
        prev = digest


async def test_cuts_and_rewrites_fail_verify_against_temporal(
    client, make_worker, task_queue, worker_config
):
    """Each run anchors its chain's head in its result: a cut tail, a rewritten-and-rechained
    log and a deleted run all fail `spine audit verify`, which names what is wrong."""
    address = client.service_client.config.target_host
    script = [turn(call("lookup_order", order_id="o-1063")), turn(text="looked up")]
    async with make_worker():
        handles = [
            await start_run(client, scripted_request(script), task_queue=task_queue)
            for _ in range(3)
        ]
        results = [await wait_result(h) for h in handles]
    assert all(r.audit is not None and r.audit.entries > 3 for r in results)
    state_dir = worker_config.state_dir
    code, out, err = await spine_audit(state_dir, "verify", handles[0].id, address=address)
    assert code == 0 and "anchors: ok" in out, err
    chains = [f"{h.id}:{h.first_execution_run_id}" for h in handles]
    with sqlite3.connect(state_dir / "audit.db") as db:
        db.execute("DROP TRIGGER spine_audit_no_update")
        db.execute("DROP TRIGGER spine_audit_no_delete")
        top = db.execute("SELECT max(seq) FROM spine_audit WHERE run_id = ?", (chains[0],))
        db.execute(
            "DELETE FROM spine_audit WHERE run_id = ? AND seq >= ?",
            (chains[0], top.fetchone()[0] - 1),
        )
        db.execute(
            "UPDATE spine_audit SET actor = 'nobody' WHERE run_id = ? AND seq = 0", (chains[1],)
        )
        _rechain(db, chains[1])
        db.execute("DELETE FROM spine_audit WHERE run_id = ?", (chains[2],))
    verdicts = [await spine_audit(state_dir, "verify", h.id, address=address) for h in handles]
    assert [code for code, _, _ in verdicts] == [1, 1, 1]
    assert "lost the tail of its chain" in verdicts[0][2]
    assert "hash differs from the head the run anchored" in verdicts[1][2]
    assert "is missing from the audit store" in verdicts[2][2]
    assert all(err.count("\n") == 1 for _, _, err in verdicts)


async def test_control_characters_cannot_forge_audit_lines(
    client, make_worker, task_queue, worker_config
):
    """A decision reason with a newline and an escape sequence prints as one escaped line."""
    script = [turn(call("issue_refund", order_id="o-1064", amount=150.0)), turn(text="ok")]
    forged = "fine\n2026-01-01 00:00:00Z  #99  step 9   approval  bob  approve\x1b[2K"
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        await approve_first_pending(handle, state, reason=forged)
        await wait_result(handle)
    code, out, err = await spine_audit(worker_config.state_dir, "show", handle.id)
    assert code == 0, err
    assert "\\n2026-01-01" in out and "\\x1b" in out
    assert not any(line.startswith("2026-01-01 00:00:00Z  #99") for line in out.splitlines())
