"""The model activity and the agent-resolution activity.

`spine.model_call` rebuilds the transcript from the transcript store, asks the provider, and
returns only the new assistant message with its usage. Provider SDK retries are off: Temporal
owns retries, so every attempt is visible in history.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable, Mapping

from temporalio import activity

from spine.activities.blobs import BlobStore, ref_digest
from spine.activities.breakers import Breakers
from spine.activities.errors import (
    AuditWriteFailed,
    DependencyUnavailable,
    ModelAnswerInvalid,
    ModelRequestRejected,
    SpineError,
)
from spine.activities.heartbeat import heartbeating
from spine.activities.providers.base import ModelProvider, StreamingProvider
from spine.activities.tools import Registry
from spine.activities.transcript import TranscriptStore
from spine.contract import ACTIVITY_MODEL_CALL, ACTIVITY_RESOLVE_AGENT, ScriptTurn, TokenUsage
from spine.guardrails.policy import Policy
from spine.observability.streams import NewEvent, TokenWriter, now_iso
from spine.payloads import (
    AgentSpec,
    Appended,
    AuditBatch,
    ChatMessage,
    ModelCallInput,
    ModelCallResult,
    ProviderRequest,
    ProviderResponse,
    ResolveAgentInput,
    ToolCall,
    ToolDescriptor,
)


def scripted_response(
    turn: ScriptTurn, step: int, model: str = "scripted", context_bytes: int = 0
) -> ModelCallResult:
    """The scripted model's answer for one turn: what the script says, as a provider would.

    A turn that states no usage reports what a provider would, roughly: a token per four
    bytes of the prompt and of the answer.
    """
    calls = []
    for index, call in enumerate(turn.tool_calls):
        call_id = f"call_{step}_{index}"
        if call.raw_args is not None:
            try:
                parsed = json.loads(call.raw_args)
            except ValueError:
                parsed = None
            args = parsed if isinstance(parsed, dict) else None
            calls.append(ToolCall(id=call_id, name=call.name, args=args, raw_args=call.raw_args))
        else:
            calls.append(ToolCall(id=call_id, name=call.name, args=call.args))
    answer_bytes = len((turn.text or "").encode()) + sum(
        len(json.dumps(c.args)) + len(c.raw_args or "") for c in turn.tool_calls
    )
    usage = turn.usage or TokenUsage(
        input_tokens=max(1, context_bytes // 4), output_tokens=max(1, answer_bytes // 4)
    )
    return ModelCallResult(
        message=ChatMessage(role="assistant", content=turn.text, tool_calls=calls),
        usage=usage,
        model=model,
        provider="scripted",
        finish_reason="tool_calls" if calls else "stop",
        confidence=turn.confidence,
    )


async def _scripted(call: ModelCallInput, turn: ScriptTurn) -> ModelCallResult:
    """The scripted model, with its fault switches (randomness is fine in an activity)."""
    scripted_error = turn.error if call.fallback_index == 0 else None
    if scripted_error == "terminal":
        raise ModelRequestRejected(f"scripted model: terminal error scripted at step {call.step}")
    if scripted_error == "transient" or (call.fail_rate and random.random() < call.fail_rate):
        raise DependencyUnavailable(
            f"scripted model: injected transient failure at step {call.step} "
            f"(fail_rate={call.fail_rate})"
        )
    return scripted_response(turn, call.step, call.model, call.context_bytes)


def build_spec(
    registry: Registry,
    policy: Policy,
    request: ResolveAgentInput,
    *,
    search_attributes: bool = True,
) -> AgentSpec:
    """The agent as a run pins it: its tools (latest versions, with their compensations) and
    the slice of `policy` that applies to the request's role and account.

    Raises:
        UnknownTool: the agent is not registered.
    """
    agent = registry.agent(request.agent)
    agent_policy = policy.agents.get(agent.name)
    tools: list[ToolDescriptor] = []
    for name in agent.tools:
        definition = registry.latest(name)
        descriptor = definition.descriptor()
        tools.append(descriptor)
        if definition.compensation:
            tools.append(registry.latest(definition.compensation).descriptor())
        if definition.sub_agent:
            # What undoes the child's effects, so the parent's saga can (see `sub_agent`).
            undo = _sub_agent_undo(registry, definition.sub_agent, set())
            descriptor.sub_agent_undo = [t.name for t in undo]
            known = {t.name for t in tools}
            tools.extend(t for t in undo if t.name not in known)
    return AgentSpec(
        name=agent.name,
        instructions=agent.instructions,
        tools=tools,
        allowed_tools=policy.allowed_tools(agent.name, request.role),
        approval_rules=policy.approval_rules(agent.name),
        default_provider=agent.default_provider,  # type: ignore[arg-type]  # checked at start
        default_model=agent.default_model,
        default_models=dict(policy.models.defaults),
        max_steps=agent_policy.max_steps if agent_policy else 20,
        max_usd=agent_policy.max_usd if agent_policy else None,
        max_parallel_tool_calls=agent_policy.max_parallel_tool_calls if agent_policy else 4,
        max_sub_agent_depth=policy.runtime.max_sub_agent_depth,
        max_invalid_tool_calls=policy.runtime.max_invalid_tool_calls,
        max_tokens=policy.runtime.max_tokens,
        continue_as_new_after_events=policy.runtime.continue_as_new_after_events,
        operator_roles=list(policy.runtime.operator_roles),
        parking_timeout_s=policy.runtime.parking_timeout_s,
        max_retries_per_run=policy.runtime.max_retries_per_run,
        model_max_attempts=policy.runtime.model_max_attempts,
        model_initial_interval_s=policy.runtime.model_initial_interval_s,
        model_max_interval_s=policy.runtime.model_max_interval_s,
        budget=policy.budget_rules(request.account),
        rate_limits=dict(policy.rate_limits),
        on_failed_side_effect=policy.runtime.on_failed_side_effect,
        prices=policy.price_table(),
        policy_version=policy.full_version,
        search_attributes=search_attributes,
        progress_every_s=policy.runtime.progress_every_s,
    )


#: The largest model answer (message JSON) a run takes.
MAX_ANSWER_BYTES = 256 * 1024


def _sub_agent_undo(registry: Registry, agent: str, seen: set[str]) -> list[ToolDescriptor]:
    """The compensation tools of `agent`'s tools, and of its own sub-agents' (each agent once)."""
    if agent in seen:
        return []
    seen.add(agent)
    undo: list[ToolDescriptor] = []
    for name in registry.agent(agent).tools:
        definition = registry.latest(name)
        if definition.compensation:
            undo.append(registry.latest(definition.compensation).descriptor())
        if definition.sub_agent:
            undo.extend(_sub_agent_undo(registry, definition.sub_agent, seen))
    return undo


class ModelActivities:
    """Activities that talk to models. Clients are built on the worker and injected."""

    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        transcripts: TranscriptStore,
        providers: Mapping[str, ModelProvider],
        *,
        search_attributes: bool = True,
        breakers: Breakers | None = None,
        audit_append: Callable[[AuditBatch], Awaitable[Appended]] | None = None,
        blobs: BlobStore | None = None,
        live: Callable[[NewEvent], None] | None = None,
    ) -> None:
        self.registry = registry
        self.blobs = blobs
        self.live = live
        """Publishes to the runs' live streams (tokens as they arrive); None: no streaming."""
        self.audit_append = audit_append
        self.policy = policy
        self.transcripts = transcripts
        self.providers = providers
        self.search_attributes = search_attributes
        self.breakers = breakers or Breakers()

    @activity.defn(name=ACTIVITY_RESOLVE_AGENT)
    async def resolve_agent(self, request: ResolveAgentInput) -> AgentSpec:
        """Pin the agent's tools and the policy slice that applies to this run."""
        try:
            return build_spec(
                self.registry, self.policy, request, search_attributes=self.search_attributes
            )
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow

    @activity.defn(name=ACTIVITY_MODEL_CALL)
    async def model_call(self, call: ModelCallInput) -> ModelCallResult:
        """One model turn."""
        try:
            async with heartbeating():
                messages, anchor = await self._store(call)
                result = await self._model_call(call, messages)
                result.audit = anchor
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow
        result.attempt = activity.info().attempt
        return result

    async def _store(self, call: ModelCallInput) -> tuple[list[ChatMessage], Appended | None]:
        """The transcript with the call's new messages stored, and the anchor of the audit
        entries the call carried (None without entries).

        Two independent, idempotent writes, each a synced commit: made at once, so a step
        waits for one commit, not two. Both settle before the model is asked, and if either
        failed the model is not asked (the audit store's failure is reported first).
        """
        # The scripted model answers from its script: it only needs the prefix verified.
        transcript = self.transcripts.extend(
            call.transcript_id,
            call.base_len,
            call.base_digest,
            call.new_messages,
            load=call.provider != "scripted",
        )
        if call.audit is None or not call.audit.entries:
            return await transcript, None
        messages, anchor = await asyncio.gather(
            transcript, self._store_audit(call.audit), return_exceptions=True
        )
        for outcome in (anchor, messages):
            if isinstance(outcome, BaseException):
                raise outcome
        return messages, anchor  # type: ignore[return-value]  # neither is an exception here

    async def _store_audit(self, batch: AuditBatch) -> Appended:
        """Store the audit entries the workflow queued since its last write (idempotent)."""
        if self.audit_append is None:
            raise AuditWriteFailed("this worker has no audit store for the queued audit entries")
        try:
            return await self.audit_append(batch)
        except Exception as err:  # any store failure: the workflow's own audit path takes over
            kind = type(err).__name__
            raise AuditWriteFailed(f"audit entries not stored: {kind}: {err}") from None

    async def _dereference(self, run_id: str, messages: list[ChatMessage]) -> list[ChatMessage]:
        """Tool results stored by reference, replaced by the outputs themselves (the model reads
        them whole). Only references indexed for this run are followed; any other stays as it
        is, so a tool or model cannot pull another run's output into this one."""
        refs = [ref_digest(m.content) if m.role == "tool" else None for m in messages]
        if self.blobs is None or not any(refs):
            return messages
        found = await self.blobs.resolve(run_id, [d for d in refs if d])
        resolved = []
        for message, ref in zip(messages, refs, strict=True):
            if ref is not None and ref in found:
                content = json.dumps(found[ref], sort_keys=True)
                message = message.model_copy(update={"content": content})
            elif ref is not None:
                activity.logger.warning(
                    "tool message refers to output %s, which run %s was not given; sent as is",
                    ref,
                    run_id,
                )
            resolved.append(message)
        return resolved

    def _token_writer(self, call: ModelCallInput) -> TokenWriter | None:
        """The live stream's writer for this attempt's tokens (after its `model_started`)."""
        if self.live is None:
            return None
        info = activity.info()
        attempt, run_id = info.attempt, info.workflow_id or call.transcript_id  # the run's stream
        self.live(
            NewEvent(
                run_id,
                f"model:{call.step}:{call.fallback_index}:{attempt}",
                "model_started",
                {
                    "step": call.step,
                    "attempt": attempt,
                    "provider": call.provider,
                    "model": call.model,
                    "fallback_index": call.fallback_index,
                },
                now_iso(),
            )
        )
        return TokenWriter(
            self.live,
            run_id,
            step=call.step,
            attempt=attempt,
            fallback_index=call.fallback_index,
        )

    async def _model_call(
        self, call: ModelCallInput, messages: list[ChatMessage]
    ) -> ModelCallResult:
        tokens = self._token_writer(call)
        if call.provider == "scripted":
            if call.script_turn is None:
                raise ModelRequestRejected("scripted model: no script turn for this step")
            # Fault injection for demos and benchmarks; randomness is fine in an activity.
            result = await self.breakers.call(
                "model:scripted", lambda: _scripted(call, call.script_turn)
            )
            if tokens is not None and result.message.content:
                for word in re.findall(r"\S+\s*", result.message.content):
                    await tokens(word)  # as a model would stream it
                tokens.flush()
            return result
        provider = self.providers.get(call.provider)
        if provider is None:
            raise ModelRequestRejected(
                f"provider {call.provider!r} is not configured on this worker"
            )
        # Outputs are indexed by the workflow id (stable across continue-as-new), from Temporal.
        messages = await self._dereference(activity.info().workflow_id, messages)
        tools = [self.registry.get(r.name, r.version).schema_for_model() for r in call.tools]
        request = ProviderRequest(
            model=call.model, messages=messages, tools=tools, max_tokens=call.max_tokens
        )
        if tokens is not None and isinstance(provider, StreamingProvider):
            # Tokens reach the run's live stream as they arrive; the result (and its usage,
            # counted once) is the whole answer, as without streaming.
            streaming = provider

            async def streamed() -> ProviderResponse:
                try:
                    return await streaming.stream(request, tokens)
                finally:
                    tokens.flush()

            response = await self.breakers.call(f"model:{call.provider}", streamed)
        else:
            response = await self.breakers.call(
                f"model:{call.provider}", lambda: provider.complete(request)
            )
        size = len(response.message.model_dump_json())
        if size > MAX_ANSWER_BYTES:
            # Taking it would put megabytes in history and every later prompt; retrying would
            # pay for it again. The run charges what was reserved and stops.
            raise ModelAnswerInvalid(
                f"{call.provider} answered with {size} bytes, above the {MAX_ANSWER_BYTES}-byte "
                "limit for one model answer"
            )
        return ModelCallResult(
            message=response.message,
            usage=response.usage,
            model=response.model,
            provider=call.provider,
            finish_reason=response.finish_reason,
        )
