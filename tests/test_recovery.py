"""Structured recovery: parking and the operator signal, saga compensation, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import uuid

import pytest

from spine.client.runs import decide, get_state, signal_operator, start_run, wait_result
from spine.client.testing import DemoService, VaultDev, binary
from spine.contract import SA_STATUS, ApprovalDecision, OperatorCommand
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig
from tests.helpers import call, policy_file, scripted_request, turn, wait_for_status


@pytest.fixture
def worker_config(worker_config: SpineConfig, vault: VaultDev) -> SpineConfig:
    """Secrets read afresh on every call: these tests take a secret away mid-run and expect the
    next call to find it gone (a worker's 30 s secret cache would otherwise still hold it)."""
    uncached = VaultSecrets(vault.url, token=vault.token, cache_ttl_s=0)
    return dataclasses.replace(worker_config, secrets=uncached)


def _account(vault: VaultDev, service: DemoService) -> str:
    """A fresh account whose API key lives at secret/spine/<account> (removable per test)."""
    account = f"acct-{uuid.uuid4().hex[:8]}"
    vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
    return account


def _approve(approval_id: str) -> ApprovalDecision:
    return ApprovalDecision(
        approval_id=approval_id, decision="approve", by="bob", role="supervisor"
    )


async def _park_after_refund(client, task_queue, vault, service, order: str):
    """Refund 40 on `order`, then park on a 150 refund whose secret vanished meanwhile."""
    account = _account(vault, service)
    script = [
        turn(call("issue_refund", order_id=order, amount=40.0), confidence=0.9),
        turn(call("issue_refund", order_id=order, amount=150.0), confidence=0.9),
        turn(text="Refunded."),
    ]
    request = scripted_request(script)
    request.account = account
    handle = await start_run(client, request, task_queue=task_queue)
    state = await wait_for_status(handle, "awaiting_approval")
    vault.client().secrets.kv.v2.delete_metadata_and_all_versions(
        path=f"spine/{account}", mount_point="secret"
    )
    await decide(handle, _approve(state.pending_approvals[0].approval_id))
    parked = await wait_for_status(handle, "parked")
    assert "SecretMissing" in (parked.reason or "")
    return handle, account


async def test_parked_run_retries_after_fix(client, make_worker, task_queue, vault, service):
    """A run parked on a missing secret finishes once the secret is back and an operator retries."""
    async with make_worker():
        handle, account = await _park_after_refund(client, task_queue, vault, service, "o-1021")
        description = await handle.describe()
        assert description.typed_search_attributes.get(SA_STATUS) == "parked"
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        await signal_operator(handle, OperatorCommand(action="retry", by="ops", role="operator"))
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    assert [r["amount"] for r in service.get("/v1/refunds?order_id=o-1021")] == [40.0, 150.0]
    assert any("chose retry" in p for p in result.path)


async def test_parked_run_skip_tells_the_model(client, make_worker, task_queue, vault, service):
    """`skip` returns an error to the model for the parked call and the run goes on."""
    async with make_worker():
        handle, _ = await _park_after_refund(client, task_queue, vault, service, "o-1022")
        await signal_operator(
            handle, OperatorCommand(action="skip", by="ops", role="operator", reason="manual")
        )
        result = await wait_result(handle)
    assert result.status == "completed"
    assert [r["amount"] for r in service.get("/v1/refunds?order_id=o-1022")] == [40.0]


@pytest.mark.parametrize(
    ("action", "order", "status"),
    [
        ("compensate", "o-1023", "compensated"),
        ("abort", "o-1024", "failed"),
    ],
)
async def test_parked_run_compensate_and_abort_undo_side_effects(
    client, make_worker, task_queue, vault, service, action, order, status
):
    """`compensate` and `abort` reverse the refund already made; abort reports `failed`."""
    async with make_worker():
        handle, account = await _park_after_refund(client, task_queue, vault, service, order)
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        await signal_operator(handle, OperatorCommand(action=action, by="ops", role="operator"))
        result = await wait_result(handle)
    assert result.status == status, result.reason
    [refund] = service.get(f"/v1/refunds?order_id={order}")
    assert refund["reversed"] is True
    assert len(service.get(f"/v1/reversals?order_id={order}")) == 1
    assert result.side_effects[0].compensated


async def test_operator_with_wrong_role_is_refused(client, make_worker, task_queue, vault, service):
    """An operator signal from a role without the right is ignored; the run stays parked."""
    async with make_worker():
        handle, account = await _park_after_refund(client, task_queue, vault, service, "o-1025")
        await signal_operator(handle, OperatorCommand(action="abort", by="mallory", role="viewer"))
        await signal_operator(
            handle, OperatorCommand(action="compensate", by="ops", role="operator")
        )
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        result = await wait_result(handle)
    assert result.status == "compensated"
    assert not any("mallory" in p for p in result.path)


async def test_parking_times_out_into_compensation(
    client, make_worker, task_queue, vault, service, tmp_path
):
    """A run parked longer than the policy's parking timeout compensates by itself."""
    policy = policy_file(tmp_path, runtime={"parking_timeout_s": 3})
    async with make_worker(policy_path=policy):
        handle, account = await _park_after_refund(client, task_queue, vault, service, "o-1026")
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        result = await wait_result(handle)
    assert result.status == "compensated"
    assert "parked longer than" in (result.reason or "")
    assert service.get("/v1/refunds?order_id=o-1026")[0]["reversed"] is True


async def test_terminal_failure_compensates_in_reverse_order(
    client, make_worker, task_queue, service
):
    """A terminal error at the last step undoes email then refund; the ticket is named as left."""
    script = [
        turn(call("issue_refund", order_id="o-1027", amount=60.0), confidence=0.9),
        turn(call("send_email", order_id="o-1027", subject="Refund", body="Refunded 60.")),
        turn(call("update_ticket", order_id="o-1027", status="resolved")),
        turn(text="never"),
    ]
    script[-1].error = "terminal"
    service.post("/v1/chaos", {"fail_after_commit_rate": 0.5, "seed": 7})
    try:
        async with make_worker():
            handle = await start_run(client, scripted_request(script), task_queue=task_queue)
            result = await wait_result(handle)
    finally:
        service.post("/v1/chaos", {})
    assert result.status == "failed"
    assert "could not undo: update_ticket@step3 (no compensation)" in (result.reason or "")
    assert [s.compensated for s in result.side_effects] == [True, True, False]
    reversals = service.get("/v1/reversals?order_id=o-1027")
    emails = service.get("/v1/emails?order_id=o-1027")
    assert len(reversals) == 1 and len(emails) == 2
    correction = next(e for e in emails if e["subject"].startswith("Correction"))
    assert correction["created_at"] <= reversals[0]["created_at"], "email undone before refund"
    assert len(service.get("/v1/refunds?order_id=o-1027")) == 1


async def test_compensation_alone_gives_compensated(client, make_worker, task_queue, service):
    """When every side effect has a compensation, a terminal failure ends `compensated`."""
    script = [
        turn(call("issue_refund", order_id="o-1028", amount=20.0), confidence=0.9),
        turn(text="never"),
    ]
    script[-1].error = "terminal"
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "compensated", result.reason
    assert "ModelRequestRejected" in (result.reason or "")
    assert service.get("/v1/refunds?order_id=o-1028")[0]["reversed"] is True


async def test_cancel_from_temporal_cli_compensates(client, make_worker, task_queue, service):
    """`temporal workflow cancel` on a run waiting for approval reverses its earlier refund."""
    script = [
        turn(call("issue_refund", order_id="o-1029", amount=30.0), confidence=0.9),
        turn(call("issue_refund", order_id="o-1029", amount=150.0), confidence=0.9),
        turn(text="done"),
    ]
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        await wait_for_status(handle, "awaiting_approval")
        await asyncio.to_thread(
            subprocess.run,
            [
                binary("temporal"),
                "workflow",
                "cancel",
                "--workflow-id",
                handle.id,
                "--address",
                client.service_client.config.target_host,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        result = await wait_result(handle)
    assert result.status == "compensated"
    assert "cancel" in (result.reason or "")
    [refund] = service.get("/v1/refunds?order_id=o-1029")
    assert refund["reversed"] is True


async def test_fallback_model_takes_over(client, make_worker, task_queue, tmp_path):
    """A model that keeps failing hands the turn to the request's fallback model, and says so."""
    policy = policy_file(
        tmp_path, runtime={"model_max_attempts": 2, "model_initial_interval_s": 0.1}
    )
    script = [turn(call("lookup_order", order_id="o-1030")), turn(text="Found it.")]
    script[1].error = "transient"
    async with make_worker(policy_path=policy):
        request = scripted_request(script, fallback=["scripted-cheap"])
        handle = await start_run(client, request, task_queue=task_queue)
        result = await wait_result(handle)
        state = await get_state(handle)
    assert result.status == "completed", result.reason
    assert result.output == "Found it."
    assert result.path == ["step 2: model scripted failed, used fallback scripted-cheap"]
    assert result.retries == 1 and state.retries == 1
