"""`spine replay`: forks carry a run's state from a step without redoing it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest
from click.testing import CliRunner

from spine.client.cli import cli
from spine.client.forks import apply_changes, checkpoint, load_history, with_goal
from spine.client.runs import get_run, start_run, wait_result
from spine.client.testing import REPO_ROOT, VaultDev
from spine.contract import SA_FORKED_FROM, AgentResult, Limits
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig
from tests.helpers import (
    SPINE,
    call,
    custom_policy,
    eventually,
    policy_file,
    principal_in,
    scripted_request,
    signing_env,
    turn,
    wait_for_status,
)


@pytest.fixture
def worker_config(worker_config: SpineConfig, vault: VaultDev) -> SpineConfig:
    """Secrets read afresh on every call: these tests take a secret away mid-run and expect the
    next call to find it gone (a worker's 30 s secret cache would otherwise still hold it)."""
    uncached = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=0)
    return dataclasses.replace(worker_config, secrets=uncached)


TOKENS = (2000, 100)  # 0.0024 USD per scripted turn
TURN_USD = 0.0024
# Enough for three turns; the fourth's worst-case estimate does not fit: budget_exhausted, and
# (per policy) no compensation, so steps 1-3 stay done.
TIGHT_USD = 0.016


async def spine(client, task_queue: str, *args: str, **env: str) -> tuple[int, str, str]:
    """Run the `spine` command against the test server and task queue."""
    full = {
        **os.environ,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "SPINE_TASK_QUEUE": task_queue,
        **signing_env(client, principal_in(args)),
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        SPINE, *args, env=full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    return proc.returncode or 0, out.decode(), err.decode()


def _refund_script(order: str):
    return [
        turn(call("lookup_order", order_id=order), tokens=TOKENS),
        turn(call("issue_refund", order_id=order, amount=40.0), confidence=0.9, tokens=TOKENS),
        turn(
            call("send_email", order_id=order, subject="Refund", body="Refunded 40."),
            tokens=TOKENS,
        ),
        turn(call("update_ticket", order_id=order, status="resolved"), tokens=TOKENS),
        turn(text="Refunded, emailed, resolved.", tokens=TOKENS),
    ]


async def _out_of_budget(client, task_queue: str, order: str, account: str):
    """A run that refunds and emails, then stops on budget_exhausted before step 4."""
    request = scripted_request(_refund_script(order))
    request.account = account
    request.limits = Limits(max_usd=TIGHT_USD)
    handle = await start_run(client, request, task_queue=task_queue)
    result = await wait_result(handle)
    assert result.status == "failed" and "budget_exhausted" in (result.reason or ""), result
    assert [(e.tool, e.compensated) for e in result.side_effects] == [
        ("issue_refund", False),
        ("send_email", False),
    ], result.reason
    return handle, result


async def test_fork_continues_without_redoing_side_effects(
    client, make_worker, task_queue, service, new_account
):
    """A fork from step 3 of a run out of budget finishes the job; each effect happens once."""
    order = "o-1471"
    async with make_worker():
        handle, original = await _out_of_budget(client, task_queue, order, new_account())
        code, out, err = await spine(
            client,
            task_queue,
            "replay",
            handle.id,
            "--from-step",
            "3",
            "--set",
            "limits.max_usd=0.5",
            "--wait",
            "--json",
        )
        assert code == 0, err
        printed = json.loads(out)
        fork = get_run(client, printed["workflow_id"])
        described = await fork.describe()
    result = AgentResult.model_validate(printed["result"])
    assert result.status == "completed", result.reason
    assert result.steps == 5
    assert [e.tool for e in result.side_effects] == ["issue_refund", "send_email", "update_ticket"]
    carried = [e.idempotency_key for e in result.side_effects[:2]]
    assert carried == [e.idempotency_key for e in original.side_effects]
    assert result.usage.usd == pytest.approx(original.usage.usd + 2 * TURN_USD)
    assert result.usage.input_tokens == 5 * TOKENS[0]
    for path in ("refunds", "emails", "tickets"):
        assert len(service.get(f"/v1/{path}?order_id={order}")) == 1, path
    assert (await described.memo())["forked_from"] == {
        "workflow_id": handle.id,
        "run_id": handle.result_run_id,
        "step": 3,
    }
    assert described.typed_search_attributes.get(SA_FORKED_FROM) == handle.id
    assert result.path[0].startswith(f"step 3: forked from {handle.id}")


@pytest.mark.parametrize(
    ("inline_bytes", "order"), [(8192, "o-1472"), (20, "o-1478")], ids=["inline", "by-reference"]
)
async def test_failed_fork_compensates_what_it_carried(
    client, make_worker, task_queue, service, new_account, tmp_path, inline_bytes, order
):
    """A fork that fails undoes the carried refund once, under the original idempotency key.
    By reference: the refund's output is in the shared store, and the worker gives the fork
    read access to it (the compensation needs it) only once the fork is allowed."""
    script = tmp_path / "script.json"
    failing = turn(text="never", tokens=TOKENS)
    failing.error = "terminal"
    script.write_text(json.dumps([failing.model_dump(mode="json", exclude_none=True)]))
    async with make_worker(inline_output_bytes=inline_bytes):
        handle, original = await _out_of_budget(client, task_queue, order, new_account())
        code, out, err = await spine(
            client,
            task_queue,
            "replay",
            handle.id,
            "--from-step",
            "2",
            "--set",
            f"model.script=@{script}",
            "--set",
            "limits.max_usd=0.5",
            "--wait",
            "--json",
        )
    assert code == 1 and "ended compensated" in err, err
    result = AgentResult.model_validate(json.loads(out)["result"])
    [refund] = result.side_effects
    assert refund.compensated and refund.idempotency_key == original.side_effects[0].idempotency_key
    [stored] = service.get(f"/v1/refunds?order_id={order}")
    assert stored["reversed"] is True
    assert len(service.get(f"/v1/reversals?order_id={order}")) == 1


async def test_fork_refused_when_pinned_tool_version_is_gone(
    client, make_worker, task_queue, new_account
):
    """A run pinned to lookup_order v1 cannot be forked where only v2 is served: one line."""
    async with make_worker():
        handle, _ = await _out_of_budget(client, task_queue, "o-1473", new_account())
        code, out, err = await spine(
            client,
            task_queue,
            "replay",
            handle.id,
            "--from-step",
            "1",
            SPINE_AGENTS="tests.fakes.refund_v2",
            PYTHONPATH=str(REPO_ROOT),  # the console script does not put the checkout on the path
        )
    assert code == 1 and out == ""
    assert err.count("\n") == 1, err
    assert "pinned tool 'lookup_order' version 1" in err and "serves version(s) 2" in err


async def test_fork_refused_after_compensation(client, make_worker, task_queue, new_account):
    """A step whose refund the original undid cannot be forked from; the step before it can."""
    script = _refund_script("o-1474")[:2] + [turn(text="never")]
    script[-1].error = "terminal"
    request = scripted_request(script)
    request.account = new_account()
    async with make_worker():
        handle = await start_run(client, request, task_queue=task_queue)
        assert (await wait_result(handle)).status == "compensated"
        code, _, err = await spine(client, task_queue, "replay", handle.id, "--from-step", "2")
        assert code == 1 and "undid issue_refund@step2" in err, err
        code, out, err = await spine(
            client, task_queue, "replay", handle.id, "--from-step", "1", "--dry-run", "--json"
        )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] and plan["carried"]["side_effects"] == []
    assert plan["carried"]["steps"] == 1


