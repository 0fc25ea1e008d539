"""Fork a run from a checkpoint: what `spine replay RUN --from-step N` does.

*Checkpoint N* is a run's state once step N has finished: model turn N answered and its tool calls
done. A fork is a new `AgentWorkflow` run that starts from that state and goes on with step N+1.
Nothing of steps 1..N runs again: the checkpoint is rebuilt from the original's event history
(the `spine.model_call` inputs and results and the `tool.*` results, step by step, across
continue-as-new) into a :class:`~spine.workflows.state.RunState`, the same state a run hands
itself when
it continues as new, and passed as ``AgentWorkflowInput.carry``. It holds:

- the transcript up to the checkpoint (see below);
- the completed side effects, with their compensations and their original idempotency keys, so a
  fork that fails later undoes them (``<key>/undo``) and never redoes them;
- the spend so far (``usage``), so limits count the whole story;
- the agent spec the original pinned at its start (tool versions, policy slice, prices);
- invalid-call and retry counts, and the untrusted text that taint checks look at.

The audit chain and budget reservations are the fork's own (a new workflow id): its audit log
starts at seq 0 and its model calls reserve anew on the account's ledger.

**How the transcript travels.** The fork carries the messages in its input
(``carry.pending_messages``, with ``transcript_len=0``); its first model call writes them to the
transcript store under the fork's own id, verifying them like any other call. The alternative,
copying the rows inside the store with an activity, was rejected because:

- the event history is the source of truth and is all a fork needs: it works when the CLI and
  the workers do not share a disk, when the original's transcript was pruned from the store, and
  when the original ran on another deployment;
- no new activity or workflow code path: a fork is an ordinary continue-as-new-shaped input, so
  the replay-tested workflow code is unchanged.

Its cost is one input payload holding the transcript prefix; a fork whose prefix would exceed
:data:`MAX_CARRIED_BYTES` (far below Temporal's 2 MB payload limit) is refused; fork from an
earlier step instead.

Refusals are :class:`ForkRefused`: one line naming the cause and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, get_args
from uuid import uuid4

from pydantic import BaseModel, TypeAdapter, ValidationError
from temporalio.api.common.v1 import Payloads
from temporalio.api.enums.v1 import RetryState
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from spine.activities.blobs import ref_digest
from spine.activities.errors import MODEL_CORRECTABLE
from spine.activities.tools import Registry
from spine.client.runs import RunHandle, SpineClientError, describe, get_run
from spine.contract import (
    ACTIVITY_MODEL_CALL,
    ACTIVITY_RESOLVE_AGENT,
    SA_ACCOUNT,
    SA_AGENT,
    SA_FORKED_FROM,
    SA_STATUS,
    WORKFLOW_TYPE,
    AgentRequest,
    AgentResult,
    ForkFrom,
    Provider,
    ScriptTurn,
    tool_of,
)
from spine.guardrails.allowlist import Allowlist
from spine.guardrails.approvals import approval_rule, describe_rule
from spine.guardrails.budget import price
from spine.guardrails.policy import Policy
from spine.payloads import (
    EMPTY_DIGEST,
    AgentSpec,
    ChatMessage,
    ModelCallInput,
    ModelCallResult,
    PrincipalView,
    ResolveAgentInput,
    ToolCallInput,
    ToolCallResult,
    chain_digest,
)
from spine.workflows.state import (
    SKIPPED_PREFIX,
    AgentWorkflowInput,
    BudgetState,
    RunState,
    apply_model_turn,
    apply_refusal,
    apply_retries,
    apply_sub_agent,
    apply_tool_result,
    apply_turn_order,
    begin,
    cumulative_amounts,
    told,
)
from spine.workflows.turns import model_path

#: Largest transcript prefix (JSON bytes) a fork carries in its input.
MAX_CARRIED_BYTES = 1_000_000
#: Spine statuses of runs a bulk replay picks up: parked, or ended without completing.
BULK_STATUSES = ("parked", "failed", "compensated", "rejected")
_CLOSED_BADLY = (
    WorkflowExecutionStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT,
)
_SKIPPED_PREFIX = "error: skipped by operator"

#: What `--set` may change, with what it expects. Agent, user, role and account stay: the
#: pinned spec (tools, grants, approval rules) was resolved for them.
SETTABLE = {
    "goal": "text",
    "model.provider": " | ".join(get_args(Provider)),
    "model.name": "a model name with a price in the pinned policy ('' for the default)",
    "model.fallback": "comma-separated [PROVIDER:]MODEL list, or a JSON list",
    "model.script": "a JSON list of scripted turns, or @FILE holding one",
    "model.fail_rate": "0..1 (scripted model only)",
    "limits.max_steps": "an integer above the checkpoint's step",
    "limits.max_usd": "USD, counting what the original spent up to the checkpoint",
}
_SCRIPT = TypeAdapter(list[ScriptTurn])


class ForkRefused(SpineClientError):
    """The fork cannot be made as asked; the message names the cause and the fix."""


# ------------------------------------------------------------------------------ history


@dataclass
class _Activity:
    """One scheduled activity of the original and how it ended."""

    kind: str
    run_id: str
    input: Payloads
    max_attempts: int
    attempt: int = 1
    result: Payloads | None = None
    retry_state: int = 0
    closed_event: int = 0
    """The event id of its completion: calls of one turn that ran at once ended in this order."""


@dataclass
class _Child:
    """A sub-agent run the original started, and its result once it closed."""

    workflow_id: str
    input: Payloads
    result: Payloads | None = None
    closed_event: int = 0


@dataclass
class _Segment:
    """One run (execution) of the original's continue-as-new chain."""

    run_id: str
    input: AgentWorkflowInput
    activities: list[_Activity]
    result: AgentResult | None = None
    children: list[_Child] = field(default_factory=list)

    @property
    def first_step(self) -> int:
        """The step its carry starts after (0 for the chain's first run)."""
        return self.input.carry.step if self.input.carry else 0


