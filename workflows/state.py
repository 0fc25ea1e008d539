"""A run's state, in one model, and the deterministic steps that change it.

:class:`RunState` is everything a run knows besides its transcript (which lives in the transcript
store and is referenced by length and digest): the pinned agent spec, the step, usage and spend,
completed side effects, the run's side of the account ledger, the untrusted text seen (taint),
retries used and the path taken. It *is* the continue-as-new carry: a run hands its state to the
next run of its chain unchanged.

The ``apply_*`` functions are the only way the state changes when something happens (a model
turn was answered, a tool call finished or was refused, a compensation ran). They are
deterministic, do no I/O and call no Temporal API, so three readers share them:

- :class:`~spine.workflows.agent.AgentWorkflow`, as the run happens;
- :mod:`spine.client.forks` (``spine replay``), folding a recorded history up to a step;
- the unit tests, with no server at all.

Stdlib and pydantic only (plus Spine's models): a sandbox passthrough module.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

from spine.contract import (
    MAX_FAILED_CALLS_SHOWN,
    AgentRequest,
    AgentResult,
    FailedCall,
    RunStatus,
    SideEffect,
    Usage,
)
from spine.guardrails import taint
from spine.payloads import (
    EMPTY_DIGEST,
    AgentSpec,
    ChatMessage,
    ModelCallResult,
    ParentRun,
    ToolCall,
    ToolDescriptor,
    chain_digest,
)


class StopRun(Exception):  # noqa: N818  # control flow, not an error: the run ends
    """Unwinds the loop so the run finishes with `status` and `reason` (raised by guards too).

    Args:
        keep_status: Keep `failed` even when compensation succeeds (budget exhausted, abort).
        compensate: Undo completed side effects (unless the status is `completed`).
    """

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


class BudgetState(BaseModel):
    """The run's side of the account ledger: what to settle next and how far it has degraded."""

    to_commit: dict[str, float] = Field(default_factory=dict)
    to_release: list[str] = Field(default_factory=list)
    ledger_fraction: float = 0.0
    """The account's share committed or reserved, as the ledger last said (sizes blocks)."""
    ledger_spent_fraction: float = 0.0
    """The account's share committed, as the ledger last said (degrade and ask thresholds)."""
    last_input_tokens: int = 0
    degraded_to: str | None = None
    approved_to_continue: bool = False
    block_id: str | None = None
    block_usd: float = 0.0
    block_spent_usd: float = 0.0


class RunState(BaseModel):
    """A run's state; carried across continue-as-new and rebuilt by forks."""

    step: int = 0
    usage: Usage = Field(default_factory=Usage)
    side_effects: list[SideEffect] = Field(default_factory=list)
    transcript_len: int = 0
    transcript_digest: str = EMPTY_DIGEST
    pending_messages: list[ChatMessage] = Field(
        default_factory=list,
        description="Messages not yet in the transcript store: they go with the next model call.",
    )
    invalid_calls: int = 0
    script_pos: int = 0
    retries: int = 0
    path: list[str] = Field(default_factory=list)
    budget: BudgetState = Field(default_factory=BudgetState)
    audit_seq: int = 0
    audit_head: str = Field(
        default="", description="The audit chain's head as the store last reported it."
    )
    audit_stored: int = Field(default=0, description="Entries the store last reported.")
    untrusted: str = Field(
        default="", description="Tokens of every untrusted output seen (guardrails/taint.py)."
    )
    untrusted_seen: bool = False
    totals: dict[str, float] = Field(
        default_factory=dict,
        description="What cumulative approval rules count, by `tool:arg:per-value` (this run).",
    )
    principal: str = Field(default="", description="The verified principal who started it.")
    context_bytes: int = Field(
        default=0, description="Bytes of every message sent to the model so far (a bound)."
    )
    carved_usd: float = Field(
        default=0.0,
        description="Budget carved out for sub-agents still running (not yet spent, not free).",
    )
    failed_calls: list[FailedCall] = Field(
        default_factory=list, description="Tool calls refused, failed or skipped (the newest)."
    )
    unfinished: dict[str, str] = Field(
        default_factory=dict,
        description="Side-effect tools whose last call was refused or failed: tool -> why.",
    )
    spec: AgentSpec | None = Field(
        default=None, description="The agent and policy slice pinned at the run's start."
    )

    @property
    def agent(self) -> AgentSpec:
        """The pinned spec; only asked for once the run has resolved its agent."""
        if self.spec is None:
            raise RuntimeError("the run's agent is not resolved yet")
        return self.spec


class AgentWorkflowInput(AgentRequest):
    """What the workflow receives: the request, plus `carry` after continue-as-new or in a fork,
    and `parent` when it runs as a sub-agent (checked against Temporal's record of its parent)."""

    carry: RunState | None = None
    parent: ParentRun | None = None


