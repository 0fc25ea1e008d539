"""The audit log as a real run writes it: the whole story, chained, secret-free, tamper-evident."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

from client.demo import build_demo_request
from client.runs import decide, start_run, wait_result
from client.testing import DemoService
from tests.helpers import wait_for_status
from workflows.models import ApprovalDecision

SPINE = str(Path(sys.executable).parent / "spine")


async def spine_audit(state_dir: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SPINE,
        "audit",
        *args,
        env={**os.environ, "SPINE_STATE_DIR": str(state_dir)},
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
        await decide(
            handle,
            ApprovalDecision(
                approval_id=state.pending_approvals[0].approval_id,
                decision="approve",
                by="bob",
                role="supervisor",
            ),
        )
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
