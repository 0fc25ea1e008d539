"""`AgentWorkflow`: the durable agent loop.

model turn -> validated tool calls (each its own activity) -> results back to the model, until a
final answer, the step limit, or a terminal error. Only new messages travel through history; the
transcript lives in the transcript store (see `activities/transcript.py`), and the run continues
as new when its history gets long, so per-step history bytes stay flat.

Recovery is structured: Temporal retries transient failures (bounded per call and per run); a
call that keeps failing tries its alternate path (fallback model or tool); if that fails too the
run parks and waits for an operator (`retry`, `skip`, `compensate`, `abort`); terminal failures,
rejections, aborts and cancellation undo completed side effects in reverse order (saga).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

with workflow.unsafe.imports_passed_through():
    import jsonschema
    from spine.activities.errors import (
        NON_RETRYABLE_TYPES,
        AuditWriteFailed,
        ContentRefused,
        ContextOverflow,
        ModelRequestRejected,
        PolicyDenied,
        ToolFailed,
        ToolInputInvalid,
        ToolOutputInvalid,
        TranscriptUnavailable,
        UnknownTool,
    )
    from spine.guardrails.approvals import approval_rule, tainted_args
    from spine.observability.metrics import record_approval_requested, record_policy_refusal
    from spine.workflows.state import AgentWorkflowInput, BudgetCarry, Carry, model_path

    from spine.contract import (
        SA_ACCOUNT,
        SA_AGENT,
        SA_COST,
        SA_STATUS,
        SA_STEPS,
        WORKFLOW_TYPE,
        AgentResult,
        ApprovalDecision,
        DecisionAck,
        OperatorCommand,
        PendingApproval,
        RunStatus,
        SideEffect,
        StateView,
        Usage,
        rate_limited_queue,
    )
    from spine.payloads import (
        EMPTY_DIGEST,
        AgentSpec,
        ApprovalRule,
        AuditBatch,
        AuditEntry,
        AuditKind,
        BudgetCall,
        ChatMessage,
        CompensationInput,
        LedgerAnswer,
        LedgerOp,
        ModelCallInput,
        ModelCallResult,
        ResolveAgentInput,
        ToolCall,
        ToolCallInput,
        ToolCallResult,
        ToolDescriptor,
        ToolRef,
        chain_digest,
        digest,
    )

#: Step and cost search attributes are refreshed at most this often (status: at once).
SA_PROGRESS_EVERY = timedelta(seconds=2)

MODEL_TIMEOUT = timedelta(seconds=120)
#: Model calls one account-ledger reservation covers (one ledger round trip per block).
BUDGET_BLOCK_CALLS = 4
#: The model activity heartbeats every 2 s: a worker that died is noticed after this long.
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)
#: Tools heartbeat every second; one whose timeout is longer than this gets this heartbeat
#: timeout, so a call in flight on a dead worker is retried after seconds, not its timeout.
TOOL_HEARTBEAT_TIMEOUT = timedelta(seconds=5)
#: How much untrusted tool output (characters) a run remembers for taint checks.
UNTRUSTED_KEEP = 16_000

#: The model made a mistake it can correct: it is told, the run goes on.
MODEL_CORRECTABLE = {ToolInputInvalid.__name__, ToolFailed.__name__, PolicyDenied.__name__}
#: Retrying or waiting will not help: the run ends (and compensates).
TERMINAL = {
    cls.__name__
    for cls in (
        ModelRequestRejected,
        ContextOverflow,
        ContentRefused,
        ToolOutputInvalid,
        UnknownTool,
        TranscriptUnavailable,
    )
}
# Everything else that is left after retries and alternate paths (a dependency that stays down,
# a secret that is missing, an unexpected exception) parks the run for an operator.


class _Stop(Exception):
    """Unwinds the loop to finish the run with a status and a reason."""

    def __init__(
        self,
        status: RunStatus,
        reason: str,
        output: str | None = None,
        *,
        keep_status: bool = False,
        compensate: bool = True,
    ) -> None:
        super().__init__(reason)
        self.status: RunStatus = status
        self.reason = reason
        self.output = output
        self.keep_status = keep_status
        self.compensate = compensate


class _Skipped(Exception):
    """An operator skipped a parked tool call."""

    def __init__(self, command: OperatorCommand) -> None:
        super().__init__(command.reason)
        self.command = command


def _error_text(err: BaseException) -> tuple[str, str]:
    """(type, message) of the innermost failure behind an activity error."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    return type(cause).__name__, str(cause)


def _granted(spec: AgentSpec, tool: ToolDescriptor) -> bool:
    """The policy grants `tool` by name (any version) or as ``name@version``."""
    return tool.name in spec.allowed_tools or f"{tool.name}@{tool.version}" in spec.allowed_tools


def _attempts_used(err: BaseException, limit: int) -> int:
    # A local activity that gives up surfaces as its own ApplicationError, without retry state.
    exhausted = getattr(err, "retry_state", None) == RetryState.MAXIMUM_ATTEMPTS_REACHED
    return limit if exhausted or isinstance(err, ApplicationError) else 1