@dataclass
class RunHistory:
    """The original run's continue-as-new chain, decoded as far as forking needs."""

    workflow_id: str
    segments: list[_Segment]
    memo: Mapping[str, object] = field(default_factory=dict)
    status: str = ""
    """`SpineStatus` of its latest run (else the workflow's status, lower case)."""


M = TypeVar("M", bound=BaseModel)


async def _decode(converter: DataConverter, payloads: Payloads, cls: type[M]) -> M:
    [value] = await converter.decode(payloads.payloads, [cls])
    if not isinstance(value, cls):
        raise SpineClientError(f"a history payload is not a {cls.__name__}")
    return value


async def load_history(client: Client, workflow_id: str) -> RunHistory:
    """Fetch and decode the history of `workflow_id`'s latest continue-as-new chain.

    Raises:
        SpineClientError: no such run, or the server refuses.
    """
    handle = get_run(client, workflow_id)
    desc = await describe(handle)
    first = desc.raw_description.workflow_execution_info.first_run_id or desc.run_id
    memo = await desc.memo()
    status = desc.typed_search_attributes.get(SA_STATUS) or (
        desc.status.name.lower() if desc.status else "unknown"
    )
    segments: list[_Segment] = []
    run_id: str | None = first
    converter = client.data_converter
    while run_id:
        run_handle = get_run(client, workflow_id, run_id=run_id)
        try:
            history = await run_handle.fetch_history()
        except RPCError as e:
            raise SpineClientError(
                f"cannot read the history of run {workflow_id!r} ({run_id}): {e.message}"
            ) from e
        segment, run_id = await _segment(converter, run_id, history.events)
        segments.append(segment)
    return RunHistory(workflow_id=workflow_id, segments=segments, memo=memo, status=status)


async def history_of(
    workflow_id: str,
    runs: Sequence[tuple[str, Sequence[HistoryEvent]]],
    converter: DataConverter,
) -> RunHistory:
    """A chain's history from events already at hand: ``[(run_id, events), ...]`` in order
    (recorded histories, for instance), decoded as :func:`load_history` decodes the server's."""
    segments = [(await _segment(converter, run_id, events))[0] for run_id, events in runs]
    return RunHistory(workflow_id=workflow_id, segments=segments)


#: The marker a local activity leaves in history (Temporal's core SDK names it so).
LOCAL_ACTIVITY_MARKER = "core_local_activity"


