"""The `spine` command against a real server and worker."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from spine.client.runs import get_run, wait_result
from tests.helpers import SPINE, call, principal_in, signing_env, turn, wait_for_status


async def spine(client, task_queue: str, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "SPINE_TASK_QUEUE": task_queue,
        **signing_env(client, principal_in(args)),
    }
    proc = await asyncio.create_subprocess_exec(
        SPINE, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


def _script(tmp_path: Path, turns) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps([t.model_dump(mode="json", exclude_none=True) for t in turns]))
    return str(path)


RUN = [
    "run",
    "refund-agent",
    "Order arrived broken",
    "--user",
    "alice",
    "--role",
    "support",
    "--account",
    "acme",
]


async def test_run_wait_json_prints_the_result(client, make_worker, task_queue, tmp_path):
    """`spine run --wait --json` follows the run and prints a completed result."""
    script = _script(tmp_path, [turn(call("lookup_order", order_id="o-1040")), turn(text="ok")])
    async with make_worker():
        code, out, err = await spine(
            client, task_queue, *RUN, "--script", script, "--wait", "--json"
        )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["workflow_id"].startswith("refund-agent-")
    assert printed["result"]["status"] == "completed" and printed["result"]["steps"] == 2


async def test_approve_then_approve_again_is_refused(client, make_worker, task_queue, tmp_path):
    """`spine approve` lets a run go on; deciding the same approval twice is a one-line error."""
    script = _script(
        tmp_path,
        [
            turn(call("issue_refund", order_id="o-1041", amount=120.0), confidence=0.9),
            turn(text="done"),
        ],
    )
    async with make_worker():
        code, out, err = await spine(
            client, task_queue, *RUN, "--script", script, "--id", f"cli-{task_queue}"
        )
        assert code == 0, err
        handle = get_run(client, f"cli-{task_queue}")
        state = await wait_for_status(handle, "awaiting_approval")
        approval = state.pending_approvals[0].approval_id
        code, out, err = await spine(
            client, task_queue, "approve", handle.id, approval, "--by", "vera", "--role", "viewer"
        )
        assert code == 1 and err.count("\n") == 1 and "may not decide" in err
        code, out, err = await spine(
            client,
            task_queue,
            "approve",
            handle.id,
            approval,
            "--by",
            "bob",
            "--role",
            "supervisor",
        )
        assert code == 0, err
        code, out, err = await spine(
            client,
            task_queue,
            "approve",
            handle.id,
            approval,
            "--by",
            "bob",
            "--role",
            "supervisor",
        )
        assert code == 1 and "already" in err and err.count("\n") == 1
        result = await wait_result(handle)
    assert result.status == "completed"


async def test_operator_on_a_run_that_is_not_parked(client, make_worker, task_queue, tmp_path):
    """`spine operator` refuses, in one line, a run that is not parked."""
    script = _script(
        tmp_path,
        [
            turn(call("issue_refund", order_id="o-1042", amount=120.0), confidence=0.9),
            turn(text="done"),
        ],
    )
    async with make_worker():
        await spine(client, task_queue, *RUN, "--script", script, "--id", f"op-{task_queue}")
        handle = get_run(client, f"op-{task_queue}")
        await wait_for_status(handle, "awaiting_approval")
        code, _, err = await spine(
            client, task_queue, "operator", handle.id, "retry", "--by", "ops", "--role", "operator"
        )
        await handle.cancel()
        await wait_result(handle)
    assert code == 1 and "is awaiting_approval, not parked" in err