async def test_bulk_replay_lists_then_forks_parked_and_failed_runs(
    client, make_worker, task_queue, service, vault, new_account
):
    """Bulk replay lists failed and parked runs (not completed ones), forks them, and only once."""
    account = new_account()
    completed = scripted_request([turn(call("lookup_order", order_id="o-1475")), turn(text="ok")])
    completed.account = account
    # Steps 1-3 are refused (unknown tool, bad arguments), step 4 parks: the secret is gone.
    parking = scripted_request(
        [
            turn(call("no_such_tool")),
            turn(call("lookup_order", order_id="not-an-order")),
            turn(call("no_such_tool")),
            turn(call("lookup_order", order_id="o-1476")),
            turn(text="Looked it up."),
        ]
    )
    parking.account = account
    query = f"SpineAccount = '{account}'"
    async with make_worker():
        failed, _ = await _out_of_budget(client, task_queue, "o-1477", account)
        done = await start_run(client, completed, task_queue=task_queue)
        await wait_result(done)
        vault.client().secrets.kv.v2.delete_metadata_and_all_versions(
            path=f"spine/{account}", mount_point="secret"
        )
        parked = await start_run(client, parking, task_queue=task_queue)
        await wait_for_status(parked, "parked")

        async def listed() -> bool:
            wanted = f"{query} AND SpineStatus IN ('failed', 'parked', 'completed')"
            return (await client.count_workflows(wanted)).count == 3

        await eventually(listed, what="three runs in visibility with their final status")

        async def replay_dry_run() -> list[dict]:
            code, out, err = await spine(
                client,
                task_queue,
                "replay",
                "--query",
                query,
                "--from-step",
                "3",
                "--dry-run",
                "--json",
            )
            assert code == 0, err
            return json.loads(out)["runs"]

        rows = {r["workflow_id"]: r for r in await replay_dry_run()}
        assert {k: r["action"] for k, r in rows.items()} == {
            failed.id: "fork",
            done.id: "skip",
            parked.id: "fork",
        }
        assert (rows[parked.id]["status"], rows[failed.id]["status"]) == ("parked", "failed")

        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        code, out, err = await spine(
            client,
            task_queue,
            "replay",
            "--query",
            query,
            "--from-step",
            "3",
            "--set",
            "limits.max_usd=0.5",
            "--json",
        )
        assert code == 0, err
        forks = {r["workflow_id"]: r["fork_id"] for r in json.loads(out)["runs"] if "fork_id" in r}
        assert set(forks) == {failed.id, parked.id}
        results = [await wait_result(get_run(client, forks[w])) for w in (failed.id, parked.id)]
        await parked.terminate("replaced by its fork")

        async def linked() -> bool:
            wanted = f"SpineForkedFrom IN ('{failed.id}', '{parked.id}')"
            return (await client.count_workflows(wanted)).count == 2

        await eventually(linked, what="both forks listed under SpineForkedFrom")
        again = [r for r in await replay_dry_run() if r["workflow_id"] in forks]
        assert [r["action"] for r in again] == ["skip", "skip"]
        assert all("already forked" in r["reason"] for r in again)
    assert [r.status for r in results] == ["completed", "completed"], [r.reason for r in results]
    assert results[1].output == "Looked it up."
    for path in ("refunds", "emails", "tickets"):
        assert len(service.get(f"/v1/{path}?order_id=o-1477")) == 1, path


