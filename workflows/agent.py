"""`AgentWorkflow`: the durable agent loop.

model turn -> validated tool calls (each its own activity) -> results back to the model, until a
final answer, the step limit, or a terminal error. Only new messages travel through history; the
transcript lives in the transcript store (see `activities/transcript.py`), and the run continues
as new when its history gets long, so per-step history bytes stay flat.
"""

from __future__ import annotations

import json
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey, SearchAttributePair
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    import jsonschema

    from activities.errors import NON_RETRYABLE_TYPES, TranscriptUnavailable
    from activities.models import (
        EMPTY_DIGEST,
        AgentSpec,
        ChatMessage,
        CompensationInput,
        ModelCallInput,
        ModelCallResult,
        ResolveAgentInput,
        ToolCall,
        ToolCallInput,
        ToolCallResult,
        ToolDescriptor,
        ToolRef,
        chain_digest,
    )
    from guardrails.approvals import approval_reason
    from workflows.models import (
        WORKFLOW_TYPE,
        AgentResult,
        AgentWorkflowInput,
        ApprovalDecision,
        Carry,
        DecisionAck,
        PendingApproval,
        RunState,
        RunStatus,
        SideEffect,
        Usage,
    )

SA_AGENT = SearchAttributeKey.for_keyword("SpineAgent")
SA_ACCOUNT = SearchAttributeKey.for_keyword("SpineAccount")
SA_STATUS = SearchAttributeKey.for_keyword("SpineStatus")
SA_COST = SearchAttributeKey.for_float("SpineCostUSD")
SA_STEPS = SearchAttributeKey.for_int("SpineSteps")

MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=0.5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=20),
    maximum_attempts=8,
    non_retryable_error_types=NON_RETRYABLE_TYPES,
)
MODEL_TIMEOUT = timedelta(seconds=120)


class _Stop(Exception):
    """Unwinds the loop to finish the run with a status and a reason."""

    def __init__(self, status: RunStatus, reason: str, output: str | None = None) -> None:
        super().__init__(reason)
        self.status: RunStatus = status
        self.reason = reason
        self.output = output


