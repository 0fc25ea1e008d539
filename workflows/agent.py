"""`AgentWorkflow`: the durable agent loop.

``run`` holds the platform's concerns: resolve the agent, finish the run whatever happens
(settle the budget, undo side effects, record the outcome). ``loop`` is the agent: a model turn,
then each tool call it proposes, until a final answer or the step limit. The control plane sits
around the loop as guards (:mod:`spine.guardrails`): the allowlist and schema checks, approvals,
budgets, parking and the saga; the policy interceptor enforces the allowlist and the budget again
on every activity start. Everything a run knows is one :class:`~spine.workflows.state.RunState`,
carried across continue-as-new, so per-step history stays flat however long a run gets.

Recovery: Temporal retries transient failures (bounded per call and per run); a call that keeps
failing tries its alternate path (fallback model or tool); if that fails too the run parks for an
operator (`retry`, `skip`, `compensate`, `abort`); terminal failures, rejections, aborts and
cancellation undo completed side effects in reverse order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

from temporalio import workflow
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from spine.contract import (
        QUERY_STATE,
        SIGNAL_APPROVAL,
        SIGNAL_OPERATOR,
        UPDATE_DECIDE,
        UPDATE_OPERATE,
        WORKFLOW_TYPE,
        AgentResult,
        ApprovalDecision,
        AuditAnchor,
        DecisionAck,
        OperatorCommand,
        StateView,
    )
    from spine.guardrails.allowlist import Allowlist
    from spine.guardrails.approvals import ApprovalDesk
    from spine.guardrails.budget import BudgetGate
    from spine.guardrails.hooks import RunHooks
    from spine.guardrails.identity import CURRENT, VERIFIED
    from spine.guardrails.interceptor import RunGuards, decoded, refusal
    from spine.guardrails.parking import Parking, Skipped
    from spine.guardrails.saga import Saga
    from spine.observability import live
    from spine.observability.trail import AuditTrail
    from spine.payloads import LedgerAnswer, LedgerOp, PrincipalView, ToolCall, digest
    from spine.workflows.state import (
        AgentWorkflowInput,
        RunState,
        StopRun,
        apply_skip,
        apply_tool_result,
        begin,
        cumulative_amounts,
        unfinished_problem,
    )

from spine.workflows import admission, calls
from spine.workflows.parallel import run_turn
from spine.workflows.subagents import SubAgents, verify_parent
from spine.workflows.toolcalls import ToolCalls
from spine.workflows.turns import ModelTurns
from spine.workflows.visibility import Visibility


def _upgrade(info: workflow.Info) -> workflow.ContinueAsNewVersioningBehavior | None:
    """The next run of a versioned chain starts on the deployment's current build (the carry is
    plain data, so no replay crosses builds); unversioned runs continue as before."""
    if info.get_current_deployment_version() is None:
        return None
    return workflow.ContinueAsNewVersioningBehavior.AUTO_UPGRADE


async def _wait(condition: Callable[[], bool], timeout: timedelta | None) -> None:
    await workflow.wait_condition(condition, timeout=timeout)


def _run_key() -> str:
    """What this run's idempotency keys and reservations start with: the workflow id and the
    chain's first run id, so a reused workflow id never reuses a key of an earlier run."""
    info = workflow.info()
    return f"{info.workflow_id}/{info.first_execution_run_id}"


def _verified() -> PrincipalView | None:
    """The principal the identity interceptor verified for the update being validated."""
    principal = VERIFIED.get()
    return PrincipalView.of(principal) if principal is not None else None


