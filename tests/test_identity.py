"""Verified principals: nobody is who they say they are, only who they can sign as.

Every test plays an attacker with a Temporal client (or a person with the wrong role) against
the real dev server, OpenBao's transit keys and the demo service, and checks what the run did:
nothing granted by a typed name, a forged or replayed signature, or an expired claim.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError

from spine.client.runs import (
    SpineClientError,
    decide,
    get_run,
    get_state,
    operate,
    signal_approval,
    start_run,
    wait_result,
)
from spine.client.testing import DemoService, VaultDev, binary
from spine.contract import ApprovalDecision, OperatorCommand
from spine.guardrails import principals
from spine.guardrails.identity import IdentityError, payload_digest
from spine.guardrails.principals import login_userpass, rotate_principal_key
from tests.helpers import (
    SPINE,
    call,
    client_as,
    custom_policy,
    eventually,
    forged_client,
    scripted_request,
    signer_as,
    signing_env,
    turn,
    wait_for_status,
    worker_keyring,
)


def _refund(order: str, amount: float = 150.0) -> list:
    return [turn(call("issue_refund", order_id=order, amount=amount)), turn(text="done")]


def _approve(approval_id: str, by: str = "bob", role: str = "supervisor", **extra: str):
    return ApprovalDecision(approval_id=approval_id, decision="approve", by=by, role=role, **extra)


async def _scheduled(handle) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


async def test_an_unsigned_start_is_refused_and_runs_nothing(
    client, temporal_env, make_worker, task_queue, service: DemoService
):
    """A start without a claim (a bare Temporal client) fails at once; no tool, no model call."""
    request = scripted_request(_refund("o-1236", 20.0))
    async with make_worker():
        handle = await start_run(temporal_env.client, request, task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "failed" and "unauthenticated" in (result.reason or "")
    assert await _scheduled(handle) == []
    assert service.get("/v1/refunds?order_id=o-1236") == []


async def test_typed_user_role_and_account_grant_nothing(
    client, vault: VaultDev, make_worker, task_queue, tmp_path
):
    """Signed as alice: naming bob, a role she lacks, or another tenant's account is refused."""
    as_alice = client_as(client, vault, "alice")
    policy = custom_policy(tmp_path, lambda p: p["principals"]["alice"].update(accounts=["acme"]))
    asks = {
        "named bob": {"user": "bob", "role": "supervisor"},
        "role she lacks": {"role": "supervisor"},
        "other tenant": {"account": "globex"},
    }
    results = {}
    async with make_worker(policy_path=policy):
        for what, changes in asks.items():
            request = scripted_request(_refund("o-1237", 20.0)).model_copy(update=changes)
            handle = await start_run(as_alice, request, task_queue=task_queue)
            results[what] = (await wait_result(handle)).reason or ""
    assert "user 'bob' is not the principal who signed ('alice')" in results["named bob"]
    assert "does not hold role 'supervisor'" in results["role she lacks"]
    assert "may not act for account 'globex'" in results["other tenant"]


async def test_an_account_name_cannot_climb_paths(temporal_env, make_worker, task_queue):
    """`globex/../acme` never reaches a Vault path: the run's input is refused in one line."""
    request = scripted_request(_refund("o-1238", 20.0)).model_dump(mode="json")
    request["account"] = "globex/../acme"
    async with make_worker():
        handle = await temporal_env.client.start_workflow(
            "AgentWorkflow", request, id=f"climb-{task_queue}", task_queue=task_queue
        )
        try:
            await handle.result()
            raise AssertionError("the run should have failed")
        except WorkflowFailureError as err:
            message = str(err.cause)
    assert "account: String should match pattern" in message
    events = [e.event_type async for e in handle.fetch_history_events()]
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in events


async def test_a_requester_cannot_approve_their_own_refund(
    client, vault: VaultDev, make_worker, task_queue, tmp_path
):
    """Alice, supervisor too, starts a 150.00 refund: her approval is refused, bob's counts."""
    policy = custom_policy(
        tmp_path, lambda p: p["principals"]["alice"].update(roles=["support", "supervisor"])
    )
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(_refund("o-1239")), task_queue=task_queue)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        try:
            await decide(handle, _approve(pending.approval_id, by="alice"))
            raise AssertionError("self-approval was accepted")
        except SpineClientError as err:
            refused = str(err)
        await decide(handle, _approve(pending.approval_id))
        result = await wait_result(handle)
    assert "'alice' requested this run and cannot approve its own request" in refused
    assert result.status == "completed"