def _resolved_locally(event: HistoryEvent) -> Payloads | None:
    """The spec a run resolved with a local `spine.resolve_agent` (see
    `spine.workflows.calls.resolve_agent`), from its marker; None for any other marker."""
    marker = event.marker_recorded_event_attributes
    if marker.marker_name != LOCAL_ACTIVITY_MARKER or "result" not in marker.details:
        return None
    try:
        data = json.loads(marker.details["data"].payloads[0].data)
    except (KeyError, IndexError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("activity_type") != ACTIVITY_RESOLVE_AGENT:
        return None
    return marker.details["result"]


async def _segment(
    converter: DataConverter, run_id: str, events: Sequence[HistoryEvent]
) -> tuple[_Segment, str | None]:
    """Decode one run's events; returns it and the run it continued as new into, if any."""
    request: AgentWorkflowInput | None = None
    result: AgentResult | None = None
    activities: dict[int, _Activity] = {}
    children: dict[int, _Child] = {}
    following: str | None = None
    for event in events:
        if event.HasField("start_child_workflow_execution_initiated_event_attributes"):
            initiated = event.start_child_workflow_execution_initiated_event_attributes
            children[event.event_id] = _Child(initiated.workflow_id, initiated.input)
        elif event.HasField("child_workflow_execution_completed_event_attributes"):
            finished = event.child_workflow_execution_completed_event_attributes
            if finished.initiated_event_id in children:
                children[finished.initiated_event_id].result = finished.result
                children[finished.initiated_event_id].closed_event = event.event_id
        if event.HasField("workflow_execution_started_event_attributes"):
            started = event.workflow_execution_started_event_attributes
            request = await _decode(converter, started.input, AgentWorkflowInput)
        elif event.HasField("activity_task_scheduled_event_attributes"):
            scheduled = event.activity_task_scheduled_event_attributes
            activities[event.event_id] = _Activity(
                kind=scheduled.activity_type.name,
                run_id=run_id,
                input=scheduled.input,
                max_attempts=scheduled.retry_policy.maximum_attempts or 0,
            )
        elif event.HasField("activity_task_started_event_attributes"):
            attempt = event.activity_task_started_event_attributes
            activities[attempt.scheduled_event_id].attempt = attempt.attempt
        elif event.HasField("activity_task_completed_event_attributes"):
            completed = event.activity_task_completed_event_attributes
            activities[completed.scheduled_event_id].result = completed.result
            activities[completed.scheduled_event_id].closed_event = event.event_id
        elif event.HasField("activity_task_failed_event_attributes"):
            failed = event.activity_task_failed_event_attributes
            activities[failed.scheduled_event_id].retry_state = failed.retry_state
        elif event.HasField("activity_task_timed_out_event_attributes"):
            timed_out = event.activity_task_timed_out_event_attributes
            activities[timed_out.scheduled_event_id].retry_state = timed_out.retry_state
        elif event.HasField("marker_recorded_event_attributes"):
            resolved = _resolved_locally(event)
            if resolved is not None:
                activities[event.event_id] = _Activity(
                    kind=ACTIVITY_RESOLVE_AGENT,
                    run_id=run_id,
                    input=Payloads(),
                    max_attempts=1,
                    result=resolved,
                    closed_event=event.event_id,
                )
        elif event.HasField("workflow_execution_completed_event_attributes"):
            done = event.workflow_execution_completed_event_attributes
            result = await _decode(converter, done.result, AgentResult)
        elif event.HasField("workflow_execution_continued_as_new_event_attributes"):
            continued = event.workflow_execution_continued_as_new_event_attributes
            following = continued.new_execution_run_id or None
    if request is None:
        raise SpineClientError(f"run {run_id} has no start event in its history")
    segment = _Segment(run_id, request, list(activities.values()), result)
    segment.children = list(children.values())
    return segment, following


# ---------------------------------------------------------------------------- checkpoint


@dataclass
class _Turn:
    """A model call of the original that succeeded."""

    step: int
    run_id: str
    call: ModelCallInput
    result: ModelCallResult

    @property
    def answer_at(self) -> int:
        """Position of the model's answer in the transcript."""
        return self.call.base_len + len(self.call.new_messages)


@dataclass
class _Calls:
    """The original's model and tool calls, decoded once."""

    turns: dict[int, _Turn] = field(default_factory=dict)
    tools: dict[tuple[int, str], tuple[ToolCallInput, ToolCallResult]] = field(default_factory=dict)
    #: (segment index, completion event id) per tool call that has a result: completion order.
    ended: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    #: (step, failed attempts as the workflow counts them) per call that failed for good.
    failures: list[tuple[int, int]] = field(default_factory=list)
    #: Idempotency keys of side effects a compensation undid.
    undone: set[str] = field(default_factory=set)
    #: (step, call id) -> (child workflow id, its result) per sub-agent call that finished.
    children: dict[tuple[int, str], tuple[str, AgentResult]] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A run's state once step `step` finished, ready to hand to a new run."""

    workflow_id: str
    run_id: str
    step: int
    request: AgentWorkflowInput
    carry: RunState
    status: str = ""
    """The original's status when the checkpoint was read (see `RunHistory.status`)."""

    @property
    def spec(self) -> AgentSpec:
        return self.carry.agent


async def checkpoint(history: RunHistory, step: int, converter: DataConverter) -> Checkpoint:
    """Rebuild the state of `history`'s run at the end of `step` (0: before the first step).

    The state is folded from the history through the same transitions the workflow applied
    (:mod:`spine.workflows.state`), then rebased: the fork carries the transcript in its input
    and starts its own audit chain and ledger reservations.

    Raises:
        ForkRefused: the run has no such finished step, a side effect up to the step was undone,
            or the history cannot be read back consistently.
    """
    wid = history.workflow_id
    if step < 0:
        raise ForkRefused(f"--from-step must be 0 or more, not {step}")
    usable = [s for s in history.segments if s.first_step <= step]
    if not usable:
        origin = history.memo.get("forked_from")
        source = origin.get("workflow_id") if isinstance(origin, dict) else None
        raise ForkRefused(
            f"run {wid!r} starts after step {history.segments[0].first_step}"
            + (f" (it was forked from {source!r}: fork that run instead)" if source else "")
        )
    segment = usable[-1]
    spec = await _spec(segment, converter, wid)
    calls = await _decode_calls(history, converter, spec)
    last = max(calls.turns, default=segment.first_step)
    if step > last:
        raise ForkRefused(
            f"run {wid!r} finished {last} step(s); --from-step must be at most {last}"
        )
    if step in calls.turns and not calls.turns[step].result.message.tool_calls:
        raise ForkRefused(
            f"step {step} of run {wid!r} is the model's final answer; fork from an earlier step"
        )
    prefix = _prefix(history, segment, spec, calls, step)
    state = _fold(wid, segment, spec, calls, prefix, step)
    for effect in state.side_effects:
        if effect.idempotency_key in calls.undone:
            raise ForkRefused(
                f"run {wid!r} undid {effect.tool}@step{effect.step} (compensated), so a fork "
                f"from step {step} would build on something that no longer stands; fork from "
                f"step {effect.step - 1} instead"
            )
    request = segment.input.model_copy(deep=True)
    request.carry = None
    if request.model is not None and request.model.script:
        carried = segment.input.carry
        start = (carried.script_pos if carried else 0) + step - segment.first_step
        request.model.script = request.model.script[start:]
    # Rebased: the transcript travels in the input; audit chain and reservations are the fork's.
    carry = state.model_copy(
        update={
            "step": step,
            "transcript_len": 0,
            "transcript_digest": EMPTY_DIGEST,
            "pending_messages": prefix,
            "script_pos": 0,
            "path": [],
            "budget": BudgetState(last_input_tokens=state.budget.last_input_tokens),
            "audit_seq": 0,
        }
    )
    run_id = calls.turns[step].run_id if step in calls.turns else segment.run_id
    return Checkpoint(wid, run_id, step, request, carry, status=history.status)


async def state_at(history: RunHistory, step: int, converter: DataConverter) -> RunState:
    """The state `history`'s run held at the end of `step`, folded from its history through
    the workflow's own transitions (:mod:`spine.workflows.state`), as the run had it: not rebased
    for a fork (see :func:`checkpoint` for that, with every check a fork needs).

    Raises:
        ForkRefused: the history has no such step or cannot be read back consistently.
    """
    usable = [s for s in history.segments if s.first_step <= step]
    if not usable:
        raise ForkRefused(f"run {history.workflow_id!r} starts after step {step}")
    segment = usable[-1]
    spec = await _spec(segment, converter, history.workflow_id)
    calls = await _decode_calls(history, converter, spec)
    if step not in calls.turns and step != segment.first_step:
        raise ForkRefused(f"run {history.workflow_id!r} has no step {step} in its history")
    if step in calls.turns and not calls.turns[step].result.message.tool_calls:
        # The final answer: what the model heard before it is all there is.
        prefix = [
            *_positions(calls)[: calls.turns[step].answer_at],
            calls.turns[step].result.message,
        ]
        known = _known(prefix, len(prefix), history.workflow_id, step)
    else:
        known = _prefix(history, segment, spec, calls, step)
    return _fold(history.workflow_id, segment, spec, calls, known, step)


def _fold(
    wid: str,
    segment: _Segment,
    spec: AgentSpec,
    calls: _Calls,
    prefix: list[ChatMessage],
    step: int,
) -> RunState:
    """The run state at the end of `step`, from the segment's start through each recorded turn.

    Each model turn and each tool call's outcome is applied as the workflow applied it; what a
    call left no activity result for (a refusal, a skip, a local tool) is read from what the
    model heard next (`prefix`).
    """
    state = (
        segment.input.carry.model_copy(deep=True)
        if segment.input.carry is not None
        else RunState(spec=spec)
    )
    state.spec = spec
    if segment.input.carry is None:
        begin(state, segment.input.goal)
    by_name = {t.name: t for t in spec.tools}
    for k in range(segment.first_step + 1, step + 1):
        turn = calls.turns[k]
        state.step = k
        state.transcript_len, state.transcript_digest = turn.call.base_len, turn.call.base_digest
        state.pending_messages = list(turn.call.new_messages)
        usage = turn.result.usage
        usd = price(
            spec.prices, usage.input_tokens, usage.output_tokens, turn.result.model, turn.call.model
        )
        apply_model_turn(state, turn.result, usd or 0.0)
        heard = {
            m.tool_call_id: m
            for m in prefix[
                turn.answer_at + 1 : turn.answer_at + 1 + len(turn.result.message.tool_calls)
            ]
        }
        # As the run applied them: in the order the calls ended (calls of one turn may run at
        # once), those that ended without an activity (refused, local) first; then the model
        # reads them in its own order.
        asked = turn.result.message.tool_calls
        ended = sorted(
            range(len(asked)), key=lambda i: (calls.ended.get((k, asked[i].id), (-1, -1)), i)
        )
        for call in (asked[i] for i in ended):
            done = calls.tools.get((k, call.id))
            if done is not None:
                used, output = done
                descriptor = by_name.get(used.tool)
                if descriptor is None:
                    raise ForkRefused(
                        f"run {wid!r} called tool {used.tool!r}, which its spec lacks"
                    )
                apply_retries(state, output.attempt - 1)
                apply_tool_result(
                    state,
                    call,
                    descriptor,
                    used.args,
                    output.output,
                    used.idempotency_key or "",
                    output.untrusted_filter,
                )
                continue
            said = heard.get(call.id)
            if said is None:
                continue
            if said.is_error and (said.content or "").startswith(SKIPPED_PREFIX):
                told(state, said)
            elif said.is_error:
                text = said.content or ""
                known = by_name.get(call.name)
                apply_refusal(
                    state,
                    call,
                    text,
                    outcome="failed"
                    if text.startswith(tuple(f"error: {kind}:" for kind in MODEL_CORRECTABLE))
                    else "refused",
                    side_effects=bool(known and known.side_effects),
                )
            elif call.name in by_name:
                # A local (read-only) tool leaves its result in a marker, not an activity event;
                # what the model heard is the output, as the workflow wrote it down.
                output = json.loads(said.content or "{}")
                apply_tool_result(state, call, by_name[call.name], call.args or {}, output, "")
                child = calls.children.get((k, call.id))
                if child is not None:  # a sub-agent: its spend and standing effects, as the run
                    apply_sub_agent(state, child[0], child[1], carved_usd=0.0)
        apply_turn_order(state, [call.id for call in asked])
    for failed_at, attempts in calls.failures:
        if segment.first_step < failed_at <= step:
            apply_retries(state, attempts)
    return state


async def _spec(segment: _Segment, converter: DataConverter, wid: str) -> AgentSpec:
    """The spec pinned at the chain's start (carried by every later run)."""
    if segment.input.carry is not None:
        return segment.input.carry.spec
    for act in segment.activities:
        if act.kind == ACTIVITY_RESOLVE_AGENT and act.result is not None:
            return await _decode(converter, act.result, AgentSpec)
    raise ForkRefused(f"run {wid!r} never resolved its agent, so there is nothing to carry")


async def _decode_calls(history: RunHistory, converter: DataConverter, spec: AgentSpec) -> _Calls:
    """Every model and tool call of the chain, decoded once."""
    compensation_tools = {t.compensation for t in spec.tools if t.compensation}
    calls = _Calls()
    for position, segment in enumerate(history.segments):
        for child in segment.children:
            if child.result is None:
                continue
            link = (await _decode(converter, child.input, AgentWorkflowInput)).parent
            if link is not None:
                ended = await _decode(converter, child.result, AgentResult)
                calls.children[(link.step, link.call_id)] = (child.workflow_id, ended)
                calls.ended[(link.step, link.call_id)] = (position, child.closed_event)
        for act in segment.activities:
            if act.kind == ACTIVITY_MODEL_CALL:
                call = await _decode(converter, act.input, ModelCallInput)
                step = call.step
                if act.result is not None:
                    result = await _decode(converter, act.result, ModelCallResult)
                    calls.turns[step] = _Turn(step, act.run_id, call, result)
            elif tool_of(act.kind) is not None:
                used = await _decode(converter, act.input, ToolCallInput)
                if used.tool in compensation_tools:
                    if act.result is not None and used.idempotency_key:
                        calls.undone.add(used.idempotency_key.removesuffix("/undo"))
                    continue
                step = used.step
                if act.result is not None:
                    output = await _decode(converter, act.result, ToolCallResult)
                    calls.tools[(step, used.call_id)] = (used, output)
                    calls.ended[(step, used.call_id)] = (position, act.closed_event)
            else:
                continue
            # As `AgentWorkflow` counts: a call that ran out of attempts used its whole cap (the
            # retries of a call that succeeded are in its result's `attempt`).
            exhausted = act.retry_state == RetryState.RETRY_STATE_MAXIMUM_ATTEMPTS_REACHED
            if act.result is None and exhausted:
                calls.failures.append((step, max(act.max_attempts, 1) - 1))
    _check_digests(calls, history.workflow_id)
    return calls


def _check_digests(calls: _Calls, wid: str) -> None:
    """Each call built on the transcript the calls before it sent (the store's own check)."""
    messages = _positions(calls)
    digests = [EMPTY_DIGEST]
    for message in messages:
        digests.append(chain_digest(digests[-1], message) if message is not None else "")
    for turn in calls.turns.values():
        if digests[turn.call.base_len] not in ("", turn.call.base_digest):
            raise ForkRefused(
                f"the transcript of run {wid!r} cannot be rebuilt from its history at step "
                f"{turn.step}; fork from an earlier step"
            )


def _positions(calls: _Calls) -> list[ChatMessage | None]:
    """Every message the model calls sent, at its position (None where none is known)."""
    messages: list[ChatMessage | None] = []
    for turn in sorted(calls.turns.values(), key=lambda t: t.step):
        call = turn.call
        if len(messages) < turn.answer_at:
            messages.extend([None] * (turn.answer_at - len(messages)))
        messages[call.base_len : turn.answer_at] = call.new_messages
    return messages


def _prefix(
    history: RunHistory, segment: _Segment, spec: AgentSpec, calls: _Calls, step: int
) -> list[ChatMessage]:
    """The transcript at the end of `step`: up to its answer, then its tool results."""
    wid = history.workflow_id
    messages = _positions(calls)
    turn = calls.turns.get(step)
    if turn is None:
        carried = segment.input.carry
        if carried is None:  # step 0: what the workflow starts every run with
            return [
                ChatMessage(role="system", content=spec.instructions),
                ChatMessage(role="user", content=segment.input.goal),
            ]
        # The run starts at `step` with this carry (forked or continued as new).
        head = _known(messages[: carried.transcript_len], carried.transcript_len, wid, step)
        return [*head, *carried.pending_messages]
    head = _known(messages[: turn.answer_at], turn.answer_at, wid, step)
    following = calls.turns.get(step + 1)
    if following is not None and following.call.base_len == turn.answer_at:
        # The next call sent exactly what the model heard: the answer, then one result per call.
        return [*head, *following.call.new_messages]
    results = []
    for call in turn.result.message.tool_calls:
        done = calls.tools.get((step, call.id))
        if done is None:
            # A refused or skipped call leaves only the workflow's wording, sent with the next
            # turn; a local tool's result is in a marker without its input; a parked or
            # rejected call has no result at all.
            raise ForkRefused(
                f"the result of {call.name} at step {step} of run {wid!r} is not in its history "
                f"(the step did not finish, or the run stopped before step {step + 1}); fork "
                f"from step {step - 1}"
            )
        results.append(
            ChatMessage(
                role="tool",
                tool_call_id=call.id,
                name=call.name,
                content=json.dumps(done[1].output, sort_keys=True),
            )
        )
    return [*head, turn.result.message, *results]


def _known(
    messages: Sequence[ChatMessage | None], length: int, wid: str, step: int
) -> list[ChatMessage]:
    """`messages`, checked to be all `length` of them."""
    known = [m for m in messages if m is not None]
    if len(known) != length:
        raise ForkRefused(f"the transcript of run {wid!r} has gaps before step {step}")
    return known


# -------------------------------------------------------------------------------- changes


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; later items win.

    Raises:
        ValueError: an item has no ``=`` or names a key that cannot be changed.
    """
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {item!r} is not KEY=VALUE")
        if key not in SETTABLE:
            raise ValueError(f"--set cannot change {key!r}; it can change: {', '.join(SETTABLE)}")
        found[key] = value
    return found


def _script_value(value: str) -> list[ScriptTurn]:
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read script file '{path}': {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"model.script is not valid JSON: {e.msg}") from e
    if isinstance(data, dict) and "script" in data:
        data = data["script"]
    try:
        return _SCRIPT.validate_python(data)
    except ValidationError as e:
        raise ValueError(f"model.script is not a valid script: {e.errors()[0]['msg']}") from e


def _fallback_value(value: str) -> list[str]:
    if value.strip().startswith("["):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"model.fallback is not valid JSON: {e.msg}") from e
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise ValueError("model.fallback must be a list of model names")
        return data
    return [v.strip() for v in value.split(",") if v.strip()]


def apply_changes(
    point: Checkpoint,
    sets: Mapping[str, str],
    *,
    user: str | None = None,
    role: str | None = None,
) -> AgentWorkflowInput:
    """The fork's request: the original's with `sets` applied, naming the run and step to fork
    from (``fork_from``). The worker rebuilds the state from the original's history and checks
    it against today's policy; nothing of the state travels from here.

    `user` and `role` are who forks (default: the original's); they must be the signing
    principal and a role the policy grants them. A new goal replaces the user's message when
    forking from step 0; later it is added as a new user message. A new provider without a new
    name uses the policy's default model for it.

    Raises:
        ValueError: a value is malformed (a usage error).
        ForkRefused: the result cannot run on the pinned spec (no price, no steps left, ...).
    """
    data = point.request.model_dump(mode="json", exclude={"carry", "fork_from"})
    data["user"] = user or data["user"]
    data["role"] = role or data["role"]
    data["fork_from"] = {"workflow_id": point.workflow_id, "step": point.step}
    model = dict(data.get("model") or {"provider": point.spec.default_provider})
    limits = dict(data.get("limits") or {})
    if "model.provider" in sets and sets["model.provider"] != model.get("provider"):
        model.update(provider=sets["model.provider"], name=None, fallback=[])
    for key, value in sets.items():
        if key == "goal":
            data["goal"] = value
        elif key == "model.provider":
            continue
        elif key == "model.name":
            model["name"] = value or None
        elif key == "model.fallback":
            model["fallback"] = _fallback_value(value)
        elif key == "model.script":
            model["script"] = [t.model_dump(mode="json") for t in _script_value(value)]
        elif key == "model.fail_rate":
            model["fail_rate"] = _number(key, value)
        elif key == "limits.max_steps":
            limits["max_steps"] = int(_number(key, value))
        elif key == "limits.max_usd":
            limits["max_usd"] = _number(key, value)
    if model.get("provider") != "scripted":
        model["script"] = []
    if any(k.startswith("model.") for k in sets):
        data["model"] = model
    data["limits"] = limits or None
    try:
        request = AgentWorkflowInput.model_validate(data)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ValueError(f"invalid --set: {where}: {error['msg']}") from e
    _check_runnable(point, request)
    return request


def with_goal(state: RunState, step: int, original_goal: str, goal: str) -> RunState:
    """A checkpoint's state with a changed goal: it replaces the user's message at step 0, and
    is added as a new user message later (what the model did so far was for the old goal)."""
    if goal == original_goal:
        return state
    state = state.model_copy(deep=True)
    if step == 0:
        state.pending_messages[1] = ChatMessage(role="user", content=goal)
    else:
        state.pending_messages.append(ChatMessage(role="user", content=goal))
    return state


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--set {key}={value!r}: not a number") from None


def _shown(key: str, value: str) -> str:
    if key == "model.script" and not value.startswith("@"):
        return "<script>"
    return value if len(value) <= 60 else value[:57] + "..."


def _check_runnable(point: Checkpoint, request: AgentWorkflowInput) -> None:
    """What the workflow would stop on at once, refused here instead (same rules)."""
    spec, wid, step = point.spec, point.workflow_id, point.step
    choice = request.model
    path = model_path(choice, spec)
    provider, name = path[0]
    if not name:
        raise ForkRefused(f"no model name given and the policy has no default for {provider!r}")
    for _, model in path:
        if model not in spec.prices:
            raise ForkRefused(
                f"model {model!r} has no price in the policy run {wid!r} pinned "
                f"({spec.policy_version}); priced: {', '.join(sorted(spec.prices))}"
            )
    if provider == "scripted" and not (choice and choice.script):
        raise ForkRefused(
            f"the scripted model of run {wid!r} has no turn after step {step}; give one with "
            "--set model.script=@FILE"
        )
    limits = request.limits
    if limits and limits.max_steps is not None and limits.max_steps <= step:
        raise ForkRefused(f"limits.max_steps={limits.max_steps} leaves no step after step {step}")


# -------------------------------------------------------------------------------- versions


def check_versions(point: Checkpoint, registry: Registry) -> None:
    """Refuse a checkpoint whose pinned tool versions the current workers would not serve.

    Raises:
        ForkRefused: naming the first tool and version that is not served.
    """
    served: dict[str, list[int]] = {}
    for definition in registry.tools:
        served.setdefault(definition.name, []).append(definition.version)
    for pinned in point.spec.tools:
        if pinned.version in served.get(pinned.name, []):
            continue
        have = served.get(pinned.name)
        serves = (
            f"it serves version(s) {', '.join(str(v) for v in sorted(have))}"
            if have
            else "it does not serve that tool at all"
        )
        raise ForkRefused(
            f"run {point.workflow_id!r} pinned tool {pinned.name!r} version {pinned.version}, "
            f"which the current worker registry does not serve ({serves}); run a worker that "
            "serves it (SPINE_AGENTS), or start a new run"
        )


def current_registry() -> Registry:
    """The registry a worker started here would serve (agent modules from ``SPINE_AGENTS``).

    Raises:
        SpineClientError: the agent modules cannot be loaded.
    """
    from spine.plugin import load_registry  # lazily: it imports every activity

    spec = os.environ.get("SPINE_AGENTS") or "spine.demo.agent"
    modules = tuple(m.strip() for m in spec.split(",") if m.strip())
    try:
        return load_registry(modules)
    except (ImportError, ValueError) as e:
        raise SpineClientError(f"cannot load agent modules {spec!r}: {e}") from e


# --------------------------------------------------------------------------------- forking


@dataclass
class ForkPlan:
    """A fork, decided but not started."""

    point: Checkpoint
    new_id: str
    request: AgentWorkflowInput
    sets: Mapping[str, str]

    @property
    def forked_from(self) -> dict[str, object]:
        """The memo linking the fork to its original."""
        p = self.point
        return {"workflow_id": p.workflow_id, "run_id": p.run_id, "step": p.step}

    def as_json(self) -> dict[str, object]:
        carry = self.point.carry
        return {
            "workflow_id": self.new_id,
            "forked_from": self.forked_from,
            "changes": dict(self.sets),
            "carried": {
                "steps": self.point.step,
                "messages": len(carry.pending_messages),
                "side_effects": [
                    {"step": e.step, "tool": e.tool, "idempotency_key": e.idempotency_key}
                    for e in carry.side_effects
                ],
                "usage": carry.usage.model_dump(mode="json"),
                "tools": [f"{t.name}@{t.version}" for t in carry.spec.tools],
            },
        }


def fork_id(workflow_id: str, step: int) -> str:
    """A fresh id for a fork of `workflow_id` at `step`: ``<id>-fork<step>-<6 hex digits>``."""
    return f"{workflow_id}-fork{step}-{uuid4().hex[:6]}"


async def plan_fork(
    client: Client,
    workflow_id: str,
    step: int,
    sets: Mapping[str, str],
    *,
    registry: Registry,
    new_id: str | None = None,
    user: str | None = None,
    role: str | None = None,
) -> ForkPlan:
    """Rebuild `workflow_id` at the end of `step`, apply `sets`, and check it can run (what
    ``--dry-run`` shows; the worker rebuilds and checks it again when the fork starts).

    Raises:
        ForkRefused: see :func:`checkpoint`, :func:`apply_changes` and :func:`check_versions`.
        ValueError: a `sets` value is malformed.
        SpineClientError: the run cannot be read.
    """
    history = await load_history(client, workflow_id)
    point = await checkpoint(history, step, client.data_converter)
    check_versions(point, registry)
    request = apply_changes(point, sets, user=user, role=role)
    size = len(point.carry.model_dump_json())
    if size > MAX_CARRIED_BYTES:
        raise ForkRefused(
            f"the state of run {workflow_id!r} at step {step} is {size // 1000} kB, above the "
            f"{MAX_CARRIED_BYTES // 1000} kB a fork may carry in its input; fork from an "
            "earlier step"
        )
    return ForkPlan(point, new_id or fork_id(workflow_id, step), request, dict(sets))


async def forked_from_registered(client: Client) -> bool:
    """Whether the namespace has the `SpineForkedFrom` search attribute (and SAs are on)."""
    if os.environ.get("SPINE_SEARCH_ATTRIBUTES", "1").lower() in ("0", "false"):
        return False
    try:
        found = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError:
        return False  # not allowed to ask (e.g. Temporal Cloud API keys): the memo still links
    return SA_FORKED_FROM.name in found.custom_attributes


def referenced_outputs(carry: RunState) -> list[str]:
    """Digests of the stored outputs (see `spine.activities.blobs`) a carry refers to."""
    found = [ref_digest(m.content) for m in carry.pending_messages if m.role == "tool"]
    found += [ref_digest(e.output) for e in carry.side_effects]
    return sorted({d for d in found if d})


async def start_fork(
    client: Client, plan: ForkPlan, *, task_queue: str, link_attribute: bool
) -> RunHandle:
    """Start the planned fork, linked to its original by memo (and search attribute).

    Raises:
        SpineClientError: the id is taken or the server refuses the start.
    """
    request = plan.request
    pairs = []
    if os.environ.get("SPINE_SEARCH_ATTRIBUTES", "1").lower() not in ("0", "false"):
        pairs = [
            SearchAttributePair(SA_AGENT, request.agent),
            SearchAttributePair(SA_ACCOUNT, request.account),
            SearchAttributePair(SA_STATUS, "running"),
        ]
        if link_attribute:
            pairs.append(SearchAttributePair(SA_FORKED_FROM, plan.point.workflow_id))
    origin = plan.point
    try:
        return await client.start_workflow(
            WORKFLOW_TYPE,
            request,
            id=plan.new_id,
            task_queue=task_queue,
            result_type=AgentResult,
            memo={"forked_from": plan.forked_from},
            search_attributes=TypedSearchAttributes(pairs) if pairs else None,
            static_summary=(
                f"{request.agent}: {request.goal[:60]} "
                f"(fork of {origin.workflow_id} at step {origin.step})"
            ),
            static_details="\n".join(
                [
                    f"- **forked from**: {origin.workflow_id} ({origin.run_id}) at step "
                    f"{origin.step}",
                    *(f"- **{k}**: {_shown(k, v)}" for k, v in plan.sets.items()),
                    f"- **agent**: {request.agent}",
                    f"- **user**: {request.user}",
                    f"- **account**: {request.account}",
                ]
            ),
        )
    except WorkflowAlreadyStartedError as e:
        raise SpineClientError(
            f"a run with id {plan.new_id!r} already exists in namespace {client.namespace!r}; "
            "pick another --id"
        ) from e
    except RPCError as e:
        raise SpineClientError(f"cannot start fork {plan.new_id!r}: {e.message}") from e


# ------------------------------------------------------------------------------------ bulk


@dataclass
class Candidate:
    """A run a bulk replay found, and whether it qualifies."""

    workflow_id: str
    run_id: str
    status: str
    eligible: bool


async def find_runs(client: Client, query: str) -> list[Candidate]:
    """The latest run of each Spine workflow matching the visibility `query`.

    A run qualifies when it is parked or ended without completing (`SpineStatus` failed,
    compensated or rejected; or the workflow itself failed, was terminated or timed out).

    Raises:
        SpineClientError: the query is invalid or the server refuses it.
    """
    full = f"WorkflowType = '{WORKFLOW_TYPE}' AND ({query})"
    seen: dict[str, Candidate] = {}
    try:
        async for execution in client.list_workflows(full):
            if execution.status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                continue
            if execution.id in seen:
                continue
            spine = execution.typed_search_attributes.get(SA_STATUS)
            state = execution.status.name.lower() if execution.status else "unknown"
            if execution.status in _CLOSED_BADLY:
                status, eligible = state, True
            else:
                status, eligible = spine or state, spine in BULK_STATUSES
            seen[execution.id] = Candidate(execution.id, execution.run_id, status, eligible)
    except RPCError as e:
        if e.status == RPCStatusCode.INVALID_ARGUMENT:
            raise SpineClientError(f"invalid --query {query!r}: {e.message}") from e
        raise SpineClientError(f"cannot list runs for --query {query!r}: {e.message}") from e
    return sorted(seen.values(), key=lambda c: c.workflow_id)


async def existing_forks(client: Client, workflow_id: str) -> list[str]:
    """Ids of runs forked from `workflow_id` (needs `SpineForkedFrom`; visibility may lag)."""
    query = f"{SA_FORKED_FROM.name} = '{workflow_id}'"
    try:
        return sorted({w.id async for w in client.list_workflows(query)})
    except RPCError as e:
        raise SpineClientError(f"cannot list forks of {workflow_id!r}: {e.message}") from e


# ------------------------------------------------------------------------- on the worker


async def worker_checkpoint(
    client: Client,
    fork_from: ForkFrom,
    request: AgentRequest,
    principal: PrincipalView,
    policy: Policy,
    registry: Registry,
) -> RunState:
    """The state a fork starts from, rebuilt by the worker (``spine.fork_state``).

    The original's history is read with the worker's own client and folded as :func:`checkpoint`
    does; the fork then runs on *today's* policy: its agent is resolved anew for the fork's role
    and account, and the fork is refused, naming the rule, where today's policy is narrower than
    what the original did up to the step (a tool no longer granted, a call a rule added since
    would have made wait). A principal may fork their own runs; forking another's needs an
    operator role. The account and agent stay the original's.

    Raises:
        ForkRefused: the fork may not be made; SpineClientError: the original cannot be read.
    """
    from spine.activities.llm import build_spec  # lazily: it imports the activity layer

    history = await load_history(client, fork_from.workflow_id)
    point = await checkpoint(history, fork_from.step, client.data_converter)
    original = point.request
    wid = point.workflow_id
    if (original.agent, original.account) != (request.agent, request.account):
        raise ForkRefused(
            f"a fork of {wid!r} runs agent {original.agent!r} on account {original.account!r}, "
            f"not {request.agent!r} on {request.account!r}"
        )
    owner = point.carry.principal or original.user
    operators = set(policy.runtime.operator_roles)
    if principal.name != owner and not operators & set(principal.roles):
        raise ForkRefused(
            f"{principal.name!r} may fork only their own runs ({wid!r} is {owner!r}'s) unless "
            f"they hold an operator role ({', '.join(sorted(operators))})"
        )
    spec = build_spec(
        registry,
        policy,
        ResolveAgentInput(agent=request.agent, role=request.role, account=request.account),
        search_attributes=point.spec.search_attributes,
    )
    narrowed = _narrowed(point, spec, request.role)
    if narrowed:
        raise ForkRefused(f"today's policy is narrower than what {wid!r} did: {narrowed}")
    state = with_goal(point.carry, point.step, original.goal, request.goal)
    return state.model_copy(
        update={
            "spec": spec,
            "principal": principal.name,
            "path": [f"step {point.step}: forked from {wid} ({point.run_id})"],
        }
    )


def _narrowed(point: Checkpoint, spec: AgentSpec, role: str) -> str | None:
    """Where today's `spec` forbids, or would have stopped, what the original did by the step."""
    allowlist = Allowlist(spec, role)
    pinned = [r.model_dump() for r in point.spec.approval_rules]
    totals: dict[str, float] = {}
    for effect in point.carry.side_effects:
        denied = allowlist.denial(effect.tool)
        if denied:
            return f"{denied} (it ran at step {effect.step})"
        found = approval_rule(
            effect.tool,
            effect.args,
            1.0,  # what the model said of its confidence back then is not in question here
            spec.approval_rules,
            untrusted_seen=point.carry.untrusted_seen,
            totals=totals,
        )
        if found is not None and found[1].model_dump() not in pinned:
            reason, rule = found
            return (
                f"a rule added since ({describe_rule(rule)}) would have made {effect.tool} at "
                f"step {effect.step} wait for approval: {reason}"
            )
        state = point.carry.model_copy(update={"spec": spec, "totals": totals})
        for key, amount in cumulative_amounts(state, effect.tool, effect.args):
            totals[key] = totals.get(key, 0.0) + amount
    return None