#: What a skipped call tells the model; a skip is an operator's choice, not the model's mistake.
SKIPPED_PREFIX = "error: skipped by operator"


def begin(state: RunState, goal: str) -> None:
    """A new run's first messages: the agent's instructions and the user's goal."""
    if state.transcript_len == 0 and not state.pending_messages:
        state.pending_messages = [
            ChatMessage(role="system", content=state.agent.instructions),
            ChatMessage(role="user", content=goal),
        ]
        state.context_bytes += sum(_size(m) for m in state.pending_messages)


def apply_model_turn(state: RunState, result: ModelCallResult, usd: float) -> None:
    """The model answered: the messages it was sent are now stored, its answer is pending.

    `usd` is the turn's price (:func:`spine.guardrails.budget.turn_cost`).
    """
    for message in state.pending_messages:
        state.transcript_digest = chain_digest(state.transcript_digest, message)
    state.transcript_len += len(state.pending_messages)
    state.pending_messages = [result.message]
    state.context_bytes += _size(result.message)
    state.retries += result.attempt - 1
    state.usage = Usage(
        input_tokens=state.usage.input_tokens + result.usage.input_tokens,
        output_tokens=state.usage.output_tokens + result.usage.output_tokens,
        usd=round(state.usage.usd + usd, 8),
    )
    state.budget.last_input_tokens = result.usage.input_tokens
    if state.budget.block_id is not None:
        state.budget.block_spent_usd += usd


def apply_tool_result(
    state: RunState,
    call: ToolCall,
    tool: ToolDescriptor,
    args: dict[str, object],
    output: dict[str, object],
    key: str,
    untrusted: str | None = None,
) -> ChatMessage:
    """A tool call finished with `output` (from `tool`, the one called or its fallback).

    A side effect is recorded with what undoes it; outside content is remembered for taint
    checks (`untrusted`: when `output` is a reference to a stored output, the taint filter of
    the output's tokens, made by the tool activity).
    Returns the message the model will read.
    """
    content = json.dumps(output, sort_keys=True)
    if tool.untrusted_output:
        # Remember outside content, so a risky call that copies from it is caught.
        # All of it, also when the output went by reference (`untrusted`: its tokens' filter).
        state.untrusted = (
            taint.union(state.untrusted, untrusted)
            if untrusted
            else taint.remember(state.untrusted, content)
        )
        state.untrusted_seen = True
    # The tool (or its fallback, for the tool the model called) did its work this time.
    state.unfinished.pop(call.name, None)
    state.unfinished.pop(tool.name, None)
    for total, amount in cumulative_amounts(state, tool.name, args):
        state.totals[total] = round(state.totals.get(total, 0.0) + amount, 8)
    if tool.side_effects:
        state.side_effects.append(
            SideEffect(
                step=state.step,
                call_id=call.id,
                tool=tool.name,
                args=args,
                output=output,
                idempotency_key=key,
                compensation=tool.compensation,
            )
        )
    message = ChatMessage(role="tool", tool_call_id=call.id, name=call.name, content=content)
    state.pending_messages.append(message)
    state.context_bytes += _size(message)
    return message


def cumulative_amounts(
    state: RunState, tool: str, args: dict[str, object], scope: str | None = None
) -> list[tuple[str, float]]:
    """(total key, amount) for each cumulative approval rule this call of `tool` counts for
    (only the rules of `scope`, ``run`` or ``account_day``, when given)."""
    found = []
    for rule in state.agent.approval_rules:
        if rule.tool != tool or rule.cumulative_above is None or rule.arg is None:
            continue
        if scope is not None and rule.scope != scope:
            continue
        amount = args.get(rule.arg)
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            continue
        per = str(args.get(rule.per, "")) if rule.per else ""
        found.append((f"{tool}:{rule.arg}:{per}", float(amount)))
    return found


def apply_refusal(
    state: RunState,
    call: ToolCall,
    text: str,
    *,
    outcome: str = "refused",
    side_effects: bool = False,
) -> ChatMessage:
    """A tool call was refused (not allowed, invalid: `outcome` ``refused``) or failed in a way
    the model can fix (``failed``); `side_effects`: the tool is a risky one.

    Counts against the run's allowance of invalid calls and is listed in the run's failed
    calls; a risky tool stays unfinished until a later call of it succeeds. Returns what the
    model will read.
    """
    state.invalid_calls += 1
    apply_failed_call(state, call.name, outcome, text, side_effects=side_effects)
    return _tell_model(state, call, text)