def _error_text(err: BaseException) -> tuple[str, str]:
    """(type, message) of the innermost application failure behind an activity error."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    return type(cause).__name__, str(cause)


@workflow.defn(name=WORKFLOW_TYPE)
class AgentWorkflow:
    @workflow.init
    def __init__(self, request: AgentWorkflowInput) -> None:
        carry = request.carry
        self._request = request
        self._status: RunStatus = "running"
        self._reason: str | None = None
        self._output: str | None = None
        self._spec: AgentSpec | None = carry.spec if carry else None
        self._step = carry.step if carry else 0
        self._usage = carry.usage.model_copy() if carry else Usage()
        self._side_effects: list[SideEffect] = list(carry.side_effects) if carry else []
        self._len = carry.transcript_len if carry else 0
        self._digest = carry.transcript_digest if carry else EMPTY_DIGEST
        self._pending: list[ChatMessage] = list(carry.pending_messages) if carry else []
        self._invalid = carry.invalid_calls if carry else 0
        self._script_pos = carry.script_pos if carry else 0
        # Everything stored since this run segment began, to resend if the store lost it.
        self._segment_base = (self._len, self._digest)
        self._segment: list[ChatMessage] = []
        self._approvals: dict[str, PendingApproval] = {}
        self._approver_roles: dict[str, list[str]] = {}
        self._decisions: dict[str, ApprovalDecision] = {}
        self._refused_decisions: list[tuple[ApprovalDecision, str]] = []
        self._last_tool: str | None = None
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    # ---------------------------------------------------------------- queries, signals, updates

    @workflow.query(name="state")
    def state(self) -> RunState:
        return RunState(
            status=self._status,
            step=self._step,
            pending_approvals=[a for k, a in self._approvals.items() if k not in self._decisions],
            usage=self._usage,
            reason=self._reason,
            agent=self._request.agent,
            last_tool=self._last_tool,
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
            self._refused_decisions.append((decision, problem))
            return
        self._decisions[decision.approval_id] = decision

    @workflow.update(name="decide")
    def decide(self, decision: ApprovalDecision) -> DecisionAck:
        self._decisions[decision.approval_id] = decision
        return DecisionAck(
            approval_id=decision.approval_id, decision=decision.decision, status=self._status
        )

    @decide.validator
    def _validate_decide(self, decision: ApprovalDecision) -> None:
        problem = self._decision_problem(decision)
        if problem:
            raise ValueError(problem)

    # ---------------------------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: AgentWorkflowInput) -> AgentResult:
        try:
            if self._spec is None:
                self._spec = await self._resolve_agent()
            self._upsert_search_attributes()
            result = await self._loop(self._spec)
        except _Stop as stop:
            result = await self._finish(stop)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return result

    async def _resolve_agent(self) -> AgentSpec:
        req = self._request
        try:
            return await workflow.execute_activity(
                "spine.resolve_agent",
                ResolveAgentInput(agent=req.agent, role=req.role),
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

    def _model_choice(self, spec: AgentSpec) -> tuple[str, str]:
        choice = self._request.model
        provider = choice.provider if choice else spec.default_provider
        name = choice.name if choice and choice.name else None
        if name is None:
            name = (
                spec.default_model
                if provider == spec.default_provider
                else spec.default_models.get(provider)
            )
        if not name:
            raise _Stop("failed", f"no model name given and no default for provider {provider!r}")
        if name not in spec.prices:
            raise _Stop(
                "failed",
                f"model {name!r} has no price in the policy's price table "
                f"({spec.policy_version}); a model with no price is refused",
            )
        return provider, name

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
        provider, model = self._model_choice(spec)
        max_steps, max_usd = self._limits(spec)
        if self._len == 0 and not self._pending:
            self._pending = [
                ChatMessage(role="system", content=spec.instructions),
                ChatMessage(role="user", content=self._request.goal),
            ]
        offered = [
            ToolRef(name=t.name, version=t.version)
            for t in spec.tools
            if t.name in spec.allowed_tools
        ]
        while True:
            if self._step >= max_steps:
                raise _Stop(
                    "failed", f"max_steps: used all {max_steps} steps without a final answer"
                )
            if self._should_continue_as_new(spec):
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._carry_input(spec))
            self._step += 1
            result = await self._model_turn(provider, model, offered, spec)
            self._charge(result, spec, max_usd)
            message = result.message
            if not message.tool_calls:
                self._upsert_search_attributes()
                raise _Stop("completed", "final answer", output=message.content or "")
            for index, call in enumerate(message.tool_calls):
                self._pending.append(await self._tool_call(spec, call, index, result.confidence))
            self._upsert_search_attributes()

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
            spec=spec,
        )
        return request

    # ------------------------------------------------------------------------------ model

    async def _model_turn(
        self, provider: str, model: str, tools: list[ToolRef], spec: AgentSpec
    ) -> ModelCallResult:
        choice = self._request.model
        script_turn = None
        if provider == "scripted":
            script = choice.script if choice else []
            if self._script_pos >= len(script):
                raise _Stop(
                    "failed",
                    f"scripted model: the script has no turn {self._script_pos + 1} "
                    f"(it has {len(script)})",
                )
            script_turn = script[self._script_pos]
            self._script_pos += 1
        call = ModelCallInput(
            transcript_id=workflow.info().workflow_id,
            base_len=self._len,
            base_digest=self._digest,
            new_messages=self._pending,
            provider=provider,  # type: ignore[arg-type]  # validated in the request model
            model=model,
            tools=tools,
            step=self._step,
            max_tokens=spec.max_tokens,
            script_turn=script_turn,
            fail_rate=choice.fail_rate if choice else 0.0,
        )
        try:
            result = await self._execute_model(call, model)
        except ActivityError as err:
            kind, message = _error_text(err)
            base_len, base_digest = self._segment_base
            if kind != TranscriptUnavailable.__name__ or base_len != 0:
                raise _Stop(
                    "failed", f"model call at step {self._step}: {kind}: {message}"
                ) from err
            # The store lost the transcript: resend everything this run has said.
            workflow.logger.warning("transcript store lost the transcript; resending it")
            call.base_len, call.base_digest = base_len, base_digest
            call.new_messages = self._segment + self._pending
            try:
                result = await self._execute_model(call, model)
            except ActivityError as err2:
                kind, message = _error_text(err2)
                raise _Stop(
                    "failed", f"model call at step {self._step}: {kind}: {message}"
                ) from err2
        for message in self._pending:
            self._digest = chain_digest(self._digest, message)
        self._len += len(self._pending)
        self._segment.extend(self._pending)
        self._pending = [result.message]
        return result

    async def _execute_model(self, call: ModelCallInput, model: str) -> ModelCallResult:
        return await workflow.execute_activity(
            "spine.model_call",
            call,
            result_type=ModelCallResult,
            start_to_close_timeout=MODEL_TIMEOUT,
            retry_policy=MODEL_RETRY,
            summary=f"llm: {model} step {call.step}",
        )

    def _charge(self, result: ModelCallResult, spec: AgentSpec, max_usd: float | None) -> None:
        price_in, price_out = spec.prices.get(result.model, spec.prices.get("scripted", (0, 0)))
        usd = (
            result.usage.input_tokens * price_in + result.usage.output_tokens * price_out
        ) / 1_000_000
        self._usage = Usage(
            input_tokens=self._usage.input_tokens + result.usage.input_tokens,
            output_tokens=self._usage.output_tokens + result.usage.output_tokens,
            usd=round(self._usage.usd + usd, 8),
        )
        if max_usd is not None and self._usage.usd > max_usd:
            raise _Stop(
                "failed",
                f"budget_exhausted: run spent {self._usage.usd:.4f} USD, limit {max_usd:.4f}",
            )

    # ------------------------------------------------------------------------------- tools

    def _refuse(self, spec: AgentSpec, call: ToolCall, text: str) -> ChatMessage:
        """Tell the model its call was refused; too many refusals end the run."""
        self._invalid += 1
        workflow.logger.info("refused tool call %s at step %d: %s", call.name, self._step, text)
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

    async def _tool_call(
        self, spec: AgentSpec, call: ToolCall, index: int, confidence: float | None
    ) -> ChatMessage:
        offered = {t.name: t for t in spec.tools if t.name in spec.allowed_tools}
        tool = next((t for t in spec.tools if t.name == call.name), None)
        if tool is None or tool.name not in offered:
            if tool is None:
                known = ", ".join(sorted(offered)) or "none"
                return self._refuse(
                    spec, call, f"error: unknown tool {call.name!r}; available tools: {known}"
                )
            return self._refuse(
                spec,
                call,
                f"refused: tool {call.name!r} is not allowed for role {self._request.role!r} "
                f"in agent {spec.name!r}",
            )
        if call.args is None:
            return self._refuse(
                spec,
                call,
                f"error: arguments for {call.name!r} are not a JSON object: "
                f"{(call.raw_args or '')[:200]!r}",
            )
        errors = sorted(self._validator(tool).iter_errors(call.args), key=lambda e: list(e.path))
        if errors:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                for e in errors[:5]
            )
            return self._refuse(spec, call, f"error: invalid arguments for {call.name!r}: {detail}")

        needs = approval_reason(tool.name, call.args, confidence, spec.approval_rules)
        if needs is not None:
            await self._await_approval(tool, call, *needs)

        key = f"{workflow.info().workflow_id}/{self._step}/{index}"
        self._last_tool = tool.name
        try:
            result = await self._execute_tool(tool, call.args, call.id, key)
        except ActivityError as err:
            kind, message = _error_text(err)
            if kind in ("ToolInputInvalid", "ToolFailed"):
                # The business system said no: the model is told and may correct itself.
                return self._refuse(spec, call, f"error: {kind}: {message}")
            raise _Stop(
                "failed", f"tool {tool.name} at step {self._step} failed: {kind}: {message}"
            ) from err
        if tool.side_effects:
            self._side_effects.append(
                SideEffect(
                    step=self._step,
                    call_id=call.id,
                    tool=tool.name,
                    args=call.args,
                    output=result.output,
                    idempotency_key=key,
                    compensation=tool.compensation,
                )
            )
        return ChatMessage(
            role="tool",
            tool_call_id=call.id,
            name=tool.name,
            content=json.dumps(result.output, sort_keys=True),
        )

    async def _execute_tool(
        self, tool: ToolDescriptor, args: dict[str, object], call_id: str, key: str | None
    ) -> ToolCallResult:
        shown = args.get(tool.summary_arg) if tool.summary_arg else None
        return await workflow.execute_activity(
            f"tool.{tool.name}",
            ToolCallInput(
                run_id=workflow.info().workflow_id,
                step=self._step,
                call_id=call_id,
                tool=tool.name,
                version=tool.version,
                args=args,
                idempotency_key=key if tool.side_effects else None,
                account=self._request.account,
                user=self._request.user,
            ),
            result_type=ToolCallResult,
            start_to_close_timeout=timedelta(seconds=tool.start_to_close_s),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=tool.initial_interval_s),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=tool.max_interval_s),
                maximum_attempts=tool.max_attempts,
                non_retryable_error_types=NON_RETRYABLE_TYPES,
            ),
            summary=f"{tool.name}({shown})" if shown is not None else tool.name,
        )

    async def _await_approval(
        self, tool: ToolDescriptor, call: ToolCall, reason: str, roles: list[str]
    ) -> None:
        approval_id = f"ap-{self._step}-{workflow.uuid4().hex[:8]}"
        self._approvals[approval_id] = PendingApproval(
            approval_id=approval_id, tool=tool.name, args=call.args or {}, reason=reason
        )
        self._approver_roles[approval_id] = roles
        self._set_status("awaiting_approval")
        await workflow.wait_condition(lambda: approval_id in self._decisions)
        decision = self._decisions[approval_id]
        self._set_status("running")
        if decision.decision == "reject":
            raise _Stop(
                "rejected",
                f"approval {approval_id} for {tool.name} rejected by {decision.by} "
                f"({decision.role}): {decision.reason or 'no reason given'}",
            )

    # ---------------------------------------------------------------------------- finish

    async def _finish(self, stop: _Stop) -> AgentResult:
        status = stop.status
        reason = stop.reason
        if status in ("failed", "rejected") and any(not s.compensated for s in self._side_effects):
            leftovers = await self._compensate()
            if leftovers:
                reason += f"; could not undo: {', '.join(leftovers)}"
                status = "failed"
            elif status == "failed":
                status = "compensated"
        self._status = status
        self._reason = reason
        self._output = stop.output
        self._upsert_search_attributes()
        return AgentResult(
            status=status,
            output=stop.output,
            steps=self._step,
            usage=self._usage,
            side_effects=self._side_effects,
            reason=None if status == "completed" else reason,
        )

    async def _compensate(self) -> list[str]:
        """Undo completed side effects in reverse order; returns what could not be undone."""
        assert self._spec is not None
        by_name = {t.name: t for t in self._spec.tools}
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
                continue
            effect.compensated = True
        return leftovers

    # ------------------------------------------------------------------------- visibility

    def _set_status(self, status: RunStatus) -> None:
        if status != self._status:
            self._status = status
            self._upsert_search_attributes()

    def _upsert_search_attributes(self) -> None:
        if self._spec is None or not self._spec.search_attributes:
            return
        workflow.upsert_search_attributes(
            [
                SearchAttributePair(SA_AGENT, self._request.agent),
                SearchAttributePair(SA_ACCOUNT, self._request.account),
                SearchAttributePair(SA_STATUS, self._status),
                SearchAttributePair(SA_STEPS, self._step),
                SearchAttributePair(SA_COST, self._usage.usd),
            ]
        )
