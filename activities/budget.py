"""The budget activity: one atomic settle-and-reserve on the account's ledger workflow."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import timedelta

from temporalio import activity
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from spine.activities.errors import DependencyUnavailable, SpineError, TerminalError
from spine.contract import ACTIVITY_BUDGET_APPLY, ledger_workflow_id
from spine.payloads import BudgetCall, LedgerAnswer, LedgerState
from spine.workflows.ledger import LEDGER_TASK_TIMEOUT, BudgetLedger

LEDGER_RPC_TIMEOUT = timedelta(seconds=5)


class LedgerRefused(TerminalError):
    """The account's ledger refused the operation; retrying the same one cannot help."""


#: How long to keep knocking when the ledger has too many updates in flight (it allows ten).
BUSY_PATIENCE_S = 10.0


class BudgetActivities:
    def __init__(self, client: Client, ledger_task_queue: str) -> None:
        self.client = client
        self.ledger_task_queue = ledger_task_queue

    @activity.defn(name=ACTIVITY_BUDGET_APPLY)
    async def apply(self, call: BudgetCall) -> LedgerAnswer:
        """Settle and reserve on the ledger, starting it if this is the account's first call."""
        try:
            return await self._apply(call)
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow

    async def _apply(self, call: BudgetCall) -> LedgerAnswer:
        deadline = time.monotonic() + BUSY_PATIENCE_S
        delay = 0.05
        while True:
            try:
                return await self._update(call)
            except RPCError as err:
                busy = err.status == RPCStatusCode.RESOURCE_EXHAUSTED
                if not busy or time.monotonic() > deadline:
                    raise self._unavailable(call, err) from err
            except WorkflowUpdateFailedError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.non_retryable:
                    # The ledger refused the operation (not a worker's, or not sane): final.
                    raise LedgerRefused(
                        f"budget ledger for account {call.account!r} refused: {cause.message}"
                    ) from None
                raise self._unavailable(call, err) from err
            except WorkflowUpdateRPCTimeoutOrCancelledError as err:
                # Fail closed: no answer means no reservation; Temporal retries the activity.
                raise self._unavailable(call, err) from err
            # Busy: back off with jitter so fifty runs do not knock in step.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    async def _update(self, call: BudgetCall) -> LedgerAnswer:
        handle = self.client.get_workflow_handle_for(
            BudgetLedger.run, ledger_workflow_id(call.account)
        )
        try:
            return await handle.execute_update(
                BudgetLedger.apply, call.op, rpc_timeout=LEDGER_RPC_TIMEOUT
            )
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        # The account's first call (or its ledger was closed): start it and update in one go.
        start = WithStartWorkflowOperation(
            BudgetLedger.run,
            LedgerState(account=call.account),
            id=ledger_workflow_id(call.account),
            task_queue=self.ledger_task_queue,
            task_timeout=LEDGER_TASK_TIMEOUT,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        try:
            return await self.client.execute_update_with_start_workflow(
                BudgetLedger.apply,
                call.op,
                start_workflow_operation=start,
                rpc_timeout=LEDGER_RPC_TIMEOUT,
            )
        finally:
            # Retrieve the start's outcome so a failed start is not logged as never retrieved.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(start.workflow_handle(), timeout=0.1)

    @staticmethod
    def _unavailable(call: BudgetCall, err: BaseException) -> DependencyUnavailable:
        cause = getattr(err, "cause", None)
        why = f"{err}: {cause}" if cause is not None else str(err)
        return DependencyUnavailable(
            f"budget ledger for account {call.account!r} did not answer: {why}"
        )