async def test_a_decision_signed_by_someone_else_is_refused(
    client, vault: VaultDev, make_worker, task_queue
):
    """Carol signs a decision that names bob; alice signs one as supervisor: both refused."""
    async with make_worker():
        handle = await start_run(client, scripted_request(_refund("o-1240")), task_queue=task_queue)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        refused = []
        for signer, decision in [
            ("carol", _approve(pending.approval_id, by="bob")),
            ("alice", _approve(pending.approval_id, by="alice")),
        ]:
            try:
                await decide(
                    client_as(client, vault, signer).get_workflow_handle(handle.id), decision
                )
            except SpineClientError as err:
                refused.append(str(err))
        assert (await get_state(handle)).status == "awaiting_approval"
        await decide(handle, _approve(pending.approval_id))
        assert (await wait_result(handle)).status == "completed"
    assert "by 'bob' is not the principal who signed ('carol')" in refused[0]
    assert "principal 'alice' does not hold role 'supervisor'" in refused[1]


async def test_a_signature_cannot_be_moved_replayed_or_kept(
    client, vault: VaultDev, make_worker, task_queue
):
    """Bob's signed approval of run A's approval, moved to run B, fails; so does a stale one."""
    bob = signer_as(vault, "bob")
    attacker, claims = forged_client(client)
    async with make_worker():
        run_a = await start_run(client, scripted_request(_refund("o-1241")), task_queue=task_queue)
        run_b = await start_run(client, scripted_request(_refund("o-1242")), task_queue=task_queue)
        a = (await wait_for_status(run_a, "awaiting_approval")).pending_approvals[0].approval_id
        b = (await wait_for_status(run_b, "awaiting_approval")).pending_approvals[0].approval_id
        for_a = _approve(a)
        claims.next = bob.sign("bob", "decide", run_a.id, payload_digest(for_a))
        refused = []
        for target, payload in [(run_b, for_a), (run_b, _approve(b))]:
            try:
                await decide(attacker.get_workflow_handle(target.id), payload)
            except SpineClientError as err:
                refused.append(str(err))
        stale = _approve(b)
        claims.next = bob.sign(
            "bob",
            "decide",
            run_b.id,
            payload_digest(stale),
            issued_at=datetime.now(UTC) - timedelta(minutes=10),
        )
        try:
            await decide(attacker.get_workflow_handle(run_b.id), stale)
        except SpineClientError as err:
            refused.append(str(err))
        claims.next = None
        try:
            await decide(attacker.get_workflow_handle(run_b.id), _approve(b))
        except SpineClientError as err:
            refused.append(str(err))
        await decide(run_a, _approve(a))
        await decide(run_b, _approve(b))
        assert (await wait_result(run_a)).status == "completed"
        assert (await wait_result(run_b)).status == "completed"
    assert len(refused) == 4, refused
    assert all("does not match this decide of run" in r for r in refused[:2])
    assert "expired or replayed" in refused[2]
    assert "unauthenticated" in refused[3]


async def test_two_distinct_approvers_when_the_policy_says_so(
    client, make_worker, task_queue, tmp_path
):
    """With approvals_required = 2, bob's approval leaves it pending, bob again is refused."""

    def two_approvers(p: dict) -> None:
        [above] = [r for r in p["agents"]["refund-agent"]["approvals"] if "above" in r]
        above["approvals_required"] = 2

    policy = custom_policy(tmp_path, two_approvers)
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(_refund("o-1243")), task_queue=task_queue)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        first = await decide(handle, _approve(pending.approval_id))
        try:
            await decide(handle, _approve(pending.approval_id))
            raise AssertionError("bob approved twice")
        except SpineClientError as err:
            assert "needs 2 distinct approvers" in str(err)
        second = await decide(handle, _approve(pending.approval_id, by="carol"))
        result = await wait_result(handle)
    assert first.status == "awaiting_approval" and second.status == "running"
    assert result.status == "completed"


async def test_operator_commands_are_signed_and_checked(
    client, vault: VaultDev, make_worker, task_queue, service: DemoService
):
    """A parked run ignores alice's retry (not an operator) and takes ops'."""
    account = f"noseq-{uuid.uuid4().hex[:6]}"  # no secret in Vault yet: the lookup parks
    request = scripted_request([turn(call("lookup_order", order_id="o-1244")), turn(text="ok")])
    request.account = account
    async with make_worker():
        handle = await start_run(client, request, task_queue=task_queue)
        await wait_for_status(handle, "parked", timeout=120)
        try:
            await operate(handle, OperatorCommand(action="retry", by="alice", role="support"))
            raise AssertionError("alice operated a parked run")
        except SpineClientError as err:
            assert "role 'support' may not operate runs" in str(err)
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        await operate(handle, OperatorCommand(action="retry", by="ops", role="operator"))
        result = await wait_result(handle)
    assert result.path and "operator ops (operator) chose retry" in " ".join(result.path)