def test_set_rejects_fields_a_fork_cannot_change():
    """`--set role=...` is a usage error naming what can be changed, before any connection."""
    result = CliRunner().invoke(
        cli, ["replay", "r-1", "--from-step", "1", "--set", "role=admin"], standalone_mode=False
    )
    assert result.exception is not None
    assert "cannot change 'role'" in str(result.exception)
    assert "limits.max_usd" in str(result.exception)


async def test_fork_any_step_of_a_continued_as_new_run(
    client, make_worker, task_queue, tmp_path, new_account
):
    """Any step of a continued-as-new run is a checkpoint; a fork from a later run finishes it."""
    steps = 12
    script = [turn(call("lookup_order", order_id=f"o-{1480 + i % 3}")) for i in range(steps)]
    script.append(turn(text="Looked at every order."))
    request = scripted_request(script)
    request.account = new_account()
    policy = policy_file(tmp_path, runtime={"continue_as_new_after_events": 100})
    async with make_worker(policy_path=policy):
        handle = await start_run(client, request, task_queue=task_queue)
        original = await wait_result(handle)
        history = await load_history(client, handle.id)
        assert len(history.segments) >= 2, "the run should have continued as new"
        for step in range(steps + 1):
            point = await checkpoint(history, step, client.data_converter)
            # system + user, then per step the model's call and the tool's result
            assert len(point.carry.pending_messages) == 2 + 2 * step, step
            assert point.carry.usage.input_tokens == 100 * step
            assert point.request.model is not None
            assert len(point.request.model.script) == steps + 1 - step
        point = await checkpoint(history, 9, client.data_converter)
        changed = apply_changes(point, {"goal": "Also check o-1482 twice."})
        # Nothing of the state travels from the client: the worker rebuilds it from history.
        assert changed.carry is None and changed.fork_from is not None
        assert (changed.fork_from.workflow_id, changed.fork_from.step) == (handle.id, 9)
        told = with_goal(point.carry, 9, request.goal, changed.goal)
        assert told.pending_messages[-1].content == "Also check o-1482 twice."
        code, out, err = await spine(
            client, task_queue, "replay", handle.id, "--from-step", "9", "--wait", "--json"
        )
    assert code == 0, err
    result = AgentResult.model_validate(json.loads(out)["result"])
    assert (result.status, result.steps, result.output) == (
        "completed",
        original.steps,
        original.output,
    )
    assert result.usage == original.usage


