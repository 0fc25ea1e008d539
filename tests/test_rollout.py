"""Rolling a new build of `AgentWorkflow` under Temporal worker versioning.

Build v1 serves runs; two of them wait for a supervisor's approval. Build v2 — an `AgentWorkflow`
whose every run starts with a timer v1 never issued, so v1 histories cannot replay on it — starts
beside v1 and becomes the deployment's current version. Then:

* a new run goes to v2 and completes there;
* the run approved after the roll makes its refund on v1 (it is pinned: nothing of its history is
  replayed on v2 code), then moves to v2 at its next step through continue-as-new, and completes;
* the run rejected after the roll ends on v1, rejected;
* no workflow task fails anywhere, and each refund is made once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import VersioningBehavior

from spine.client.demo import build_demo_request
from spine.client.runs import RunHandle, decide, start_run
from spine.client.testing import DemoService, set_current_build
from spine.contract import AgentResult, ApprovalDecision
from spine.plugin import SpineConfig, build_worker
from tests.helpers import call, scripted_request, turn, wait_for_status
from tests.rollout_v2 import V2_MARK, AgentWorkflowV2


async def builds_of(client: Client, workflow_id: str) -> list[str]:
    """The build id of every completed workflow task of every run of `workflow_id`, in order;
    fails on a failed workflow task (a nondeterminism error would be one)."""
    builds: list[str] = []
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        async for event in handle.fetch_history_events():
            assert event.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED, (
                f"{workflow_id}: workflow task failed: "
                f"{event.workflow_task_failed_event_attributes.failure.message}"
            )
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                attributes = event.workflow_task_completed_event_attributes
                builds.append(attributes.deployment_version.build_id)
    return builds


def runs_on(builds: Sequence[str]) -> list[str]:
    """The builds in the order they served, without repeats: ["v1", "v2"] for a moved run."""
    order: list[str] = []
    for build in builds:
        if not order or order[-1] != build:
            order.append(build)
    return order


async def approve(handle: RunHandle, decision: str) -> None:
    state = await wait_for_status(handle, "awaiting_approval")
    pending = state.pending_approvals[0]
    await decide(
        handle,
        ApprovalDecision(
            approval_id=pending.approval_id,
            decision=decision,  # type: ignore[arg-type]
            by="bob",
            role="supervisor",
            reason="roll-out test",
        ),
    )


async def test_a_new_build_rolls_out_while_old_runs_wait_for_approval(
    client: Client, worker_config: SpineConfig, service: DemoService, new_account
) -> None:
    deployment = f"spine-rollout-{uuid.uuid4().hex[:8]}"
    account = new_account("rollout")  # no budget: no ledger shared with other tests
    base = SpineConfig(
        **{
            **worker_config.__dict__,
            "deployment_name": deployment,
            "ledger_task_queue": f"ledger-{deployment}",
        }
    )
    queue = base.task_queue

    def request(order: str):
        made = build_demo_request(order)
        made.account = account
        return made

    v1 = build_worker(client, config=SpineConfig(**{**base.__dict__, "build_id": "v1"}))
    v2 = build_worker(
        client,
        config=SpineConfig(**{**base.__dict__, "build_id": "v2"}),
        agent_workflow=AgentWorkflowV2,
    )
    async with v1:
        await set_current_build(client, deployment, "v1")
        approved = await start_run(client, request("o-1406"), task_queue=queue)
        rejected = await start_run(client, request("o-1407"), task_queue=queue)
        await wait_for_status(approved, "awaiting_approval")
        await wait_for_status(rejected, "awaiting_approval")
        async with v2:
            await set_current_build(client, deployment, "v2")
            small = scripted_request(
                [
                    turn(call("lookup_order", order_id="o-1408")),
                    turn(
                        call("issue_refund", order_id="o-1408", amount=20.0, reason="late"),
                        confidence=0.95,
                    ),
                    turn(text="Refunded 20.00."),
                ]
            )
            small.account = account
            fresh = await start_run(client, small, task_queue=queue)
            await approve(approved, "approve")
            await approve(rejected, "reject")
            results: list[AgentResult] = await asyncio.wait_for(
                asyncio.gather(approved.result(), rejected.result(), fresh.result()), timeout=180
            )

    done, refused, new = results
    assert (done.status, refused.status, new.status) == ("completed", "rejected", "completed")
    assert runs_on(await builds_of(client, approved.id)) == ["v1", "v2"]
    assert runs_on(await builds_of(client, rejected.id)) == ["v1"]
    assert runs_on(await builds_of(client, fresh.id)) == ["v2"]
    assert V2_MARK in done.path and V2_MARK in new.path and V2_MARK not in refused.path
    made = [refunds(service, o, h) for o, h in (("o-1406", approved), ("o-1407", rejected))]
    assert [*made, refunds(service, "o-1408", fresh)] == [1, 0, 1]


def refunds(service: DemoService, order: str, handle: RunHandle) -> int:
    """Refunds the service made for `order` by this run (its idempotency keys)."""
    found = service.get(f"/v1/refunds?order_id={order}")
    assert isinstance(found, list)
    return sum(1 for r in found if str(r["idempotency_key"]).startswith(f"{handle.id}/"))


def test_versioning_settings() -> None:
    """SPINE_DEPLOYMENT_NAME and SPINE_BUILD_ID turn worker versioning on (pinned by default);
    one without the other is a clear error; neither leaves the worker unversioned."""
    config = SpineConfig.from_env({"SPINE_DEPLOYMENT_NAME": "spine", "SPINE_BUILD_ID": "b7"})
    deployment = config.deployment()
    assert deployment is not None and deployment.use_worker_versioning
    assert deployment.version.deployment_name == "spine" and deployment.version.build_id == "b7"
    assert deployment.default_versioning_behavior == VersioningBehavior.PINNED
    assert SpineConfig.from_env({}).deployment() is None
    with pytest.raises(ValueError, match="needs both SPINE_DEPLOYMENT_NAME and SPINE_BUILD_ID"):
        SpineConfig.from_env({"SPINE_BUILD_ID": "b7"}).deployment()
    ledger = config.deployment(VersioningBehavior.AUTO_UPGRADE)
    assert (
        ledger is not None and ledger.default_versioning_behavior == VersioningBehavior.AUTO_UPGRADE
    )
