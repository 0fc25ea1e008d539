"""The budget activity: one atomic settle-and-reserve on the account's ledger workflow, sent in a
batch with the other runs' operations on that account (:class:`LedgerBatcher`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
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
from spine.payloads import (
    MAX_LEDGER_BATCH,
    BudgetCall,
    LedgerAnswer,
    LedgerBatch,
    LedgerOp,
    LedgerState,
)
from spine.workflows.ledger import LEDGER_TASK_TIMEOUT, BudgetLedger

LEDGER_RPC_TIMEOUT = timedelta(seconds=5)


#: How the SDK words an update the workflow has no handler for.
UNKNOWN_UPDATE = "expected but not found"


class LedgerRefused(TerminalError):
    """The account's ledger refused the operation; retrying the same one cannot help."""


#: How long to keep knocking when the ledger has too many updates in flight (it allows ten).
BUSY_PATIENCE_S = 10.0


class BudgetActivities:
    def __init__(self, client: Client, ledger_task_queue: str) -> None:
        self.client = client
        self.ledger_task_queue = ledger_task_queue
        self.batcher = LedgerBatcher(self._send)

    @activity.defn(name=ACTIVITY_BUDGET_APPLY)
    async def apply(self, call: BudgetCall) -> LedgerAnswer:
        """Settle and reserve on the ledger, starting it if this is the account's first call."""
        try:
            answer = await self.batcher.apply(call.account, call.op)
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow
        if answer.refused:
            raise LedgerRefused(
                f"budget ledger for account {call.account!r} refused: {answer.refused}"
            ).to_application_error()
        return answer

    async def _send(self, account: str, ops: list[LedgerOp]) -> list[LedgerAnswer]:
        """One batch update, knocking again while the ledger has too many updates in flight."""
        deadline = time.monotonic() + BUSY_PATIENCE_S
        delay = 0.05
        while True:
            try:
                return await self._update(account, ops)
            except RPCError as err:
                # Busy (its in-flight updates are at the limit) or aborted (it was continuing as
                # new): both pass in moments.
                busy = err.status in (RPCStatusCode.RESOURCE_EXHAUSTED, RPCStatusCode.UNAVAILABLE)
                if not busy or time.monotonic() > deadline:
                    raise self._unavailable(account, err) from err
            except WorkflowUpdateFailedError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and UNKNOWN_UPDATE in cause.message:
                    # A ledger worker of an earlier build (no `apply_batch`): one by one.
                    one_by_one = (self._update_one(account, op) for op in ops)
                    return list(await asyncio.gather(*one_by_one))
                if isinstance(cause, ApplicationError) and cause.non_retryable:
                    # The ledger refused the batch (not a worker's): final.
                    raise LedgerRefused(
                        f"budget ledger for account {account!r} refused: {cause.message}"
                    ) from None
                raise self._unavailable(account, err) from err
            except WorkflowUpdateRPCTimeoutOrCancelledError as err:
                # Fail closed: no answer means no reservation; Temporal retries the activity.
                raise self._unavailable(account, err) from err
            # Back off with jitter so workers do not knock in step.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    async def _update(self, account: str, ops: list[LedgerOp]) -> list[LedgerAnswer]:
        handle = self.client.get_workflow_handle_for(BudgetLedger.run, ledger_workflow_id(account))
        batch = LedgerBatch(ops=ops)
        try:
            answer = await handle.execute_update(
                BudgetLedger.apply_batch, batch, rpc_timeout=LEDGER_RPC_TIMEOUT
            )
            return answer.answers
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
        # The account's first call (or its ledger was closed): start it and update in one go.
        start = WithStartWorkflowOperation(
            BudgetLedger.run,
            LedgerState(account=account),
            id=ledger_workflow_id(account),
            task_queue=self.ledger_task_queue,
            task_timeout=LEDGER_TASK_TIMEOUT,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        try:
            answer = await self.client.execute_update_with_start_workflow(
                BudgetLedger.apply_batch,
                batch,
                start_workflow_operation=start,
                rpc_timeout=LEDGER_RPC_TIMEOUT,
            )
            return answer.answers
        finally:
            # Retrieve the start's outcome so a failed start is not logged as never retrieved.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(start.workflow_handle(), timeout=0.1)

    async def _update_one(self, account: str, op: LedgerOp) -> LedgerAnswer:
        handle = self.client.get_workflow_handle_for(BudgetLedger.run, ledger_workflow_id(account))
        try:
            return await handle.execute_update(
                BudgetLedger.apply, op, rpc_timeout=LEDGER_RPC_TIMEOUT
            )
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and cause.non_retryable:
                return _refused(op, cause.message)
            raise

    @staticmethod
    def _unavailable(account: str, err: BaseException) -> DependencyUnavailable:
        cause = getattr(err, "cause", None)
        why = f"{err}: {cause}" if cause is not None else str(err)
        return DependencyUnavailable(f"budget ledger for account {account!r} did not answer: {why}")


def _refused(op: LedgerOp, why: str) -> LedgerAnswer:
    return LedgerAnswer(
        granted=False,
        reason=why,
        refused=why,
        day="",
        month="",
        day_committed_usd=0.0,
        day_reserved_usd=0.0,
        month_committed_usd=0.0,
        used_fraction=0.0,
    )


Send = Callable[[str, list[LedgerOp]], Awaitable[list[LedgerAnswer]]]


class LedgerBatcher:
    """Group commit for the budget ledgers: the operations of every run this worker serves on one
    account go to its ledger in batches, at most `in_flight` at a time.

    A ledger is one workflow, so its updates are applied one by one and Temporal admits only a
    few at a time (ten by default). One update per operation made a busy account's ledger the
    bottleneck of the whole fleet: two hundred runs of one account queued behind it, knocked
    again and again and timed out. Batched, the ledger sees one update per worker round trip
    however many runs there are, and each operation is still applied, in order, by the same
    code, under the same checks: a batch changes how operations travel, not what they do.

    An operation whose batch failed fails with the batch (its activity is retried, and ledger
    operations are idempotent by reservation id); an operation the ledger refused fails alone.
    """

    def __init__(self, send: Send, *, in_flight: int = 2, max_ops: int = MAX_LEDGER_BATCH) -> None:
        self._send = send
        self._in_flight_max = in_flight
        self._max_ops = max_ops
        self._waiting: dict[str, list[tuple[LedgerOp, asyncio.Future[LedgerAnswer]]]] = {}
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def apply(self, account: str, op: LedgerOp) -> LedgerAnswer:
        future: asyncio.Future[LedgerAnswer] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(account, []).append((op, future))
        self._dispatch(account)
        return await future

    def _dispatch(self, account: str) -> None:
        waiting = self._waiting.get(account)
        while waiting and self._in_flight.get(account, 0) < self._in_flight_max:
            batch, waiting[:] = waiting[: self._max_ops], waiting[self._max_ops :]
            # Operations whose activity was cancelled while they waited are not sent.
            batch = [(op, f) for op, f in batch if not f.done()]
            if not batch:
                continue
            self._in_flight[account] = self._in_flight.get(account, 0) + 1
            task = asyncio.create_task(self._flush(account, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not waiting:
            self._waiting.pop(account, None)

    async def _flush(
        self, account: str, batch: list[tuple[LedgerOp, asyncio.Future[LedgerAnswer]]]
    ) -> None:
        try:
            answers = await self._send(account, [op for op, _ in batch])
            if len(answers) != len(batch):
                raise DependencyUnavailable(
                    f"budget ledger for account {account!r} answered {len(answers)} of "
                    f"{len(batch)} operations"
                )
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
        except Exception as err:  # each waiting activity fails with an error of its own
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(err))
        finally:
            self._in_flight[account] -= 1
            if not self._in_flight[account]:
                del self._in_flight[account]
            self._dispatch(account)


def _copy(err: Exception) -> Exception:
    if isinstance(err, SpineError):
        return err.copy()
    return DependencyUnavailable(f"budget ledger did not answer: {type(err).__name__}: {err}")