@workflow.defn(name=WORKFLOW_TYPE)
class AgentWorkflow:
    """Under worker versioning (`SpineConfig.deployment`) runs are pinned: a run stays on the
    build it started on (its history is never replayed on changed code) and moves to the
    deployment's current build at its next continue-as-new, which it takes at its next step once
    a new build is current. The behaviour is the versioned worker's default, not an annotation
    here: the server refuses an annotated workflow on an unversioned worker."""

    @workflow.init
    def __init__(self, raw: RawValue) -> None:
        info = workflow.info()
        # The input is decoded here, not by the SDK, so a bad one fails the run in one line
        # instead of failing workflow tasks forever.
        self.request, self.input_problem = admission.decode(raw, AgentWorkflowInput)
        request = self.request
        self.state = (request.carry if request else None) or RunState()
        agent, account = (request.agent, request.account) if request else ("?", "?")
        self.view = Visibility(
            self.state,
            agent=agent,
            account=account,
            now=workflow.now,
            upsert=workflow.upsert_search_attributes,
        )
        self.trail = AuditTrail(
            self.state,
            run_id=f"{info.workflow_id}:{info.first_execution_run_id}",
            workflow_run_id=info.run_id,
            agent=agent,
            account=account,
            now=workflow.now,
        )
        self.trail.observers.append(live.publish_entry)  # the run's live stream
        hooks = RunHooks(
            record=self.trail.record,
            flush=self.flush_audit,
            wait=_wait,
            set_status=self.view.set,
            new_id=lambda: workflow.uuid4().hex[:8],
            warn=workflow.logger.warning,
            now=workflow.now,
        )
        self.approvals = ApprovalDesk(self.state, hooks, agent=agent)
        # Parking on an audit failure must not park again: it writes the trail best effort.
        self.parking = Parking(self.state, dataclasses.replace(hooks, flush=self.flush_best_effort))
        self.saga = Saga(self.state, self.trail.record)
        self.guards = RunGuards(approvals=self.approvals)
        # Armed by `resolve` once the agent and its policy slice are pinned.
        self.budget: BudgetGate | None = None
        self.lean = False  # set by `resolve` (see calls.PATCH_LEAN)
        self.tools: ToolCalls | None = None
        self.turns: ModelTurns | None = None

    # ---------------------------------------------------------------- queries, signals, updates

    @workflow.query(name=QUERY_STATE)
    def state_view(self) -> StateView:
        return StateView(
            status=self.view.status,
            step=self.state.step,
            pending_approvals=self.approvals.pending(),
            usage=self.state.usage,
            reason=self.view.reason,
            agent=self.request.agent if self.request else "",
            last_tool=self.tools.last_tool if self.tools else None,
            retries=self.state.retries,
            path=self.state.path,
            refused=self.approvals.refused + self.parking.refused,
            sub_agents=sorted(self.tools.sub_agents.active)
            if self.tools and self.tools.sub_agents
            else [],
            failed_calls=self.state.failed_calls,
        )

    @workflow.signal(name=SIGNAL_APPROVAL)
    async def approval_signal(self, raw: RawValue) -> None:
        """Checked like `decide`, but through an activity (signals have no validator); a
        refusal is stored in the audit log before the handler returns."""
        claim = CURRENT.get()
        decision, problem = admission.decode(raw, ApprovalDecision)
        principal = None
        if decision is not None:
            principal, problem = await admission.verified(claim, "decide", decision)
            problem = problem or self.approvals.problem(decision, principal)
        if problem or decision is None:
            who = principal.name if principal else None
            self.approvals.refuse(decision, problem or "refused", who)
        else:
            self.approvals.accept(decision)
        await self.flush_best_effort()

    # Updates take their payload raw (`decoded`): one that is not a decision or command is a
    # `DecisionRefused` naming the field, not a retryable decoding error from the SDK.
    @workflow.update(name=UPDATE_DECIDE)
    def decide(self, raw: RawValue) -> DecisionAck:
        decision = decoded(raw, ApprovalDecision)
        self.approvals.accept(decision)
        return self.approvals.ack(decision)

    @decide.validator
    def _validate_decide(self, raw: RawValue) -> None:
        decision = decoded(raw, ApprovalDecision)
        problem = self.approvals.problem(decision, _verified())
        if problem:
            raise refusal(problem)

    @workflow.signal(name=SIGNAL_OPERATOR)
    async def operator_signal(self, raw: RawValue) -> None:
        claim = CURRENT.get()
        command, problem = admission.decode(raw, OperatorCommand)
        principal = None
        if command is not None:
            principal, problem = await admission.verified(claim, "operate", command)
            problem = problem or self.parking.problem(command, self.view.status, principal)
        if problem or command is None:
            self.parking.refuse(
                command, problem or "refused", principal.name if principal else None
            )
        else:
            self.parking.accept(command)
        await self.flush_best_effort()

    @workflow.update(name=UPDATE_OPERATE)
    def operate(self, raw: RawValue) -> StateView:
        command = decoded(raw, OperatorCommand)
        self.parking.accept(command)
        return self.state_view()

    @operate.validator
    def _validate_operate(self, raw: RawValue) -> None:
        command = decoded(raw, OperatorCommand)
        problem = self.parking.problem(command, self.view.status, _verified())
        if problem:
            raise refusal(problem)

    # ---------------------------------------------------------------------------------- run

    @workflow.run
    async def run(self, raw: RawValue) -> AgentResult:
        if self.request is None:
            raise ApplicationError(
                f"the run's input was refused: {self.input_problem}",
                type="InvalidRequest",
                non_retryable=True,
            )
        try:
            await self.resolve()
            await self.loop()
        except StopRun as stop:
            result = await self.finish(stop)
        except asyncio.CancelledError:
            # Cancelled from the Temporal CLI/UI: undo what was done, then report it.
            result = await self.finish(
                StopRun("failed", "cancelled: a cancel request was received for this run")
            )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return result

    async def resolve(self) -> None:
        """Admit the run (who started it, or that its carry is its own), pin the agent and its
        policy slice once per chain, and arm the guards."""
        request = self.request
        assert request is not None
        # Asked first, before any local activity of the task (see PATCH_LEAN).
        self.lean = workflow.patched(calls.PATCH_LEAN)
        if self.lean:
            self.view.seed(workflow.info().typed_search_attributes)
        if request.carry is not None:
            try:
                await admission.admit_carry()
            except StopRun:
                self._forget(RunState())  # a forged carry grants nothing, not even undoing
                raise
        else:
            try:
                # A sub-agent is admitted as its parent's child (no claim of its own).
                principal = verify_parent(request, self.trail.record) or await admission.admit(
                    request, self.guards.start_claim, self.guards.start_claim_problem
                )
            except StopRun as stop:
                self.trail.record(
                    "policy_decision", "spine", decision="refused", reason=stop.reason
                )
                raise
            if request.fork_from is not None:
                self._forget(await calls.fork_state(request, principal))
            else:
                self.state.spec = await calls.resolve_agent(request, locally=self.lean)
            self.state.principal = principal.name
            spec = self.state.agent
            choice = request.model
            self.trail.record(
                "run_started",
                principal.name,
                agent=request.agent,
                user=request.user,
                role=request.role,
                account=request.account,
                provider=choice.provider if choice else spec.default_provider,
                model=(choice.name if choice else None) or spec.default_model,
                goal_digest=digest(request.goal),
                forked_from=request.fork_from.model_dump() if request.fork_from else None,
            )
        self.view.publish()
        allowlist = Allowlist(self.state.agent, request.role)
        self.budget = BudgetGate(
            self.state, request.limits, record=self.trail.record, run_id=_run_key()
        )
        self.guards.allowlist, self.guards.budget = allowlist, self.budget
        self.tools = ToolCalls(
            self.state,
            allowlist,
            self.parking,
            record=self.trail.record,
            agent=request.agent,
            account=request.account,
            user=request.user,
        )
        self.tools.sub_agents = SubAgents(
            self.state,
            request,
            budget=self.budget,
            record=self.trail.record,
            audit_run_id=self.trail.run_id,
            slots=self.tools.slots,
        )
        self.turns = ModelTurns(
            self.state,
            request.model,
            budget=self.budget,
            parking=self.parking,
            trail=self.trail,
            flush_audit=self.flush_audit,
            transcript_id=_run_key(),
        )

    def _forget(self, state: RunState) -> None:
        """Take `state` as the run's (the guards hold the same object, so it is copied in)."""
        for name in RunState.model_fields:
            setattr(self.state, name, getattr(state, name))

    async def loop(self) -> NoReturn:
        """The agent: ask the model, run the tools it asks for, until it answers."""
        budget, turns, allowlist = self.budget, self.turns, self.guards.allowlist
        assert budget is not None and turns is not None and allowlist is not None
        models = turns.path()
        begin(self.state, self.request.goal)
        offered = allowlist.offered()
        while True:
            if self.state.step >= budget.max_steps:
                raise StopRun(
                    "failed", f"max_steps: used all {budget.max_steps} steps without a final answer"
                )
            await self.continue_as_new_if_due()
            self.state.step += 1
            models = await budget.before_call(models, ask=self.ask_to_continue, ledger=self.ledger)
            answer = await turns.take(models, offered)
            if not answer.message.tool_calls:
                if not self.lean:  # `finish` publishes the outcome with the last step and cost
                    self.view.publish()
                output = answer.message.content or ""
                unfinished = unfinished_problem(self.state)
                if unfinished:  # the model's answer may claim what did not happen
                    raise StopRun("failed", unfinished, output=output, keep_status=True)
                raise StopRun("completed", "final answer", output=output)
            await run_turn(
                self.state,
                answer.message.tool_calls,
                lambda call, index, conf=answer.confidence: self.tool_call(call, index, conf),
            )
            # The step's audit entries ride with the next model call (no extra round trip).
            self.view.publish(progress=True)

    async def tool_call(self, call: ToolCall, index: int, confidence: float | None) -> None:
        """One proposed call: check it, wait for approval if a rule says so, run it."""
        tools = self.tools
        assert tools is not None
        tool, problem = tools.check(call)
        if tool is None:
            return tools.refuse(call, problem)
        args = call.args or {}
        today = cumulative_amounts(self.state, tool.name, args, scope="account_day")
        day_totals = await self.account_totals([k for k, _ in today]) if today else {}
        needs = self.approvals.rule_for(tool, args, confidence, day_totals=day_totals)
        if needs is not None:
            reason, rule = needs
            await self.approvals.request(
                tool.name, args, reason, rule.approver_roles, rule, confidence=confidence
            )
        key = f"{_run_key()}/{self.state.step}/{index}"
        try:
            result, used, used_key = await tools.run(tool, args, call.id, key)
        except Skipped as skipped:
            apply_skip(self.state, call, skipped.command.by, skipped.command.reason)
            return None
        except ApplicationError as err:  # a failure the model can correct: it is told
            return tools.refuse(call, f"error: {err.type}: {err.message}", outcome="failed")
        apply_tool_result(
            self.state, call, used, args, result.output, used_key, result.untrusted_filter
        )
        if today:
            await self.account_totals([], add=dict(today))
        return None

    # ---------------------------------------------------------------------------- finish

    async def finish(self, stop: StopRun) -> AgentResult:
        """Settle the budget, undo side effects unless the run completed, record the outcome."""
        status, reason = stop.status, stop.reason
        if self.budget is not None:
            await self.budget.settle(self.settle_ledger)
        if status != "completed" and stop.compensate and self.saga.pending() and self.tools:
            leftovers = await self.saga.compensate(self.tools.undo)
            if leftovers:
                reason += f"; could not undo: {', '.join(leftovers)}"
                status = "failed"
            elif status == "failed" and not stop.keep_status:
                status = "compensated"
        self.view.status = status
        self.view.reason = None if status == "completed" else reason
        self.view.publish()
        self.trail.record(
            "run_outcome",
            "spine",
            status=status,
            reason=self.view.reason,
            steps=self.state.step,
            usd=self.state.usage.usd,
            output_digest=digest(stop.output or ""),
        )
        await self.flush_best_effort()
        return AgentResult(
            status=status,
            output=stop.output,
            steps=self.state.step,
            usage=self.state.usage,
            side_effects=self.state.side_effects,
            reason=self.view.reason,
            retries=self.state.retries,
            path=self.state.path,
            audit=AuditAnchor(entries=self.state.audit_stored, head=self.state.audit_head),
            failed_calls=self.state.failed_calls,
        )

    # -------------------------------------------------------------------- platform helpers

    async def continue_as_new_if_due(self) -> None:
        """Hand the state to a fresh run of this workflow id when history gets long."""
        info = workflow.info()
        due = info.is_continue_as_new_suggested() or (
            info.get_current_history_length() >= self.state.agent.continue_as_new_after_events
        )
        # Worker versioning: a new build became current; move to it (see `_upgrade`).
        upgrade = info.is_target_worker_deployment_version_changed()
        if not (due or upgrade):
            return
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self.flush_audit()
        request = self.request.model_copy(deep=True)
        if request.model is not None and request.model.script:
            # Consumed turns stay behind, so the carried input shrinks as the run goes.
            request.model.script = request.model.script[self.state.script_pos :]
        request.carry = self.state.model_copy(update={"script_pos": 0})
        workflow.continue_as_new(request, initial_versioning_behavior=_upgrade(info))

    async def flush_audit(self, *, park: bool = True) -> None:
        """Store the queued audit entries; the run parks while the store is down (`park`)."""
        parks = park and self.state.spec is not None
        await calls.write_audit(self.trail, park=self._park if parks else None)

    async def flush_best_effort(self) -> None:
        await self.flush_audit(park=False)

    async def account_totals(
        self, keys: list[str], *, add: dict[str, float] | None = None
    ) -> dict[str, float]:
        """The account's totals today for cumulative approval rules (the ledger keeps them)."""
        answer = await self.ledger(
            LedgerOp(run_id=_run_key(), exposure_query=keys, exposure_add=add or {})
        )
        return answer.exposure

    async def ask_to_continue(self, args: dict[str, object], reason: str, roles: list[str]) -> None:
        await self.approvals.request("budget", args, reason, roles)

    async def ledger(self, op: LedgerOp) -> LedgerAnswer:
        answer = await calls.apply_ledger(
            self.request.account, op, park=self._park, step=self.state.step
        )
        assert answer is not None  # with `park`, a silent ledger parks the run instead
        return answer

    async def settle_ledger(self, op: LedgerOp) -> LedgerAnswer | None:
        return await calls.apply_ledger(self.request.account, op, park=None, step=self.state.step)

    async def _park(self, why: str) -> None:
        await self.parking.park(why, skippable=False)