async def test_the_signal_path_verifies_and_records_refusals(
    client, vault: VaultDev, make_worker, task_queue
):
    """A forged approval signal is refused and shows in `state`; a signed one is taken."""
    async with make_worker():
        handle = await start_run(client, scripted_request(_refund("o-1245")), task_queue=task_queue)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        carol = client_as(client, vault, "carol").get_workflow_handle(handle.id)
        await signal_approval(carol, _approve(pending.approval_id, by="bob"))

        async def refused() -> bool:
            return bool((await get_state(handle)).refused)

        await eventually(refused, what="the forged signal to be refused")
        state = await get_state(handle)
        assert state.status == "awaiting_approval"
        await signal_approval(handle, _approve(pending.approval_id))
        result = await wait_result(handle)
    assert "approval by carol: by 'bob' is not the principal who signed ('carol')" in state.refused
    assert result.status == "completed"


async def test_rotated_keys_keep_old_signatures_good_and_sign_new_ones(
    client, vault: VaultDev, make_worker, task_queue
):
    """After bob's key rotates, a claim signed just before still verifies; new ones use v2."""
    bob = signer_as(vault, "bob")
    attacker, claims = forged_client(client)
    async with make_worker():
        handle = await start_run(client, scripted_request(_refund("o-1246")), task_queue=task_queue)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        decision = _approve(pending.approval_id)
        claims.next = bob.sign("bob", "decide", handle.id, payload_digest(decision))
        version = rotate_principal_key(vault.client(), "bob")
        fresh = bob.sign("bob", "decide", handle.id, payload_digest(decision))
        await decide(attacker.get_workflow_handle(handle.id), decision)
        result = await wait_result(handle)
    assert claims.next.signature.startswith("vault:v1:") and version >= 2
    assert fresh.signature.startswith(f"vault:v{version}:")
    assert result.status == "completed"


async def test_the_temporal_cli_way_in(client, make_worker, task_queue, tmp_path):
    """`temporal workflow start` and `update execute` with `--headers "$(spine sign ...)"`."""
    request = scripted_request(_refund("o-1247"))
    run_file = tmp_path / "run.json"
    run_file.write_text(request.model_dump_json())
    wid = f"tcli-{task_queue}"
    address = client.service_client.config.target_host

    def sh(*args: str, principal: str) -> str:
        env = {**os.environ, **signing_env(client, principal), "TEMPORAL_ADDRESS": address}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    temporal = binary("temporal")
    async with make_worker():
        header = sh(
            SPINE,
            "sign",
            "start",
            "--workflow-id",
            wid,
            "--input-file",
            str(run_file),
            principal="alice",
        )
        await asyncio.to_thread(
            sh,
            temporal,
            "workflow",
            "start",
            "--type",
            "AgentWorkflow",
            "--task-queue",
            task_queue,
            "--workflow-id",
            wid,
            "--input-file",
            str(run_file),
            "--headers",
            header,
            "--address",
            address,
            principal="alice",
        )
        handle = get_run(client, wid)
        pending = (await wait_for_status(handle, "awaiting_approval")).pending_approvals[0]
        decision = json.dumps(_approve(pending.approval_id).model_dump())
        header = sh(
            SPINE, "sign", "decide", "--workflow-id", wid, "--input", decision, principal="bob"
        )
        await asyncio.to_thread(
            sh,
            temporal,
            "workflow",
            "update",
            "execute",
            "--workflow-id",
            wid,
            "--name",
            "decide",
            "--input",
            decision,
            "--headers",
            header,
            "--address",
            address,
            principal="bob",
        )
        result = await wait_result(handle)
    assert result.status == "completed"


def test_a_signer_keeps_one_openbao_client_per_thread_and_token(
    vault: VaultDev, monkeypatch: pytest.MonkeyPatch
):
    """Signing again reuses the thread's client (and its connection); another thread or a new
    token gets its own. Every signature still verifies, and a revoked token is still refused."""
    made = []
    real = principals.hvac.Client

    def counting(*args, **kwargs):
        made.append(kwargs.get("token"))
        return real(*args, **kwargs)

    keyring = worker_keyring(vault)
    token = login_userpass(vault.url, "bob", "pw-bob")  # a second login: a new token
    monkeypatch.setattr(principals.hvac, "Client", counting)
    bob = signer_as(vault, "bob")
    claims = [bob.sign("bob", "decide", f"run-{i}", f"digest-{i}") for i in range(5)]
    assert len(made) == 1
    for i, claim in enumerate(claims):
        keyring.verify(
            claim, purpose="decide", workflow_id=f"run-{i}", payload_digest=f"digest-{i}"
        )
    with ThreadPoolExecutor(1) as other:
        other.submit(bob.sign, "bob", "decide", "run-x", "digest").result()
    assert len(made) == 2

    bob.tokens["bob"] = token  # type: ignore[index]
    bob.sign("bob", "decide", "run-y", "digest")
    assert made[-1] == token and len(made) == 3
    vault.client().auth.token.revoke(token)
    with pytest.raises(IdentityError, match="refused to sign as 'bob'|cannot sign"):
        bob.sign("bob", "decide", "run-z", "digest")
