"""Identity activities: the run's questions about who is asking, answered on the worker.

- ``spine.verify_principal``: is this claim a valid signature of its principal over this purpose,
  run and payload, and what does the policy grant that principal? (Starts and signals; update
  validators verify in the workflow, see :mod:`spine.guardrails.interceptor`.) The verdict is in
  history, so replay decides the same.
- ``spine.verify_carry``: was this run's carried state handed over by a continue-as-new of the
  same workflow id? Only Spine itself continues a run as new, so a starter cannot forge a carry.
- ``spine.fork_state``: the state of another run at the end of a step, rebuilt from its history
  by the worker and checked against today's policy (``spine replay``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from temporalio import activity
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client
from temporalio.service import RPCError

from spine.activities.errors import DependencyUnavailable, SpineError, TerminalError
from spine.activities.tools import Registry
from spine.contract import (
    ACTIVITY_FORK_STATE,
    ACTIVITY_VERIFY_CARRY,
    ACTIVITY_VERIFY_PRINCIPAL,
    WORKFLOW_TYPE,
)
from spine.guardrails.identity import IdentityError, Keyring
from spine.guardrails.policy import Policy
from spine.payloads import ForkStateInput, PrincipalView, Verdict, VerifyCarryInput, VerifyInput
from spine.workflows.state import RunState

if TYPE_CHECKING:
    from spine.activities.blobs import BlobStore


class IdentityRefused(TerminalError):
    """A claim, a carry or a fork was refused; the message says why."""


class ForkRefusedError(TerminalError):
    """The fork cannot be made as asked; the message names the cause and the fix."""


class IdentityActivities:
    """Activities that answer identity questions; built on the worker with its keyring."""

    def __init__(
        self,
        keyring: Keyring,
        client: Client,
        policy: Policy,
        registry: Registry,
        refresh: Callable[[], None] | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.keyring = keyring
        self.client = client
        self.policy = policy
        self._refresh = refresh
        self.registry = registry
        self.blobs = blobs

    @activity.defn(name=ACTIVITY_VERIFY_PRINCIPAL)
    async def verify_principal(self, request: VerifyInput) -> Verdict:
        """Verify a claim; a problem with it is an answer, not an error."""
        if request.claim is None:
            return Verdict(
                problem=f"unauthenticated: no {'spine_principal'!r} header (start and decide "
                "with `spine`, or see `spine sign --help` for the Temporal CLI)"
            )
        if self.keyring.loaded_at is None and self._refresh is not None:
            await asyncio.to_thread(self._refresh)
        if self.keyring.loaded_at is None:
            # Fail closed, but retry: the keys are in OpenBao, which may be coming back.
            raise DependencyUnavailable(
                f"principal keys are not loaded from OpenBao: {self.keyring.error}"
            ).to_application_error()
        if not self.keyring.known(request.claim.principal) and self._refresh is not None:
            await asyncio.to_thread(self._refresh)  # a principal made since the last load
        try:
            principal = self.keyring.verify(
                request.claim,
                purpose=request.purpose,
                workflow_id=request.workflow_id,
                payload_digest=request.payload_digest,
                now=request.at,
            )
        except IdentityError as err:
            return Verdict(problem=str(err))
        return Verdict(principal=PrincipalView.of(principal))

    @activity.defn(name=ACTIVITY_VERIFY_CARRY)
    async def verify_carry(self, request: VerifyCarryInput) -> Verdict:
        """The carry is Spine's own when the run before this one continued as new into it."""
        if not request.continued_run_id:
            return Verdict(
                problem="carried state is accepted only from a continue-as-new of the run "
                "itself; this run was started with one"
            )
        try:
            page = await self.client.workflow_service.get_workflow_execution_history_reverse(
                GetWorkflowExecutionHistoryReverseRequest(
                    namespace=self.client.namespace,
                    execution=WorkflowExecution(
                        workflow_id=request.workflow_id, run_id=request.continued_run_id
                    ),
                    maximum_page_size=1,
                )
            )
        except RPCError as err:
            raise DependencyUnavailable(
                f"cannot read the run before {request.run_id}: {err.message}"
            ).to_application_error() from None
        last = page.history.events[0] if page.history.events else None
        continued = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        if last is None or last.event_type != continued:
            return Verdict(
                problem="carried state is accepted only from a continue-as-new; the run before "
                "this one did not continue as new (a retry or cron run with a carry)"
            )
        handed = last.workflow_execution_continued_as_new_event_attributes
        if (
            handed.new_execution_run_id != request.run_id
            or handed.workflow_type.name != WORKFLOW_TYPE
        ):
            return Verdict(problem="carried state was handed to another run")
        return Verdict()

    @activity.defn(name=ACTIVITY_FORK_STATE)
    async def fork_state(self, request: ForkStateInput) -> RunState:
        """The original's state at the end of the step, for the forking principal."""
        from spine.client.forks import worker_checkpoint  # lazily: it decodes histories

        try:
            state = await worker_checkpoint(
                self.client,
                request.fork_from,
                request.request,
                request.principal,
                self.policy,
                self.registry,
            )
            await self._share_outputs(state, request.fork_from.workflow_id)
        except SpineError as err:
            raise err.to_application_error() from None
        except (ValueError, RuntimeError) as err:
            raise ForkRefusedError(str(err)).to_application_error() from None
        return state

    async def _share_outputs(self, state: RunState, source: str) -> None:
        """Give the fork read access to the large outputs its checkpoint refers to (the
        original's, by reference). Done here, after the fork was allowed: a client never grants
        a run access to another run's outputs."""
        from spine.client.forks import referenced_outputs

        digests = referenced_outputs(state)
        if not digests:
            return
        target = activity.info().workflow_id
        if self.blobs is None:
            raise ForkRefusedError(
                f"run {source!r} holds large tool outputs by reference and this worker has no "
                "shared store to give them to the fork"
            )
        await self.blobs.share(source, target, digests)
        missing = set(digests) - set(await self.blobs.resolve(target, digests))
        if missing:
            raise ForkRefusedError(
                f"run {source!r} refers to {len(missing)} stored output(s) not found in the "
                f"workers' shared store (e.g. {sorted(missing)[0]})"
            )
