"""Model turns, workflow side: one durable model call per step, with fallbacks and parking.

Each turn is the ``spine.model_call`` activity. Only the messages that are new since the last
call travel in history (the activity rebuilds the transcript from the transcript store, checked
by length and digest); the audit entries queued since the last write ride along. A call that
keeps failing tries the request's fallback models, in order; when they fail too, the run parks
for an operator, or ends if every failure was terminal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from spine.activities.errors import (
        TERMINAL,
        AuditWriteFailed,
        ModelAnswerInvalid,
        PolicyDenied,
        TranscriptUnavailable,
        failure_text,
    )
    from spine.contract import ACTIVITY_MODEL_CALL, ModelChoice
    from spine.guardrails.budget import BudgetGate, Models
    from spine.guardrails.parking import Parking
    from spine.observability.trail import AuditTrail
    from spine.payloads import (
        AgentSpec,
        ChatMessage,
        ModelCallInput,
        ModelCallResult,
        ScriptTurn,
        ToolRef,
    )
    from spine.workflows.state import RunState, StopRun, apply_charge, apply_model_turn

MODEL_TIMEOUT = timedelta(seconds=120)
#: The model activity heartbeats: a worker that died mid-call is noticed after this long.
MODEL_HEARTBEAT_TIMEOUT = timedelta(seconds=10)


def model_path(choice: ModelChoice | None, spec: AgentSpec) -> Models:
    """(provider, model) for a run's model, then each of its fallbacks, as the run will try them.

    The first model's name is ``""`` when the request names none and the policy has no default
    for its provider; :meth:`ModelTurns.path` and forks refuse that (and models with no price).
    """
    provider = choice.provider if choice else spec.default_provider
    name = choice.name if choice and choice.name else None
    if name is None:
        name = (
            spec.default_model
            if provider == spec.default_provider
            else spec.default_models.get(provider)
        )
    path = [(provider, name or "")]
    for entry in choice.fallback if choice else []:
        fb_provider, _, fb_name = entry.rpartition(":")
        path.append((fb_provider or provider, fb_name))
    return path


class ModelTurns:
    """The run's model calls."""

    def __init__(
        self,
        state: RunState,
        choice: ModelChoice | None,
        *,
        budget: BudgetGate,
        parking: Parking,
        trail: AuditTrail,
        flush_audit: Callable[[], Awaitable[None]],
        transcript_id: str,
    ) -> None:
        self.state = state
        self.spec = state.agent
        self.choice = choice
        self.budget = budget
        self.parking = parking
        self.trail = trail
        self._flush_audit = flush_audit
        self.transcript_id = transcript_id
        # Everything stored since this run (of the chain) began, to resend if the store lost it.
        self._segment_base = (state.transcript_len, state.transcript_digest)
        self._segment: list[ChatMessage] = []

    def path(self) -> Models:
        """The models to try, checked: each must have a price in the pinned policy."""
        path = model_path(self.choice, self.spec)
        provider, name = path[0]
        if not name:
            raise StopRun("failed", f"no model name given and no default for provider {provider!r}")
        for _, model in path:
            if model not in self.spec.prices:
                raise StopRun(
                    "failed",
                    f"model {model!r} has no price in the policy's price table "
                    f"({self.spec.policy_version}); a model with no price is refused",
                )
        return path

    async def take(self, models: Models, offered: list[ToolRef]) -> ModelCallResult:
        """Ask the model for this step's turn; charge it. Parks while every model fails.

        Raises:
            StopRun: every model failed terminally, or the turn took the run over budget.
        """
        script_turn = self._script_turn(models)
        while True:
            failures: list[tuple[str, str]] = []
            for index, (provider, model) in enumerate(models):
                call = ModelCallInput(
                    transcript_id=self.transcript_id,
                    base_len=self.state.transcript_len,
                    base_digest=self.state.transcript_digest,
                    new_messages=self.state.pending_messages,
                    provider=provider,  # type: ignore[arg-type]  # validated in the request
                    model=model,
                    # The scripted model reads no tool schemas: the list stays out of history.
                    tools=offered if provider != "scripted" else [],
                    step=self.state.step,
                    max_tokens=self.spec.max_tokens,
                    script_turn=script_turn,
                    fail_rate=self.choice.fail_rate if self.choice else 0.0,
                    fallback_index=index,
                    context_bytes=self.state.context_bytes,
                )
                try:
                    result = await self._call(call)
                except ActivityError as err:
                    kind, message = failure_text(err)
                    self.parking.failed(err)
                    if kind == ModelAnswerInvalid.__name__:
                        # The provider did the work; what was reserved for it is spent.
                        apply_charge(self.state, self.budget.estimate([(provider, model)]))
                    failures.append((kind, f"{model}: {kind}: {message}"))
                    continue
                except ApplicationError as err:
                    if err.type == PolicyDenied.__name__:  # the interceptor's backstop refused
                        raise StopRun("failed", err.message) from err
                    raise
                if index:
                    self.state.path.append(
                        f"step {self.state.step}: model {models[0][1]} failed, used fallback "
                        f"{model}"
                    )
                result = self.budget.bounded(result)
                usd = self.budget.cost(result, model)
                self._segment.extend(self.state.pending_messages)
                apply_model_turn(self.state, result, usd)
                self.budget.charged(result, usd)
                return result
            why = f"model call at step {self.state.step} failed: " + "; ".join(
                f for _, f in failures
            )
            if all(kind in TERMINAL for kind, _ in failures):
                raise StopRun("failed", why)
            await self.parking.park(why, skippable=False)

    def _script_turn(self, models: Models) -> ScriptTurn | None:
        """The scripted model's next turn (consumed once, whatever retries follow)."""
        if models[0][0] != "scripted":
            return None
        script = self.choice.script if self.choice else []
        if self.state.script_pos >= len(script):
            raise StopRun(
                "failed",
                f"scripted model: the script has no turn {self.state.script_pos + 1} "
                f"(it has {len(script)})",
            )
        self.state.script_pos += 1
        return script[self.state.script_pos - 1]

    async def _call(self, call: ModelCallInput) -> ModelCallResult:
        """One model call, with the queued audit entries; heals a transcript the store lost."""
        batch = self.trail.batch()
        sent = len(batch.entries) if batch else 0
        if batch is not None:
            call = call.model_copy(update={"audit": batch})
        try:
            result = await self._attempt(call)
            self.trail.stored(sent, result.audit)  # stored by the activity before the model
            return result
        except ActivityError as err:
            kind, message = failure_text(err)
            if kind == AuditWriteFailed.__name__:
                # The audit store failed, not the model: write through the audit activity
                # (which parks the run while the store stays down), then call the model again.
                workflow.logger.warning("audit entries not stored with the model call: %s", message)
                await self._flush_audit()
                return await self._call(call.model_copy(update={"audit": None}))
            if kind != TranscriptUnavailable.__name__ or self._segment_base[0] != 0:
                raise
        # The store lost the transcript: resend everything this run has said.
        workflow.logger.warning("transcript store lost the transcript; resending it")
        healed = call.model_copy()
        healed.base_len, healed.base_digest = self._segment_base
        healed.new_messages = self._segment + self.state.pending_messages
        result = await self._attempt(healed)
        self.trail.stored(sent, result.audit)
        return result

    async def _attempt(self, call: ModelCallInput) -> ModelCallResult:
        return await workflow.execute_activity(
            ACTIVITY_MODEL_CALL,
            call,
            result_type=ModelCallResult,
            start_to_close_timeout=MODEL_TIMEOUT,
            heartbeat_timeout=MODEL_HEARTBEAT_TIMEOUT,
            retry_policy=self.parking.retry_policy(
                self.spec.model_max_attempts,
                self.spec.model_initial_interval_s,
                self.spec.model_max_interval_s,
            ),
            summary=f"llm: {call.model} step {call.step}",
        )
