"""The budget activity: one atomic settle-and-reserve on the account's ledger workflow."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from activities.errors import DependencyUnavailable, SpineError
from workflows.ledger import BudgetLedger
from workflows.models import BudgetCall, LedgerAnswer, LedgerState, ledger_workflow_id

LEDGER_RPC_TIMEOUT = timedelta(seconds=5)


class BudgetActivities:
    def __init__(self, client: Client, ledger_task_queue: str) -> None:
        self.client = client
        self.ledger_task_queue = ledger_task_queue

    @activity.defn(name="spine.budget_apply")
    async def apply(self, call: BudgetCall) -> LedgerAnswer:
        """Settle and reserve on the ledger, starting it if this is the account's first call."""
        try:
            return await self._apply(call)
        except SpineError as err:
            raise err.to_application_error() from err

    async def _apply(self, call: BudgetCall) -> LedgerAnswer:
        start = WithStartWorkflowOperation(
            BudgetLedger.run,
            LedgerState(account=call.account),
            id=ledger_workflow_id(call.account),
            task_queue=self.ledger_task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        try:
            return await self.client.execute_update_with_start_workflow(
                BudgetLedger.apply,
                call.op,
                start_workflow_operation=start,
                rpc_timeout=LEDGER_RPC_TIMEOUT,
            )
        except (RPCError, WorkflowUpdateFailedError) as err:
            # Fail closed: no answer means no reservation; Temporal retries the activity.
            raise DependencyUnavailable(
                f"budget ledger for account {call.account!r} did not answer: {err}"
            ) from err