@workflow.defn(name=WORKFLOW_TYPE)
class AgentWorkflow:
    @workflow.init
    def __init__(self, request: AgentWorkflowInput) -> None:
        carry = request.carry
        self._request = request
        self._status: RunStatus = "running"
        self._reason: str | None = None
        self._spec: AgentSpec | None = carry.spec if carry else None
        self._step = carry.step if carry else 0
        self._usage = carry.usage.model_copy() if carry else Usage()
        self._side_effects: list[SideEffect] = list(carry.side_effects) if carry else []
        self._len = carry.transcript_len if carry else 0
        self._digest = carry.transcript_digest if carry else EMPTY_DIGEST
        self._pending: list[ChatMessage] = list(carry.pending_messages) if carry else []
        self._invalid = carry.invalid_calls if carry else 0
        self._script_pos = carry.script_pos if carry else 0
        self._retries = carry.retries if carry else 0
        self._path: list[str] = list(carry.path) if carry else []
        self._budget = carry.budget.model_copy(deep=True) if carry else BudgetCarry()
        self._audit_seq = carry.audit_seq if carry else 0
        self._untrusted_text = carry.untrusted_text if carry else ""
        self._audit_buffer: list[AuditEntry] = []
        # Everything stored since this run segment began, to resend if the store lost it.
        self._segment_base = (self._len, self._digest)
        self._segment: list[ChatMessage] = []
        self._approvals: dict[str, PendingApproval] = {}
        self._approver_roles: dict[str, list[str]] = {}
        self._decisions: dict[str, ApprovalDecision] = {}
        self._refused: list[str] = []
        self._operator: OperatorCommand | None = None
        self._park_skippable = False
        self._late_result: ToolCallResult | None = None
        self._attempt_cap = 1
        self._requested_model = ""
        self._last_tool: str | None = None
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._sa_sent: dict[str, object] = {}
        self._sa_at: datetime | None = None

    # ---------------------------------------------------------------- queries, signals, updates

    @workflow.query(name="state")
    def state(self) -> StateView:
        return StateView(
            status=self._status,
            step=self._step,
            pending_approvals=[a for k, a in self._approvals.items() if k not in self._decisions],
            usage=self._usage,
            reason=self._reason,
            agent=self._request.agent,
            last_tool=self._last_tool,
            retries=self._retries,
            path=self._path,
        )

    def _decision_problem(self, decision: ApprovalDecision) -> str | None:
        """Why a decision must be refused, or None when it is acceptable."""
        if decision.approval_id not in self._approvals:
            return f"unknown approval {decision.approval_id!r} for this run"
        if decision.approval_id in self._decisions:
            return f"approval {decision.approval_id!r} was already decided"
        roles = self._approver_roles.get(decision.approval_id, [])
        if decision.role not in roles:
            return (
                f"role {decision.role!r} may not decide approval {decision.approval_id!r}; "
                f"allowed: {', '.join(roles)}"
            )
        return None

    @workflow.signal(name="approval")
    def approval_signal(self, decision: ApprovalDecision) -> None:
        problem = self._decision_problem(decision)
        if problem:
            workflow.logger.warning("refused approval signal from %s: %s", decision.by, problem)
            self._refused.append(f"approval by {decision.by} ({decision.role}): {problem}")
            self._audit_decision(decision, accepted=False, problem=problem)
            return
        self._decisions[decision.approval_id] = decision
        self._audit_decision(decision, accepted=True)

    @workflow.update(name="decide")
    def decide(self, decision: ApprovalDecision) -> DecisionAck:
        self._decisions[decision.approval_id] = decision
        self._audit_decision(decision, accepted=True)
        still_pending = any(k not in self._decisions for k in self._approvals)
        status: RunStatus = (
            "rejected"
            if decision.decision == "reject"
            else "awaiting_approval"
            if still_pending
            else "running"
        )
        return DecisionAck(
            approval_id=decision.approval_id, decision=decision.decision, status=status
        )

    @decide.validator
    def _validate_decide(self, decision: ApprovalDecision) -> None:
        problem = self._decision_problem(decision)
        if problem:
            raise ValueError(problem)

    def _operator_problem(self, command: OperatorCommand) -> str | None:
        roles = self._spec.operator_roles if self._spec else []
        if command.role not in roles:
            return f"role {command.role!r} may not operate runs; allowed: {', '.join(roles)}"
        if self._status != "parked":
            return f"the run is {self._status}, not parked"
        if self._operator is not None:
            return "an operator command for this parking is already being handled"
        if command.action == "skip" and not self._park_skippable:
            return "a model turn cannot be skipped; use retry, compensate or abort"
        return None

    @workflow.signal(name="operator")
    def operator_signal(self, command: OperatorCommand) -> None:
        problem = self._operator_problem(command)
        if problem:
            workflow.logger.warning(
                "refused operator %s from %s: %s", command.action, command.by, problem
            )
            self._refused.append(f"operator {command.action} by {command.by}: {problem}")
            self._audit_operator(command, accepted=False, problem=problem)
            return
        self._operator = command
        self._audit_operator(command, accepted=True)

    def tool_denial(self, tool: str) -> str | None:
        """The policy interceptor's question: may this run start `tool` at all?

        Granted tools may run, and so may the compensations and fallbacks of granted tools
        (the saga and the alternate paths run them on the tool's behalf).
        """
        spec = self._spec
        if spec is None:
            return "the run's policy is not resolved yet"
        granted = [t for t in spec.tools if _granted(spec, t)]
        if any(tool in (t.name, t.compensation, t.fallback) for t in granted):
            return None
        return f"tool {tool!r} is not granted to role {self._request.role!r} in agent {spec.name!r}"

    # ---------------------------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: AgentWorkflowInput) -> AgentResult:
        try:
            if self._spec is None:
                self._spec = await self._resolve_agent()
                choice = request.model
                self._audit(
                    "run_started",
                    request.user,
                    agent=request.agent,
                    user=request.user,
                    role=request.role,
                    account=request.account,
                    provider=choice.provider if choice else self._spec.default_provider,
                    model=(choice.name if choice else None) or self._spec.default_model,
                    goal_digest=digest(request.goal),
                )
            self._upsert_search_attributes()
            result = await self._loop(self._spec)
        except _Stop as stop:
            result = await self._finish(stop)
        except asyncio.CancelledError:
            # Cancelled from the Temporal CLI/UI: undo what was done, then report it.
            result = await self._finish(
                _Stop("failed", "cancelled: a cancel request was received for this run")
            )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return result

    async def _resolve_agent(self) -> AgentSpec:
        req = self._request
        try:
            return await workflow.execute_activity(
                "spine.resolve_agent",
                ResolveAgentInput(agent=req.agent, role=req.role, account=req.account),
                result_type=AgentSpec,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(
                    maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE_TYPES
                ),
                summary=f"resolve agent {req.agent}",
            )
        except ActivityError as err:
            kind, message = _error_text(err)
            raise _Stop("failed", f"cannot start agent {req.agent!r}: {kind}: {message}") from err

    def _model_path(self, spec: AgentSpec) -> list[tuple[str, str]]:
        """(provider, model) for the run's model, then each fallback that has a price."""
        path = model_path(self._request.model, spec)
        provider, name = path[0]
        if not name:
            raise _Stop("failed", f"no model name given and no default for provider {provider!r}")
        for _, model in path:
            if model not in spec.prices:
                raise _Stop(
                    "failed",
                    f"model {model!r} has no price in the policy's price table "
                    f"({spec.policy_version}); a model with no price is refused",
                )
        return path

    def _limits(self, spec: AgentSpec) -> tuple[int, float | None]:
        limits = self._request.limits
        max_steps = spec.max_steps
        max_usd = spec.max_usd
        if limits and limits.max_steps is not None:
            max_steps = min(max_steps, limits.max_steps)
        if limits and limits.max_usd is not None:
            max_usd = limits.max_usd if max_usd is None else min(max_usd, limits.max_usd)
        return max_steps, max_usd

    async def _loop(self, spec: AgentSpec) -> AgentResult:
        models = self._model_path(spec)
        max_steps, max_usd = self._limits(spec)
        if self._len == 0 and not self._pending:
            self._pending = [
                ChatMessage(role="system", content=spec.instructions),
                ChatMessage(role="user", content=self._request.goal),
            ]
        offered = [ToolRef(name=t.name, version=t.version) for t in spec.tools if _granted(spec, t)]
        while True:
            if self._step >= max_steps:
                raise _Stop(
                    "failed", f"max_steps: used all {max_steps} steps without a final answer"
                )
            if self._should_continue_as_new(spec):
                await workflow.wait_condition(workflow.all_handlers_finished)
                await self._flush_audit()
                workflow.continue_as_new(self._carry_input(spec))
            self._step += 1
            models = await self._budget_gate(spec, models, max_usd)
            result = await self._model_turn(models, offered, spec)
            self._charge(result, spec, max_usd)
            message = result.message
            if not message.tool_calls:
                self._upsert_search_attributes()
                raise _Stop("completed", "final answer", output=message.content or "")
            for index, call in enumerate(message.tool_calls):
                self._pending.append(await self._tool_call(spec, call, index, result.confidence))
            # The step's audit entries ride with the next model call (no extra round trip);
            # every wait, continue-as-new and the end of the run write them on their own.
            self._upsert_search_attributes(progress=True)

    def _should_continue_as_new(self, spec: AgentSpec) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= spec.continue_as_new_after_events
        )

    def _carry_input(self, spec: AgentSpec) -> AgentWorkflowInput:
        request = self._request.model_copy(deep=True)
        if request.model is not None and request.model.script:
            # Consumed turns stay behind, so the carried input shrinks as the run goes.
            request.model.script = request.model.script[self._script_pos :]
        request.carry = Carry(
            step=self._step,
            usage=self._usage,
            side_effects=self._side_effects,
            transcript_len=self._len,
            transcript_digest=self._digest,
            pending_messages=self._pending,
            invalid_calls=self._invalid,
            script_pos=0,
            retries=self._retries,
            path=self._path,
            budget=self._budget,
            audit_seq=self._audit_seq,
            untrusted_text=self._untrusted_text,
            spec=spec,
        )
        return request

    # ------------------------------------------------------------------- retries and parking

    def _retry_policy(self, spec: AgentSpec, tool: ToolDescriptor | None) -> RetryPolicy:
        """The call's own attempts, capped by what is left of the run's retry budget."""
        left = max(spec.max_retries_per_run - self._retries, 0)
        if tool is None:
            attempts, first, longest = (
                spec.model_max_attempts,
                spec.model_initial_interval_s,
                spec.model_max_interval_s,
            )
        else:
            attempts, first, longest = (
                tool.max_attempts,
                tool.initial_interval_s,
                tool.max_interval_s,
            )
        return RetryPolicy(
            initial_interval=timedelta(seconds=first),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=longest),
            maximum_attempts=self._cap_attempts(min(attempts, left + 1)),
            non_retryable_error_types=NON_RETRYABLE_TYPES,
        )

    def _cap_attempts(self, attempts: int) -> int:
        """Remember the cap of the call being scheduled, to count its retries if it fails."""
        self._attempt_cap = max(1, attempts)
        return self._attempt_cap

    async def _park(self, spec: AgentSpec, why: str, *, skippable: bool) -> OperatorCommand:
        """Wait for an operator; `retry` and `skip` return, the others end the run."""
        workflow.logger.warning("run parked: %s", why)
        self._reason = why
        self._park_skippable = skippable
        self._operator = None
        self._set_status("parked")
        self._audit("policy_decision", "spine", decision="parked", reason=why)
        # Best effort here: parking on an audit failure would recurse; entries stay queued.
        await self._flush_audit(park=False)
        try:
            await workflow.wait_condition(
                lambda: self._operator is not None,
                timeout=timedelta(seconds=spec.parking_timeout_s),
            )
        except TimeoutError:
            raise _Stop(
                "failed",
                f"parked longer than {spec.parking_timeout_s:.0f}s without an operator; {why}",
            ) from None
        command = self._operator
        assert command is not None
        self._operator = None
        self._path.append(
            f"step {self._step}: operator {command.by} ({command.role}) chose {command.action}"
            + (f": {command.reason}" if command.reason else "")
        )
        if command.action == "compensate":
            raise _Stop("failed", f"operator {command.by} asked to compensate; {why}")
        if command.action == "abort":
            raise _Stop("failed", f"aborted by operator {command.by}; {why}", keep_status=True)
        self._reason = None
        self._set_status("running")
        return command

    # ------------------------------------------------------------------------------ model

    async def _model_turn(
        self, models: list[tuple[str, str]], tools: list[ToolRef], spec: AgentSpec
    ) -> ModelCallResult:
        choice = self._request.model
        script_turn = None
        if models[0][0] == "scripted":
            script = choice.script if choice else []
            if self._script_pos >= len(script):
                raise _Stop(
                    "failed",
                    f"scripted model: the script has no turn {self._script_pos + 1} "
                    f"(it has {len(script)})",
                )
            script_turn = script[self._script_pos]
            self._script_pos += 1
        while True:
            failures: list[tuple[str, str]] = []
            for index, (provider, model) in enumerate(models):
                call = ModelCallInput(
                    transcript_id=workflow.info().workflow_id,
                    base_len=self._len,
                    base_digest=self._digest,
                    new_messages=self._pending,
                    provider=provider,  # type: ignore[arg-type]  # validated in the request
                    model=model,
                    tools=tools,
                    step=self._step,
                    max_tokens=spec.max_tokens,
                    script_turn=script_turn,
                    fail_rate=choice.fail_rate if choice else 0.0,
                    fallback_index=index,
                )
                try:
                    result = await self._execute_model(call, spec)
                except ActivityError as err:
                    kind, message = _error_text(err)
                    self._retries += _attempts_used(err, self._attempt_cap) - 1
                    failures.append((kind, f"{model}: {kind}: {message}"))
                    continue
                self._retries += result.attempt - 1
                self._requested_model = model
                if index:
                    self._path.append(
                        f"step {self._step}: model {models[0][1]} failed, used fallback {model}"
                    )
                self._advance_transcript(result)
                return result
            why = f"model call at step {self._step} failed: " + "; ".join(f for _, f in failures)
            if all(kind in TERMINAL for kind, _ in failures):
                raise _Stop("failed", why)
            await self._park(spec, why, skippable=False)

    async def _execute_model(self, call: ModelCallInput, spec: AgentSpec) -> ModelCallResult:
        async def attempt(c: ModelCallInput) -> ModelCallResult:
            return await workflow.execute_activity(
                "spine.model_call",
                c,
                result_type=ModelCallResult,
                start_to_close_timeout=MODEL_TIMEOUT,
                heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
                retry_policy=self._retry_policy(spec, None),
                summary=f"llm: {c.model} step {c.step}",
            )

        sent = len(self._audit_buffer)
        if sent:
            call = call.model_copy(update={"audit": self._audit_batch(self._audit_buffer[:sent])})
        try:
            result = await attempt(call)
            del self._audit_buffer[:sent]  # stored by the activity before it called the model
            return result
        except ActivityError as err:
            kind, message = _error_text(err)
            if kind == AuditWriteFailed.__name__:
                # The audit store failed, not the model: write through the audit activity
                # (which parks the run while the store stays down), then call the model again.
                workflow.logger.warning("audit entries not stored with the model call: %s", message)
                await self._flush_audit()
                return await self._execute_model(call.model_copy(update={"audit": None}), spec)
            if kind != TranscriptUnavailable.__name__ or self._segment_base[0] != 0:
                raise
        # The store lost the transcript: resend everything this run has said.
        workflow.logger.warning("transcript store lost the transcript; resending it")
        healed = call.model_copy()
        healed.base_len, healed.base_digest = self._segment_base
        healed.new_messages = self._segment + self._pending
        result = await attempt(healed)
        del self._audit_buffer[:sent]
        return result

    def _advance_transcript(self, result: ModelCallResult) -> None:
        for message in self._pending:
            self._digest = chain_digest(self._digest, message)
        self._len += len(self._pending)
        self._segment.extend(self._pending)
        self._pending = [result.message]

    def _charge(self, result: ModelCallResult, spec: AgentSpec, max_usd: float | None) -> None:
        # Providers answer with dated names (gpt-4.1-2025-04-14): price as the model asked for.
        priced = result.model if result.model in spec.prices else self._requested_model
        price_in, price_out = spec.prices[priced]
        usd = (
            result.usage.input_tokens * price_in + result.usage.output_tokens * price_out
        ) / 1_000_000
        if self._budget.block_id is not None:
            self._budget.block_spent_usd += usd
        self._budget.last_input_tokens = result.usage.input_tokens
        self._audit(
            "model_turn",
            result.model,
            model=result.model,
            provider=result.provider,
            input_tokens=result.usage.input_tokens,
            output_tokens=result.usage.output_tokens,
            usd=round(usd, 8),
            finish_reason=result.finish_reason,
            attempt=result.attempt,
            tool_calls=[{"name": c.name} for c in result.message.tool_calls],
            content_digest=digest(result.message.content or ""),
            price_table=spec.policy_version,
        )
        self._usage = Usage(
            input_tokens=self._usage.input_tokens + result.usage.input_tokens,
            output_tokens=self._usage.output_tokens + result.usage.output_tokens,
            usd=round(self._usage.usd + usd, 8),
        )
        if max_usd is not None and self._usage.usd > max_usd:
            raise _Stop(
                "failed",
                f"budget_exhausted: run spent {self._usage.usd:.4f} USD, limit {max_usd:.4f}",
                keep_status=True,
                compensate=spec.budget.compensate_on_exhausted,
            )

    # ------------------------------------------------------------------------------ budget

    def _reservation_id(self) -> str:
        return f"{workflow.info().workflow_id}/{self._step}"

    async def _budget_gate(
        self, spec: AgentSpec, models: list[tuple[str, str]], max_usd: float | None
    ) -> list[tuple[str, str]]:
        """Before a model call: degrade, ask to go on, or stop; reserve on the account ledger.

        Returns the models to try for this turn (the cheaper one once past the soft threshold).
        """
        rules = spec.budget
        fraction = max(self._usage.usd / max_usd if max_usd else 0.0, self._budget.ledger_fraction)
        if fraction >= rules.soft_fraction and self._budget.degraded_to is None:
            cheaper = rules.cheaper_models.get(models[0][1])
            if cheaper and cheaper in spec.prices:
                self._budget.degraded_to = cheaper
                self._path.append(
                    f"step {self._step}: {fraction:.0%} of budget used, switched "
                    f"{models[0][1]} -> {cheaper}"
                )
                self._audit(
                    "budget",
                    "spine",
                    decision="degraded",
                    reason=self._path[-1],
                    used_fraction=round(fraction, 4),
                )
        if self._budget.degraded_to is not None:
            models = [(models[0][0], self._budget.degraded_to), *models[1:]]
        # At 100% there is nothing left to approve: the ledger or the run limit stops the run.
        asking = rules.approval_fraction <= fraction < 1.0
        if asking and not self._budget.approved_to_continue:
            await self._await_approval(
                "budget",
                {"used_fraction": round(fraction, 4), "run_usd": self._usage.usd},
                f"{fraction:.0%} of the budget is used; approve to continue",
                rules.approver_roles,
            )
            self._budget.approved_to_continue = True
        estimate = max(
            (
                max(self._budget.last_input_tokens * 1.5, 1000) * spec.prices[m][0]
                + spec.max_tokens * spec.prices[m][1]
            )
            / 1_000_000
            for _, m in models
        )
        if max_usd is not None and self._usage.usd + estimate > max_usd:
            raise _Stop(
                "failed",
                f"budget_exhausted: the run has spent {self._usage.usd:.4f} USD of its "
                f"{max_usd:.4f} limit and the next call may cost up to {estimate:.4f}",
                keep_status=True,
                compensate=rules.compensate_on_exhausted,
            )
        if rules.daily_usd is None and rules.monthly_usd is None:
            return models
        budget = self._budget
        if budget.block_id is not None and budget.block_spent_usd + estimate <= budget.block_usd:
            return models  # the block reserved earlier still covers this call
        if budget.block_id is not None:
            budget.to_commit[budget.block_id] = round(budget.block_spent_usd, 8)
            budget.block_id = None
        # Reserve for a few calls at once (one ledger round trip per block, not per call); near
        # the limit, fall back to just this call before giving up.
        reservation = self._reservation_id()
        for size in (estimate * BUDGET_BLOCK_CALLS, estimate):
            answer = await self._ledger(spec, reservation, size)
            assert answer is not None  # parking, not None, is how _ledger fails here
            self._audit(
                "budget",
                "spine",
                decision="reserved" if answer.granted else "denied",
                spent_usd=round(answer.day_committed_usd, 8),
                limit_usd=rules.daily_usd if rules.daily_usd is not None else rules.monthly_usd,
                reservation_id=reservation,
                amount_usd=round(size, 8),
                used_fraction=round(answer.used_fraction, 4),
                reason=answer.reason,
            )
            if answer.granted:
                budget.ledger_fraction = answer.used_fraction
                budget.block_id, budget.block_usd, budget.block_spent_usd = reservation, size, 0.0
                return models
        raise _Stop(
            "failed",
            f"budget_exhausted: {answer.reason}",
            keep_status=True,
            compensate=rules.compensate_on_exhausted,
        )

    async def _ledger(
        self, spec: AgentSpec, reserve_id: str | None, amount: float, *, park: bool = True
    ) -> LedgerAnswer | None:
        """One settle-and-reserve on the account's ledger; fails closed (parks) if it is gone.

        With `park=False` (settling at the end of a run) a ledger that does not answer is
        logged and left: unsettled reservations stop holding budget after the ledger's TTL.
        """
        op = LedgerOp(
            run_id=workflow.info().workflow_id,
            commit=dict(self._budget.to_commit),
            release=list(self._budget.to_release),
            reserve_id=reserve_id,
            reserve_usd=round(amount, 8),
            daily_limit_usd=spec.budget.daily_usd,
            monthly_limit_usd=spec.budget.monthly_usd,
        )
        while True:
            try:
                answer = await workflow.execute_local_activity(
                    "spine.budget_apply",
                    BudgetCall(account=self._request.account, op=op),
                    result_type=LedgerAnswer,
                    start_to_close_timeout=timedelta(seconds=15),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(seconds=1),
                        maximum_interval=timedelta(seconds=10),
                        maximum_attempts=12,
                    ),
                    summary=f"budget {self._request.account}",
                )
            # A local activity that gives up surfaces as its ApplicationError itself.
            except (ActivityError, ApplicationError) as err:
                kind, message = _error_text(err)
                if not park:
                    workflow.logger.warning("could not settle budget: %s: %s", kind, message)
                    return None
                await self._park(
                    spec,
                    f"budget ledger unavailable at step {self._step} (no model call without a "
                    f"reservation): {kind}: {message}",
                    skippable=False,
                )
                continue
            self._budget.to_commit.clear()
            self._budget.to_release.clear()
            return answer

    # ------------------------------------------------------------------------------- tools

    def _refuse(self, spec: AgentSpec, call: ToolCall, text: str) -> ChatMessage:
        """Tell the model its call was refused; too many refusals end the run."""
        self._invalid += 1
        workflow.logger.info("refused tool call %s at step %d: %s", call.name, self._step, text)
        self._audit("policy_decision", "spine", decision="refused", tool=call.name, reason=text)
        record_policy_refusal(self._request.agent, call.name, text.split(":", 1)[0])
        if self._invalid > spec.max_invalid_tool_calls:
            raise _Stop(
                "failed",
                f"too many invalid tool calls ({self._invalid}, limit "
                f"{spec.max_invalid_tool_calls}); last: {text}",
            )
        return ChatMessage(
            role="tool", tool_call_id=call.id, name=call.name, content=text, is_error=True
        )

    def _validator(self, tool: ToolDescriptor) -> jsonschema.protocols.Validator:
        key = f"{tool.name}@{tool.version}"
        if key not in self._validators:
            self._validators[key] = jsonschema.Draft202012Validator(tool.input_schema)
        return self._validators[key]

    def _check_call(self, spec: AgentSpec, call: ToolCall) -> tuple[ToolDescriptor | None, str]:
        """The tool to run, or None and the error text for the model."""
        offered = {t.name: t for t in spec.tools if _granted(spec, t)}
        tool = offered.get(call.name)
        if tool is None:
            if any(t.name == call.name for t in spec.tools):
                return None, (
                    f"refused: tool {call.name!r} is not allowed for role "
                    f"{self._request.role!r} in agent {spec.name!r}"
                )
            known = ", ".join(sorted(offered)) or "none"
            return None, f"error: unknown tool {call.name!r}; available tools: {known}"
        if call.args is None:
            return None, (
                f"error: arguments for {call.name!r} are not a JSON object: "
                f"{(call.raw_args or '')[:200]!r}"
            )
        errors = sorted(self._validator(tool).iter_errors(call.args), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                for e in errors[:5]
            )
            return None, f"error: invalid arguments for {call.name!r}: {detail}"
        return tool, ""

    async def _tool_call(
        self, spec: AgentSpec, call: ToolCall, index: int, confidence: float | None
    ) -> ChatMessage:
        tool, problem = self._check_call(spec, call)
        if tool is None:
            return self._refuse(spec, call, problem)
        args = call.args or {}
        watch_taint = any(r.tool == tool.name and r.untrusted_args for r in spec.approval_rules)
        tainted = tainted_args(args, self._untrusted_text) if watch_taint else []
        found = approval_rule(tool.name, args, confidence, spec.approval_rules, tainted=tainted)
        if found is not None:
            reason, rule = found
            await self._await_approval(tool.name, args, reason, rule.approver_roles, rule)

        key = f"{workflow.info().workflow_id}/{self._step}/{index}"
        self._last_tool = tool.name
        try:
            result, used, used_key = await self._run_tool(spec, tool, args, call.id, key)
        except _Skipped as skipped:
            self._audit_tool(tool, args, key, "skipped", f"skipped by {skipped.command.by}")
            return ChatMessage(
                role="tool",
                tool_call_id=call.id,
                name=tool.name,
                content=f"error: skipped by operator {skipped.command.by}: "
                f"{skipped.command.reason or 'no reason given'}",
                is_error=True,
            )
        except ApplicationError as err:
            self._audit_tool(tool, args, key, "error", f"{err.type}: {err.message}")
            return self._refuse(spec, call, f"error: {err.type}: {err.message}")
        self._audit_tool(used, args, used_key, "ok", None, attempt=result.attempt)
        if used.untrusted_output:
            # Remember outside content, so a risky call that copies from it is caught.
            text = json.dumps(result.output, sort_keys=True)
            self._untrusted_text = (self._untrusted_text + "\n" + text)[-UNTRUSTED_KEEP:]
        if used.side_effects:
            self._record_side_effect(call, used, args, result, used_key)
        return ChatMessage(
            role="tool",
            tool_call_id=call.id,
            name=tool.name,
            content=json.dumps(result.output, sort_keys=True),
        )

    def _record_side_effect(
        self,
        call: ToolCall,
        tool: ToolDescriptor,
        args: dict[str, object],
        result: ToolCallResult,
        key: str,
    ) -> None:
        self._side_effects.append(
            SideEffect(
                step=self._step,
                call_id=call.id,
                tool=tool.name,
                args=args,
                output=result.output,
                idempotency_key=key,
                compensation=tool.compensation,
            )
        )

    async def _run_tool(
        self,
        spec: AgentSpec,
        tool: ToolDescriptor,
        args: dict[str, object],
        call_id: str,
        key: str,
    ) -> tuple[ToolCallResult, ToolDescriptor, str]:
        """Run a tool, then its fallback; park when both keep failing.

        Raises ApplicationError for failures the model should hear about, _Skipped when an
        operator skips the call, _Stop when the run must end.
        """
        by_name = {t.name: t for t in spec.tools}
        candidates = [tool] + ([by_name[tool.fallback]] if tool.fallback in by_name else [])
        while True:
            failures = []
            for candidate in candidates:
                candidate_key = key if candidate is tool else f"{key}/{candidate.name}"
                try:
                    result = await self._execute_tool(spec, candidate, args, call_id, candidate_key)
                except (ActivityError, ApplicationError) as err:  # local tools: the latter
                    kind, message = _error_text(err)
                    self._retries += _attempts_used(err, self._attempt_cap) - 1
                    if kind in MODEL_CORRECTABLE:
                        raise ApplicationError(message, type=kind) from err
                    if kind in TERMINAL:
                        raise _Stop(
                            "failed",
                            f"tool {candidate.name} at step {self._step} failed: {kind}: {message}",
                        ) from err
                    failures.append(f"{candidate.name}: {kind}: {message}")
                    continue
                except asyncio.CancelledError:
                    if self._late_result is not None and candidate.side_effects:
                        # The side effect finished while the run was being cancelled.
                        self._record_side_effect(
                            ToolCall(id=call_id, name=candidate.name, args=args),
                            candidate,
                            args,
                            self._late_result,
                            candidate_key,
                        )
                    raise
                self._retries += result.attempt - 1
                if candidate is not tool:
                    self._path.append(
                        f"step {self._step}: tool {tool.name} failed, used fallback "
                        f"{candidate.name}"
                    )
                return result, candidate, candidate_key
            command = await self._park(
                spec,
                f"tool {tool.name} at step {self._step} exhausted its retries: "
                + "; ".join(failures),
                skippable=True,
            )
            if command.action == "skip":
                raise _Skipped(command)

    async def _execute_tool(
        self,
        spec: AgentSpec,
        tool: ToolDescriptor,
        args: dict[str, object],
        call_id: str,
        key: str | None,
    ) -> ToolCallResult:
        shown = args.get(tool.summary_arg) if tool.summary_arg else None
        call = ToolCallInput(
            run_id=workflow.info().workflow_id,
            step=self._step,
            call_id=call_id,
            tool=tool.name,
            version=tool.version,
            args=args,
            idempotency_key=key if tool.side_effects else None,
            account=self._request.account,
            user=self._request.user,
        )
        options = {
            "result_type": ToolCallResult,
            "start_to_close_timeout": timedelta(seconds=tool.start_to_close_s),
            "retry_policy": self._retry_policy(spec, tool),
            "summary": f"{tool.name}({shown})" if shown is not None else tool.name,
        }
        if tool.local:
            # Fast, read-only tools run as local activities: no round trip through the server.
            return await workflow.execute_local_activity(f"tool.{tool.name}", call, **options)
        if tool.start_to_close_s > TOOL_HEARTBEAT_TIMEOUT.total_seconds():
            options["heartbeat_timeout"] = TOOL_HEARTBEAT_TIMEOUT
        handle = workflow.start_activity(
            f"tool.{tool.name}",
            call,
            task_queue=rate_limited_queue(workflow.info().task_queue, tool.rate_limit_group)
            if tool.rate_limit_group in spec.rate_limits
            else None,
            **options,
        )
        if not tool.side_effects:
            return await handle
        self._late_result = None
        try:
            # A side effect in flight is not abandoned on cancellation: compensation must know.
            return await asyncio.shield(handle)
        except asyncio.CancelledError:
            try:
                self._late_result = await handle
            except ActivityError:
                self._late_result = None
            raise

    async def _await_approval(
        self,
        tool: str,
        args: dict[str, object],
        reason: str,
        roles: list[str],
        rule: ApprovalRule | None = None,
    ) -> None:
        """Wait for a decision; per the rule, a timeout escalates (once) or rejects."""
        approval_id = f"ap-{self._step}-{workflow.uuid4().hex[:8]}"
        self._approvals[approval_id] = PendingApproval(
            approval_id=approval_id, tool=tool, args=args, reason=reason
        )
        self._approver_roles[approval_id] = roles
        self._set_status("awaiting_approval")
        record_approval_requested(self._request.agent, tool)
        self._audit(
            "policy_decision",
            "spine",
            decision="needs_approval",
            tool=tool,
            approval_id=approval_id,
            reason=reason,
            approver_roles=roles,
        )
        await self._flush_audit()
        timeout = rule.timeout_s if rule else None
        escalate = rule is not None and rule.on_timeout == "escalate"
        while True:
            try:
                await workflow.wait_condition(
                    lambda: approval_id in self._decisions,
                    timeout=timedelta(seconds=timeout) if timeout else None,
                )
                break
            except TimeoutError:
                assert rule is not None
                if escalate:
                    escalate = False
                    self._approver_roles[approval_id] = list(rule.escalate_to)
                    self._approvals[
                        approval_id
                    ].reason += f"; escalated to {', '.join(rule.escalate_to)} after {timeout:.0f}s"
                    self._audit(
                        "policy_decision",
                        "spine",
                        decision="escalated",
                        tool=tool,
                        approval_id=approval_id,
                        reason=self._approvals[approval_id].reason,
                        approver_roles=rule.escalate_to,
                    )
                    await self._flush_audit()
                    continue
                self._decisions[approval_id] = ApprovalDecision(
                    approval_id=approval_id,
                    decision="reject",
                    by="spine",
                    role="policy",
                    reason=f"no decision within {timeout:.0f}s",
                )
                self._audit_decision(self._decisions[approval_id], accepted=True)
                break
        decision = self._decisions[approval_id]
        self._set_status("running")
        if decision.decision == "reject":
            raise _Stop(
                "rejected",
                f"approval {approval_id} for {tool} rejected by {decision.by} "
                f"({decision.role}): {decision.reason or 'no reason given'}",
            )

    # ---------------------------------------------------------------------------- finish

    async def _finish(self, stop: _Stop) -> AgentResult:
        status = stop.status
        reason = stop.reason
        if self._budget.block_id is not None:
            self._budget.to_commit[self._budget.block_id] = round(self._budget.block_spent_usd, 8)
            self._budget.block_id = None
        if self._spec is not None and (self._budget.to_commit or self._budget.to_release):
            await self._ledger(self._spec, None, 0.0, park=False)
        if (
            status != "completed"
            and stop.compensate
            and any(not s.compensated for s in self._side_effects)
        ):
            leftovers = await self._compensate()
            if leftovers:
                reason += f"; could not undo: {', '.join(leftovers)}"
                status = "failed"
            elif status == "failed" and not stop.keep_status:
                status = "compensated"
        self._status = status
        self._reason = None if status == "completed" else reason
        self._upsert_search_attributes()
        self._audit(
            "run_outcome",
            "spine",
            status=status,
            reason=self._reason,
            steps=self._step,
            usd=self._usage.usd,
            output_digest=digest(stop.output or ""),
        )
        await self._flush_audit(park=False)
        return AgentResult(
            status=status,
            output=stop.output,
            steps=self._step,
            usage=self._usage,
            side_effects=self._side_effects,
            reason=self._reason,
            retries=self._retries,
            path=self._path,
        )

    async def _compensate(self) -> list[str]:
        """Undo completed side effects in reverse order; returns what could not be undone."""
        if self._spec is None:
            return []
        spec = self._spec
        by_name = {t.name: t for t in spec.tools}
        leftovers = []
        for effect in reversed(self._side_effects):
            if effect.compensated:
                continue
            undo = by_name.get(effect.compensation or "")
            if undo is None:
                leftovers.append(f"{effect.tool}@step{effect.step} (no compensation)")
                continue
            try:
                await self._execute_tool(
                    spec,
                    undo,
                    CompensationInput(
                        tool=effect.tool, args=effect.args, output=effect.output
                    ).model_dump(mode="json"),
                    effect.call_id,
                    f"{effect.idempotency_key}/undo",
                )
            except ActivityError as err:
                kind, message = _error_text(err)
                leftovers.append(f"{effect.tool}@step{effect.step} ({kind}: {message})")
                self._audit(
                    "compensation",
                    "spine",
                    tool=undo.name,
                    compensates=effect.tool,
                    outcome="error",
                    error=f"{kind}: {message}",
                    idempotency_key=f"{effect.idempotency_key}/undo",
                )
                continue
            effect.compensated = True
            self._audit(
                "compensation",
                "spine",
                tool=undo.name,
                compensates=effect.tool,
                outcome="ok",
                idempotency_key=f"{effect.idempotency_key}/undo",
            )
            self._path.append(f"compensated {effect.tool}@step{effect.step} with {undo.name}")
        return leftovers

    # ------------------------------------------------------------------------------ audit

    def _audit(self, kind: AuditKind, actor: str, **data: object) -> None:
        """Queue an audit entry; the next model call or `_flush_audit` writes the queue."""
        self._audit_buffer.append(
            AuditEntry(
                seq=self._audit_seq,
                kind=kind,
                step=self._step,
                actor=actor,
                at=workflow.now().isoformat(),
                data=data,
                policy_version=self._spec.policy_version if self._spec else "",
            )
        )
        self._audit_seq += 1

    def _audit_tool(
        self,
        tool: ToolDescriptor,
        args: dict[str, object],
        key: str,
        outcome: str,
        error: str | None,
        *,
        attempt: int | None = None,
    ) -> None:
        self._audit(
            "tool_call",
            self._request.user,
            tool=tool.name,
            version=tool.version,
            args_digest=digest(args),
            outcome=outcome,
            error=error,
            idempotency_key=key if tool.side_effects else None,
            attempt=attempt,
        )

    def _audit_decision(
        self, decision: ApprovalDecision, *, accepted: bool, problem: str | None = None
    ) -> None:
        self._audit(
            "approval",
            decision.by,
            approval_id=decision.approval_id,
            decision=decision.decision,
            by=decision.by,
            role=decision.role,
            reason=problem or decision.reason,
            accepted=accepted,
        )

    def _audit_operator(
        self, command: OperatorCommand, *, accepted: bool, problem: str | None = None
    ) -> None:
        self._audit(
            "operator",
            command.by,
            action=command.action,
            by=command.by,
            role=command.role,
            reason=problem or command.reason,
            accepted=accepted,
        )

    def _audit_batch(self, entries: list[AuditEntry]) -> AuditBatch:
        info = workflow.info()
        return AuditBatch(
            run_id=f"{info.workflow_id}:{info.first_execution_run_id}",
            workflow_run_id=info.run_id,
            agent=self._request.agent,
            account=self._request.account,
            entries=entries,
        )

    async def _flush_audit(self, *, park: bool = True) -> None:
        """Write queued entries, in order, through the `spine.audit_append` local activity.

        The chain is keyed by workflow id and first run id, so it spans continue-as-new and a
        reused workflow id starts a fresh chain. A store that keeps failing parks the run: no
        decision goes unrecorded (at the very end it is logged instead).
        """
        while self._audit_buffer:
            entries = list(self._audit_buffer)
            batch = self._audit_batch(entries)
            try:
                await workflow.execute_local_activity(
                    "spine.audit_append",
                    batch,
                    result_type=int,
                    start_to_close_timeout=timedelta(seconds=10),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(seconds=0.5),
                        maximum_interval=timedelta(seconds=5),
                        maximum_attempts=10,
                    ),
                    summary=f"audit {len(entries)} entries",
                )
            except (ActivityError, ApplicationError) as err:
                kind, message = _error_text(err)
                if not park or self._spec is None:
                    workflow.logger.error("audit write failed (kept queued): %s: %s", kind, message)
                    return
                await self._park(
                    self._spec, f"audit log unavailable: {kind}: {message}", skippable=False
                )
                continue
            del self._audit_buffer[: len(entries)]

    # ------------------------------------------------------------------------- visibility

    def _set_status(self, status: RunStatus) -> None:
        if status != self._status:
            self._status = status
            self._upsert_search_attributes()

    def _upsert_search_attributes(self, *, progress: bool = False) -> None:
        """Upsert what changed. Status changes go out at once; step and cost progress
        (`progress=True`) at most every `SA_PROGRESS_EVERY` of workflow time, since each
        upsert is a history event and a visibility write."""
        if self._spec is None or not self._spec.search_attributes:
            return
        now = workflow.now()
        if progress and self._sa_at is not None and now - self._sa_at < SA_PROGRESS_EVERY:
            return
        pairs = [
            SearchAttributePair(SA_AGENT, self._request.agent),
            SearchAttributePair(SA_ACCOUNT, self._request.account),
            SearchAttributePair(SA_STATUS, self._status),
            SearchAttributePair(SA_STEPS, self._step),
            SearchAttributePair(SA_COST, self._usage.usd),
        ]
        changed = [p for p in pairs if self._sa_sent.get(p.key.name) != p.value]
        self._sa_at = now
        if changed:
            workflow.upsert_search_attributes(changed)
            self._sa_sent.update({p.key.name: p.value for p in changed})