def apply_failed_call(
    state: RunState, tool: str, outcome: str, reason: str, *, side_effects: bool
) -> None:
    """List a call that did not do what the model asked (the newest are kept)."""
    failed = FailedCall(
        step=state.step,
        tool=tool,
        outcome=outcome,  # type: ignore[arg-type]  # one of the three, from Spine's own code
        reason=reason[:500],
        side_effects=side_effects,
    )
    state.failed_calls = [*state.failed_calls, failed][-MAX_FAILED_CALLS_SHOWN:]
    if side_effects and outcome != "skipped":
        state.unfinished[tool] = f"step {state.step}: {reason[:300]}"


def apply_skip(state: RunState, call: ToolCall, by: str, reason: str) -> ChatMessage:
    """An operator skipped a parked call; the model hears so (not counted as its mistake, and
    not unfinished: it was a person's choice)."""
    text = f"{SKIPPED_PREFIX} {by}: {reason or 'no reason given'}"
    apply_failed_call(state, call.name, "skipped", text, side_effects=False)
    return _tell_model(state, call, text)


def unfinished_problem(state: RunState) -> str | None:
    """Why a final answer may not complete the run under the policy's
    ``on_failed_side_effect = "fail"``, or None."""
    if not state.unfinished or state.agent.on_failed_side_effect != "fail":
        return None
    tools = "; ".join(f"{tool} ({why})" for tool, why in sorted(state.unfinished.items()))
    return (
        f"the model gave its final answer, but side-effect call(s) did not succeed: {tools}; "
        'the policy does not let such a run complete (runtime.on_failed_side_effect = "fail")'
    )


def _tell_model(state: RunState, call: ToolCall, text: str) -> ChatMessage:
    message = ChatMessage(
        role="tool", tool_call_id=call.id, name=call.name, content=text, is_error=True
    )
    return told(state, message)


def told(state: RunState, message: ChatMessage) -> ChatMessage:
    """`message` goes to the model with the next call."""
    state.pending_messages.append(message)
    state.context_bytes += _size(message)
    return message


def _size(message: ChatMessage) -> int:
    return len(message.model_dump_json(exclude_defaults=True).encode())


def apply_charge(state: RunState, usd: float) -> None:
    """A call that failed after the provider may have worked on it (an answer too large to
    take, say) is charged what was reserved for it."""
    state.usage = state.usage.model_copy(update={"usd": round(state.usage.usd + usd, 8)})
    if state.budget.block_id is not None:
        state.budget.block_spent_usd += usd


def apply_turn_order(state: RunState, call_ids: list[str]) -> None:
    """A turn's tool calls ran at once: put what the model will read back in the order it asked.

    Results, refusals and skips are appended as each call ends (completion order: the side
    effects keep that order, so the saga undoes them newest first); the model reads them in the
    order of its own calls. Stable, so calls sharing an id keep their completion order.
    """
    rank = {call_id: index for index, call_id in enumerate(call_ids)}

    def of_turn(message: ChatMessage) -> bool:
        return message.role == "tool" and message.tool_call_id in rank

    head = [m for m in state.pending_messages if not of_turn(m)]
    tail = [m for m in state.pending_messages if of_turn(m)]
    tail.sort(key=lambda m: rank[m.tool_call_id or ""])
    state.pending_messages = head + tail


def apply_retries(state: RunState, failed_attempts: int) -> None:
    """Attempts that failed and were retried count against the run's retry budget."""
    state.retries += max(failed_attempts, 0)


def apply_carve(state: RunState, usd: float) -> None:
    """`usd` of the run's remaining budget is set aside for a sub-agent that starts now
    (negative: given back, by a sub-agent that never ran)."""
    state.carved_usd = round(max(state.carved_usd + usd, 0.0), 8)


def apply_sub_agent(
    state: RunState, child_id: str, result: AgentResult, *, carved_usd: float
) -> list[SideEffect]:
    """A sub-agent run ended: its spend is the parent's (its carve-out is released), and a
    completed child's effects that still stand become the parent's to undo if the parent is
    compensated later. Returns the effects taken over."""
    state.carved_usd = round(max(state.carved_usd - carved_usd, 0.0), 8)
    state.usage = Usage(
        input_tokens=state.usage.input_tokens + result.usage.input_tokens,
        output_tokens=state.usage.output_tokens + result.usage.output_tokens,
        usd=round(state.usage.usd + result.usage.usd, 8),
    )
    if result.status != "completed":
        return []  # a child that did not complete undid its own effects (or says it could not)
    taken = [
        effect.model_copy(update={"sub_agent_run": effect.sub_agent_run or child_id})
        for effect in result.side_effects
        if not effect.compensated
    ]
    state.side_effects.extend(taken)
    return taken


def apply_compensated(state: RunState, idempotency_key: str) -> SideEffect | None:
    """The side effect with `idempotency_key` was undone; returns it (None if unknown)."""
    for effect in state.side_effects:
        if effect.idempotency_key == idempotency_key:
            effect.compensated = True
            return effect
    return None