async def test_a_fork_runs_on_todays_policy_and_is_refused_where_it_narrowed(
    client, make_worker, task_queue, new_account, tmp_path
):
    """A fork re-resolves grants and approval rules: with a rule added since (refunds above
    30.00 wait) or the refund tool no longer granted, the fork is refused naming why."""
    account = new_account()
    stricter = custom_policy(
        tmp_path,
        lambda p: p["agents"]["refund-agent"]["approvals"].append(
            {
                "tool": "issue_refund",
                "arg": "amount",
                "above": 30.0,
                "approver_roles": ["supervisor"],
            }
        ),
        name="stricter.toml",
    )
    ungranted = custom_policy(
        tmp_path,
        lambda p: p["agents"]["refund-agent"]["roles"]["support"].remove("issue_refund"),
        name="ungranted.toml",
    )
    async with make_worker():
        handle, _ = await _out_of_budget(client, task_queue, "o-1476", account)
    reasons = []
    for policy in (stricter, ungranted):
        async with make_worker(policy_path=policy):
            code, out, err = await spine(
                client,
                task_queue,
                "replay",
                handle.id,
                "--from-step",
                "3",
                "--set",
                "limits.max_usd=0.5",
                "--wait",
                "--json",
            )
        assert code == 1, out
        reasons.append(json.loads(out)["result"]["reason"])
    assert (
        "fork refused" in reasons[0]
        and "a rule added since (issue_refund: amount above 30.00" in reasons[0]
    )
    assert "is not granted to role 'support'" in reasons[1]


async def test_a_forks_audit_chain_starts_with_where_it_came_from(
    client, make_worker, task_queue, worker_config, new_account
):
    """The fork's own chain opens with run_started naming the original run and step."""
    from spine.observability.audit import SQLiteAuditStore

    async with make_worker():
        handle, _ = await _out_of_budget(client, task_queue, "o-1477", new_account())
        code, out, err = await spine(
            client,
            task_queue,
            "replay",
            handle.id,
            "--from-step",
            "3",
            "--set",
            "limits.max_usd=0.5",
            "--wait",
            "--json",
        )
    assert code == 0, err
    fork = json.loads(out)["workflow_id"]
    store = SQLiteAuditStore(worker_config.state_dir / "audit.db")
    try:
        [chain] = [r for r in await store.run_ids() if r.startswith(f"{fork}:")]
        first = (await store.entries(chain))[0]
    finally:
        await store.close()
    assert first.kind == "run_started"
    assert first.data["forked_from"] == {"workflow_id": handle.id, "step": 3}
