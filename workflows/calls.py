"""The run's calls to Spine's own activities: resolve the agent, store the audit trail, apply to
the account's budget ledger. Each fails closed: what a guard needs and cannot get parks the run
(``park``), except where the caller says it may not (while parking, and at the very end).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from spine.activities.errors import NON_RETRYABLE_TYPES, failure_text
    from spine.contract import (
        ACTIVITY_AUDIT_APPEND,
        ACTIVITY_BUDGET_APPLY,
        ACTIVITY_FORK_STATE,
        ACTIVITY_RESOLVE_AGENT,
        ACTIVITY_VERIFY_CARRY,
        ACTIVITY_VERIFY_PRINCIPAL,
        AgentRequest,
    )
    from spine.guardrails.identity import Claim, Purpose
    from spine.observability.trail import AuditTrail
    from spine.payloads import (
        AgentSpec,
        Appended,
        BudgetCall,
        ForkStateInput,
        LedgerAnswer,
        LedgerOp,
        PrincipalView,
        ResolveAgentInput,
        Verdict,
        VerifyCarryInput,
        VerifyInput,
    )
    from spine.workflows.state import RunState, StopRun

Park = Callable[[str], Awaitable[object]]
"""Park the run with a reason until an operator retries (or ends it)."""


#: Runs started on code with this marker take fewer round trips through the server: they resolve
#: their agent locally first (`resolve_agent`), keep the search attributes their start carried
#: when those are right, and do not upsert just before finishing (finishing does). Asked before
#: the run's first local activity: a patch marker recorded after a local activity of the same
#: workflow task did not replay (TMPRL1100, seen on a query that replayed the run).
PATCH_LEAN = "spine-lean-run"

#: How `spine.resolve_agent` is retried. A worker that does not serve the agent refuses it
#: (`AgentNotServed`, retryable), so the task goes back to the queue for another worker: this
#: many tries, quickly, before the run (or `spine run`'s check) says no worker serves it.
RESOLVE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=0.2),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=12,
    non_retryable_error_types=NON_RETRYABLE_TYPES,
)


async def resolve_agent(request: AgentRequest, *, locally: bool) -> AgentSpec:
    """Pin the agent's tools and the policy slice that applies to this run.

    The worker running the run's task resolves it first, as a local activity (no round trip
    through the server: most workers serve the agents they run); when it cannot (it does not
    serve the agent, say), the regular activity finds a worker on the task queue that does.

    Raises:
        StopRun: the agent is unknown or cannot be resolved.
    """
    inp = ResolveAgentInput(agent=request.agent, role=request.role, account=request.account)
    if locally:
        try:
            return await workflow.execute_local_activity(
                ACTIVITY_RESOLVE_AGENT,
                inp,
                result_type=AgentSpec,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=1),
                summary=f"resolve agent {request.agent}",
            )
        except (ActivityError, ApplicationError):
            pass  # the regular activity below asks the task queue (and says why if it fails)
    try:
        return await workflow.execute_activity(
            ACTIVITY_RESOLVE_AGENT,
            inp,
            result_type=AgentSpec,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RESOLVE_RETRY,
            summary=f"resolve agent {request.agent}",
        )
    except ActivityError as err:
        kind, message = failure_text(err)
        raise StopRun("failed", f"cannot start agent {request.agent!r}: {kind}: {message}") from err


async def write_audit(trail: AuditTrail, *, park: Park | None) -> None:
    """Store the queued audit entries in order through ``spine.audit_append``.

    The chain is keyed by workflow id and first run id, so it spans continue-as-new. While the
    store fails the run parks (`park`); without `park` the failure is logged and the entries stay
    queued for the next write.
    """
    while (batch := trail.batch()) is not None:
        try:
            anchor = await workflow.execute_local_activity(
                ACTIVITY_AUDIT_APPEND,
                batch,
                result_type=Appended,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=0.5),
                    maximum_interval=timedelta(seconds=5),
                    maximum_attempts=10,
                ),
                summary=f"audit {len(batch.entries)} entries",
            )
        # A local activity that gives up surfaces as its ApplicationError itself.
        except (ActivityError, ApplicationError) as err:
            kind, message = failure_text(err)
            if park is None:
                workflow.logger.error("audit write failed (kept queued): %s: %s", kind, message)
                return
            await park(f"audit log unavailable: {kind}: {message}")
            continue
        trail.stored_batch(batch, anchor)  # by seq: calls of one turn may write at once


async def apply_ledger(
    account: str, op: LedgerOp, *, park: Park | None, step: int
) -> LedgerAnswer | None:
    """One settle-and-reserve on the account's ledger (``spine.budget_apply``).

    No reservation, no model call: while the ledger does not answer the run parks (`park`).
    Without `park` (settling at the end of a run) a silent ledger is logged and None returned;
    unsettled reservations stop holding budget after the ledger's TTL.
    """
    while True:
        try:
            return await workflow.execute_local_activity(
                ACTIVITY_BUDGET_APPLY,
                BudgetCall(account=account, op=op),
                result_type=LedgerAnswer,
                start_to_close_timeout=timedelta(seconds=15),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=10),
                    maximum_attempts=12,
                ),
                summary=f"budget {account}",
            )
        except (ActivityError, ApplicationError) as err:
            kind, message = failure_text(err)
            if park is None:
                workflow.logger.warning("could not settle budget: %s: %s", kind, message)
                return None
            await park(
                f"budget ledger unavailable at step {step} (no model call without a "
                f"reservation): {kind}: {message}"
            )


async def verify_principal(
    claim: Claim | None,
    purpose: Purpose,
    payload_digest: str,
    at: datetime,
) -> Verdict:
    """Ask the worker whether `claim` proves its principal for this purpose and payload (the
    verdict is in history, so replay decides the same)."""
    return await workflow.execute_local_activity(
        ACTIVITY_VERIFY_PRINCIPAL,
        VerifyInput(
            claim=claim,
            purpose=purpose,
            workflow_id=workflow.info().workflow_id,
            payload_digest=payload_digest,
            at=at,
        ),
        result_type=Verdict,
        start_to_close_timeout=timedelta(seconds=15),
        retry_policy=RetryPolicy(
            initial_interval=timedelta(seconds=1),
            maximum_interval=timedelta(seconds=10),
            maximum_attempts=20,
        ),
        summary=f"verify {purpose} by {claim.principal if claim else 'nobody'}",
    )


async def verify_carry() -> Verdict:
    """Was this run's carried state handed over by a continue-as-new of this workflow id?"""
    info = workflow.info()
    return await workflow.execute_local_activity(
        ACTIVITY_VERIFY_CARRY,
        VerifyCarryInput(
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            continued_run_id=info.continued_run_id,
        ),
        result_type=Verdict,
        start_to_close_timeout=timedelta(seconds=15),
        retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10), maximum_attempts=20),
        summary="verify carried state",
    )


async def fork_state(request: AgentRequest, principal: PrincipalView) -> RunState:
    """The state of the run `request.fork_from` names, rebuilt by the worker from its history
    and checked against today's policy.

    Raises:
        StopRun: the fork is refused (the message names why).
    """
    assert request.fork_from is not None
    try:
        return await workflow.execute_activity(
            ACTIVITY_FORK_STATE,
            ForkStateInput(fork_from=request.fork_from, request=request, principal=principal),
            result_type=RunState,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(
                maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE_TYPES
            ),
            summary=f"fork {request.fork_from.workflow_id} at step {request.fork_from.step}",
        )
    except ActivityError as err:
        kind, message = failure_text(err)
        raise StopRun("failed", f"fork refused: {message}", compensate=False) from err
