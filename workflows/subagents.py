"""Sub-agents, workflow side: another agent called as a tool runs as a child workflow.

A sub-agent tool (declared with :func:`spine.activities.tools.sub_agent`) passes the parent's
allowlist, schema check and approval rules like any tool; then :meth:`SubAgents.run`

1. refuses the call (the model is told) when sub-agents would nest deeper than the policy's
   ``max_sub_agent_depth``, or when the parent has no budget left to give;
2. carves the child's budget from what the parent has left (its run limit, less what it spent
   and what running sub-agents hold), at most the tool's ``max_usd``: the child's
   ``limits.max_usd``, which can only tighten the child's own policy;
3. starts the child, an ``AgentWorkflow`` of the sub-agent, with the workflow id
   ``<call's idempotency key>/<agent>`` (a replayed or retried call finds the same child), on
   the parent's task queue, acting for the parent's user, role and account
   (:func:`inherited_identity`), under its own agent's policy slice, its input naming its
   parent (:class:`~spine.payloads.ParentRun`, which the child checks against Temporal's record
   of its parent: :func:`verify_parent`);
4. waits for it: the child's history is its own (the parent's holds three events for it), its
   audit chain and its trace are linked to the parent's (``sub_agent`` entries on both sides;
   the trace context travels in the start's headers), and the Web UI shows it as a child;
5. takes its outcome: its spend becomes the parent's; a completed child's standing effects
   become the parent's to undo (the parent's saga runs their compensations if the parent is
   compensated later); a rejected child ends the parent rejected (undoing the parent's earlier
   effects); a child ended any other way is reported to the model; with ``handoff`` the child's
   answer is the parent's final answer.

Cancelling the parent asks the child to cancel and waits while it undoes its own effects
(``WAIT_CANCELLATION_COMPLETED``); a parent that closes otherwise cancels its children
(``ParentClosePolicy.REQUEST_CANCEL``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError, WorkflowAlreadyStartedError
from temporalio.workflow import ChildWorkflowCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from temporalio.common import SearchAttributePair, TypedSearchAttributes

    from spine.activities.errors import failure_text
    from spine.contract import (
        SA_ACCOUNT,
        SA_AGENT,
        SA_STATUS,
        WORKFLOW_TYPE,
        AgentRequest,
        AgentResult,
        Limits,
        ModelChoice,
        sub_agent_workflow_id,
    )
    from spine.guardrails.budget import BudgetGate
    from spine.guardrails.hooks import Record
    from spine.payloads import (
        AgentAnswer,
        ParentRun,
        PrincipalView,
        ToolCall,
        ToolCallResult,
        ToolDescriptor,
    )
    from spine.workflows.state import (
        AgentWorkflowInput,
        RunState,
        StopRun,
        apply_carve,
        apply_sub_agent,
        apply_tool_result,
    )

#: How long a sub-agent run may take, all of it (its approvals and parking included).
CHILD_EXECUTION_TIMEOUT = timedelta(days=30)


def inherited_identity(parent: AgentRequest) -> dict[str, str]:
    """Who a sub-agent acts for: the parent's user and role, billed to the parent's account
    (all three verified against the parent's principal when the parent was admitted; the
    child is admitted as its parent's child, see :func:`verify_parent`).

    The one place a child's identity comes from.
    """
    return {"user": parent.user, "role": parent.role, "account": parent.account}


def child_model(choice: ModelChoice | None, agent: str) -> ModelChoice | None:
    """The sub-agent's model: the parent request's choice for it, else the parent's provider
    with the sub-agent's default model for it (None: the sub-agent's own default)."""
    if choice is None:
        return None
    chosen = choice.sub_agents.get(agent)
    if chosen is not None:
        return chosen
    return ModelChoice(provider=choice.provider)


def verify_parent(request: AgentWorkflowInput, record: Record) -> PrincipalView | None:
    """Admit a sub-agent run: it must really be the child of the run its input names (Temporal
    records who started a child; a client cannot start one), and it acts for the principal its
    parent verified. Audits the link. None for a run that is not a sub-agent.

    Raises:
        StopRun: the input names a parent Temporal does not know this run by, or asks for
            something its parent could not have asked for.
    """
    link = request.parent
    if link is None:
        return None
    parent = workflow.info().parent
    problem = None
    if parent is None or parent.workflow_id != link.workflow_id:
        problem = (
            f"the input names parent run {link.workflow_id!r}, but this run was not started by it"
        )
    elif request.fork_from is not None:
        problem = "a sub-agent run cannot be a fork"
    elif request.user != link.principal:
        problem = f"user {request.user!r} is not its parent's principal {link.principal!r}"
    if problem:
        raise StopRun("failed", f"refused: {problem}", compensate=False)
    record(
        "sub_agent",
        "spine",
        decision="started_by",
        agent=link.agent,
        workflow_id=link.workflow_id,
        parent_audit_run_id=link.audit_run_id,
        parent_step=link.step,
        parent_call_id=link.call_id,
        tool=link.tool,
        depth=link.depth,
    )
    # The parent verified its starter, role and account; the child inherits exactly those.
    return PrincipalView(name=link.principal, roles=[request.role], accounts=[request.account])


class SubAgents:
    """The run's sub-agent calls."""

    def __init__(
        self,
        state: RunState,
        request: AgentWorkflowInput,
        *,
        budget: BudgetGate,
        record: Record,
        audit_run_id: str,
        slots: asyncio.Semaphore,
    ) -> None:
        self.state = state
        self.request = request
        self.budget = budget
        self._record = record
        self._audit_run_id = audit_run_id
        self._slots = slots
        self.active: dict[str, str] = {}
        """Sub-agent runs in progress: workflow id -> agent."""

    def carve(self, tool: ToolDescriptor) -> float | None:
        """The budget one call of `tool` may give its child (None: the child's policy only).

        Raises:
            ApplicationError: nothing is left to give (the model is told).
        """
        limit = self.budget.max_usd
        left = None
        if limit is not None:
            left = round(limit - self.state.usage.usd - self.state.carved_usd, 8)
        bounds = [b for b in (left, tool.sub_agent_max_usd) if b is not None]
        carve = min(bounds) if bounds else None
        if carve is not None and carve <= 0:
            raise ApplicationError(
                f"no budget left for sub-agent {tool.sub_agent!r}: the run has spent "
                f"{self.state.usage.usd:.4f} of {limit or 0:.4f} USD and sub-agents hold "
                f"{self.state.carved_usd:.4f}",
                type="BudgetExhausted",
            )
        return carve

    async def run(
        self, tool: ToolDescriptor, args: dict[str, object], call_id: str, key: str
    ) -> tuple[ToolCallResult, ToolDescriptor, str]:
        """Run the sub-agent `tool` names as a child workflow and return its answer.

        Raises:
            ApplicationError: the call is refused (nesting, budget); the model is told.
            StopRun: the child was rejected or cancelled, or ended without a result; or, for a
                hand-off, the child answered (the parent completes with its answer).
        """
        agent = tool.sub_agent or ""
        depth = (self.request.parent.depth if self.request.parent else 0) + 1
        limit = self.state.agent.max_sub_agent_depth
        if depth > limit:
            raise ApplicationError(
                f"sub-agent {agent!r} refused: sub-agents may nest {limit} deep and this call "
                f"would be level {depth}",
                type="PolicyDenied",
            )
        carve = self.carve(tool)
        task = str(args.get("task", ""))
        child_id = sub_agent_workflow_id(key, agent)
        child = AgentWorkflowInput(
            agent=agent,
            goal=task,
            model=child_model(self.request.model, agent),
            limits=Limits(max_usd=carve) if carve is not None else None,
            parent=ParentRun(
                workflow_id=workflow.info().workflow_id,
                agent=self.request.agent,
                tool=tool.name,
                step=self.state.step,
                call_id=call_id,
                audit_run_id=self._audit_run_id,
                depth=depth,
                principal=self.state.principal,
            ),
            **inherited_identity(self.request),
        )
        apply_carve(self.state, carve or 0.0)
        try:
            async with self._slots:
                result = await self._run_child(child_id, child, tool, carve)
        except BaseException:
            apply_carve(self.state, -(carve or 0.0))  # the run ends, or the call was refused
            raise
        taken = apply_sub_agent(self.state, child_id, result, carved_usd=carve or 0.0)
        self._record(
            "sub_agent",
            "spine",
            decision="finished",
            agent=agent,
            workflow_id=child_id,
            status=result.status,
            reason=result.reason,
            steps=result.steps,
            usd=round(result.usage.usd, 8),
            effects_taken=len(taken),
        )
        if result.status == "rejected":
            raise StopRun(
                "rejected", f"sub-agent {agent} ({child_id}) was rejected: {result.reason}"
            )
        if result.status != "completed" and (result.reason or "").startswith("cancelled:"):
            raise StopRun("failed", f"cancelled: sub-agent {agent} ({child_id}) was cancelled")
        answer = AgentAnswer(
            agent=agent,
            workflow_id=child_id,
            status=result.status,
            output=result.output,
            reason=result.reason,
            steps=result.steps,
            usd=round(result.usage.usd, 8),
        )
        output = ToolCallResult(output=answer.model_dump(mode="json"))
        if tool.handoff and result.status == "completed":
            call = ToolCall(id=call_id, name=tool.name, args=args)
            apply_tool_result(self.state, call, tool, args, output.output, key)
            raise StopRun("completed", f"handed off to {agent}", output=result.output or "")
        return output, tool, key

    async def _run_child(
        self, child_id: str, child: AgentWorkflowInput, tool: ToolDescriptor, carve: float | None
    ) -> AgentResult:
        spec = self.state.agent
        attributes = None
        if spec.search_attributes:
            attributes = TypedSearchAttributes(
                [
                    SearchAttributePair(SA_AGENT, child.agent),
                    SearchAttributePair(SA_ACCOUNT, child.account),
                    SearchAttributePair(SA_STATUS, "running"),
                ]
            )
        try:
            handle = await workflow.start_child_workflow(
                WORKFLOW_TYPE,
                child,
                id=child_id,
                task_queue=workflow.info().task_queue,
                result_type=AgentResult,
                cancellation_type=ChildWorkflowCancellationType.WAIT_CANCELLATION_COMPLETED,
                parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
                execution_timeout=CHILD_EXECUTION_TIMEOUT,
                static_summary=f"{child.agent} for {self.request.agent}: {child.goal[:80]}",
                search_attributes=attributes,
            )
        except WorkflowAlreadyStartedError as err:
            raise ApplicationError(
                f"sub-agent run {child_id!r} already exists", type="PolicyDenied"
            ) from err
        self.active[child_id] = child.agent
        self._record(
            "sub_agent",
            "spine",
            decision="started",
            agent=child.agent,
            tool=tool.name,
            workflow_id=child_id,
            child_audit_run_id=f"{child_id}:{handle.first_execution_run_id}",
            carve_usd=carve,
        )
        try:
            return await handle
        except ChildWorkflowError as err:
            kind, message = failure_text(err)
            raise StopRun(
                "failed",
                f"sub-agent {child.agent} ({child_id}) ended without a result ({kind}: "
                f"{message}); what it did may stand",
            ) from err
        finally:
            self.active.pop(child_id, None)
