"""What crosses between the workflow and its activities: model and tool calls, the pinned agent
spec, audit entries and the budget ledger's messages. Stdlib and pydantic only (plus
:mod:`spine.contract`), so workflow code imports it through the sandbox (a passthrough module).

User-facing payloads (request, result, decisions) are in :mod:`spine.contract`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from spine.contract import AgentRequest, ForkFrom, JsonObject, ScriptTurn, TokenUsage
from spine.guardrails.identity import Claim


class ToolCall(BaseModel):
    """A tool call proposed by the model. Arguments are untrusted until validated.

    `args` is None when the model's argument text was not a JSON object; `raw_args` keeps the
    text so the error returned to the model can quote it.
    """

    id: str
    name: str
    args: JsonObject | None = None
    raw_args: str | None = None


class ChatMessage(BaseModel):
    """One transcript entry, provider-neutral."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False


class ToolSchema(BaseModel):
    """What the model is shown of one tool."""

    name: str
    description: str
    parameters: JsonObject


class ProviderRequest(BaseModel):
    """A fully materialised chat request for a provider adapter."""

    model: str
    messages: list[ChatMessage]
    tools: list[ToolSchema] = Field(default_factory=list)
    max_tokens: int = 1024
    timeout_s: float = 60.0


class ProviderResponse(BaseModel):
    """A provider adapter's answer: one assistant message plus accounting."""

    message: ChatMessage
    usage: TokenUsage
    model: str
    finish_reason: str = "stop"


class ToolRef(BaseModel):
    """A tool pinned by name and version for a run."""

    name: str
    version: int


class ModelCallInput(BaseModel):
    """Input of the `spine.model_call` activity.

    Only the messages that are new since the last call travel in history; the activity
    rebuilds the whole transcript from the transcript store (verified by `base_digest`).
    """

    transcript_id: str
    base_len: int
    base_digest: str
    new_messages: list[ChatMessage]
    provider: Literal["openai", "anthropic", "scripted"]
    model: str
    tools: list[ToolRef] = Field(default_factory=list)
    step: int
    max_tokens: int = 1024
    script_turn: ScriptTurn | None = None
    fail_rate: float = 0.0
    fallback_index: int = Field(
        default=0, description="0 for the run's model, n for its n-th fallback model."
    )
    context_bytes: int = Field(
        default=0, description="Bytes of the whole prompt so far (the scripted model's usage)."
    )
    audit: AuditBatch | None = Field(
        default=None,
        description="Audit entries queued since the last write; the activity stores them "
        "(idempotently, by seq) before calling the model, saving a round trip per step.",
    )


class ModelCallResult(BaseModel):
    message: ChatMessage
    usage: TokenUsage
    model: str
    provider: str
    finish_reason: str = "stop"
    confidence: float | None = Field(default=None, ge=0, le=1)
    attempt: int = 1
    audit: Appended | None = Field(
        default=None, description="Where the audit chain stood after the entries the call carried."
    )


class ToolCallInput(BaseModel):
    """Input of a tool activity (`tool.<name>`). Secrets are never here: only references."""

    run_id: str
    step: int
    call_id: str
    tool: str
    version: int
    args: JsonObject
    idempotency_key: str | None = None
    account: str = ""
    user: str = ""
    purpose: Literal["call", "fallback", "compensation"] = Field(
        default="call",
        description="Why the run calls the tool: the model's call, its fallback tool, or the "
        "saga undoing an earlier call.",
    )
    tried_before: bool = Field(
        default=False,
        description="An earlier activity of this call ran out of attempts (the run parked and "
        "an operator chose retry): a tool with a reconcile tool asks it first.",
    )


class ToolCallResult(BaseModel):
    output: JsonObject = Field(
        description="The tool's output, or a reference to it in the shared store when large "
        '({"$spine_output": "sha256:...", "bytes": N, "tool": name}).'
    )
    attempt: int = 1
    untrusted_filter: str | None = Field(
        default=None,
        description="For an untrusted output stored by reference: the taint filter of all its "
        "tokens (guardrails/taint.py), which the run remembers in place of the output.",
    )
    reconciled: bool = Field(
        default=False,
        description="A retry found the effect already done (the tool's reconcile tool) and "
        "returned it instead of calling the tool again.",
    )


class ToolDescriptor(BaseModel):
    """What the workflow needs to know about a tool: schemas and execution settings."""

    name: str
    version: int
    description: str
    input_schema: JsonObject
    output_schema: JsonObject
    side_effects: bool
    compensation: str | None = None
    fallback: str | None = None
    untrusted_output: bool = Field(
        default=False,
        description="Output carries outside content (documents, mail): copying it is suspect.",
    )
    summary_arg: str | None = None
    start_to_close_s: float = 30.0
    max_attempts: int = 5
    initial_interval_s: float = 1.0
    max_interval_s: float = 30.0
    risk: Literal["low", "medium", "high"] = "low"
    rate_limit_group: str | None = Field(
        default=None, description="Tools sharing one rate limit (e.g. an API quota)."
    )
    local: bool = Field(
        default=False, description="Run as a local activity: a fast read-only tool."
    )
    reconcile: str | None = Field(
        default=None,
        description="A read tool a retry asks first whether the effect already happened.",
    )
    sub_agent: str | None = Field(
        default=None, description="The agent this tool runs as a child workflow (agent as tool)."
    )
    handoff: bool = Field(
        default=False, description="The sub-agent's answer is the run's final answer."
    )
    sub_agent_max_usd: float | None = Field(
        default=None, description="The most of the parent's remaining budget one call carves."
    )
    sub_agent_undo: list[str] = Field(
        default_factory=list,
        description="Compensation tools of the sub-agent's tools: the parent runs them to undo "
        "the child's effects when the parent is compensated after the child finished.",
    )


class ApprovalRule(BaseModel):
    """When a tool call waits for a person (policy ``[[agents.<name>.approvals]]``)."""

    tool: str
    always: bool = False
    arg: str | None = Field(default=None, description="The numeric argument `above` looks at.")
    above: float | None = None
    cumulative_above: float | None = Field(
        default=None,
        description="Waits when this call's `arg` plus what this tool already did (per `per` "
        "argument value, in the run or the account's day) goes above this.",
    )
    per: str | None = Field(default=None, description="Argument that keys the total (order_id).")
    scope: Literal["run", "account_day"] = "run"
    below_confidence: float | None = None
    missing_confidence: Literal["low", "ignore"] = Field(
        default="low", description="A turn with no confidence counts as below every threshold."
    )
    untrusted_args: bool = False
    after_untrusted: bool = Field(
        default=False, description="Waits whenever untrusted content is in the run's context."
    )
    approver_roles: list[str] = Field(default_factory=lambda: ["supervisor"])
    approvals_required: int = Field(default=1, description="Distinct approvers needed.")
    timeout_s: float | None = None
    on_timeout: Literal["reject", "escalate"] = "reject"
    escalate_to: list[str] = Field(default_factory=list)


class AgentSpec(BaseModel):
    """An agent as resolved at the start of a run: pinned tools and the policy that applies."""

    name: str
    instructions: str
    tools: list[ToolDescriptor]
    allowed_tools: list[str]
    approval_rules: list[ApprovalRule] = Field(default_factory=list)
    default_provider: Literal["openai", "anthropic", "scripted"] = "scripted"
    default_model: str = "scripted"
    default_models: dict[str, str] = Field(default_factory=dict)
    max_steps: int = 20
    max_usd: float | None = None
    max_parallel_tool_calls: int = Field(
        default=1, description="Tool calls of one model turn that run at once (1: one by one)."
    )
    max_sub_agent_depth: int = Field(
        default=3, description="How deep sub-agents may nest (a child of a child ...)."
    )
    max_invalid_tool_calls: int = 3
    max_tokens: int = 1024
    continue_as_new_after_events: int = 10_000
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="USD per 1M tokens (input, output) by model name."
    )
    policy_version: str = ""
    search_attributes: bool = True
    progress_every_s: float | None = Field(
        default=None,
        description="Seconds between refreshes of the step and cost search attributes (the "
        "policy's `runtime.progress_every_s`); None in a spec resolved before the setting "
        "existed: the run keeps the interval it started with.",
    )
    operator_roles: list[str] = Field(default_factory=lambda: ["operator", "supervisor"])
    parking_timeout_s: float = 7 * 24 * 3600
    max_retries_per_run: int = 100
    model_max_attempts: int = 8
    model_initial_interval_s: float = 0.5
    model_max_interval_s: float = 20.0
    budget: BudgetRules = Field(default_factory=lambda: BudgetRules())
    rate_limits: dict[str, float] = Field(default_factory=dict)
    on_failed_side_effect: Literal["fail", "complete"] = Field(
        default="complete",
        description=(
            "The policy's choice for a final answer after a failed side-effect call. The "
            "default here is what specs pinned before the setting existed did; the policy's "
            "own default is `fail`."
        ),
    )


class AgentTask(BaseModel):
    """Input model of every sub-agent tool: what the sub-agent is asked to do."""

    task: str = Field(
        min_length=1,
        max_length=4000,
        description="The task for the sub-agent, with everything it needs to know.",
    )


class AgentAnswer(BaseModel):
    """Output model of every sub-agent tool: how the sub-agent's run ended."""

    agent: str
    workflow_id: str
    status: str
    output: str | None = None
    reason: str | None = None
    steps: int = 0
    usd: float = 0.0


class ParentRun(BaseModel):
    """On a sub-agent's input: the run that called it (checked against Temporal's own record of
    the child's parent, so a starter cannot claim one)."""

    workflow_id: str
    agent: str
    tool: str
    step: int
    call_id: str
    audit_run_id: str = Field(description="The parent's audit chain (`<workflow id>:<run id>`).")
    depth: int = Field(default=1, ge=1, description="1 for a child, 2 for a grandchild, ...")
    principal: str = Field(description="The principal the parent verified; the child's too.")


class AgentCheck(BaseModel):
    """`SpineAgentCheck`'s answer: a worker on the queue serves the agent, with these tools (who
    may use which is not said: the check is not signed)."""

    agent: str
    tools: list[str] = Field(default_factory=list)


class CompensationInput(BaseModel):
    """Input model of every compensation tool: the call being undone and what it returned."""

    tool: str
    args: JsonObject
    output: JsonObject


class ReconcileQuery(BaseModel):
    """Input model of every reconcile tool: the call whose effect may already have happened.

    `reference` is the call's idempotency key (``<workflow id>/<step>/<index>``): a tool whose
    API takes no idempotency key sends it as the API's own reference field, so its reconcile
    tool can find the effect by it.
    """

    tool: str
    args: JsonObject
    reference: str
    run_id: str


class ReconcileAnswer(BaseModel):
    """Output model of every reconcile tool: whether the effect happened, and if so what the
    tool would have returned (validated against the tool's output model)."""

    found: bool
    output: JsonObject | None = None


class ResolveAgentInput(BaseModel):
    agent: str
    role: str
    account: str = ""


class PrincipalView(BaseModel):
    """A verified principal as the run records it: who, and what the policy grants them."""

    name: str
    roles: list[str] = Field(default_factory=list)
    accounts: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, principal: object) -> PrincipalView:
        return cls(
            name=principal.name,  # type: ignore[attr-defined]  # a guardrails.identity.Principal
            roles=list(principal.roles),  # type: ignore[attr-defined]
            accounts=list(principal.accounts),  # type: ignore[attr-defined]
            groups=list(principal.groups),  # type: ignore[attr-defined]
        )

    def may_act_for(self, account: str) -> bool:
        return "*" in self.accounts or account in self.accounts


def chain_digest(previous: str, message: ChatMessage) -> str:
    """Digest of a transcript after appending `message` (sha256 over a canonical encoding)."""
    body = json.dumps(message.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous}\n{body}".encode()).hexdigest()


EMPTY_DIGEST = hashlib.sha256(b"spine-transcript").hexdigest()


AuditKind = Literal[
    "run_started",
    "model_turn",
    "tool_call",
    "policy_decision",
    "budget",
    "approval",
    "operator",
    "compensation",
    "run_outcome",
    "alert",
    "sub_agent",
]


class AuditEntry(BaseModel):
    """One audit record, built deterministically in the workflow.

    `seq` numbers a run's entries from 0 without gaps (the chain is per workflow id, across
    continue-as-new); the store computes each entry's hash over a canonical encoding that
    includes the previous entry's hash. `data` never holds secret values; arguments and content
    appear as digests unless the policy asks for content.
    """

    seq: int
    kind: AuditKind
    step: int
    actor: str
    at: str = Field(description="ISO 8601 UTC timestamp from workflow.now()")
    data: JsonObject = Field(default_factory=dict)
    policy_version: str = ""


class Appended(BaseModel):
    """What storing an audit batch did: entries new to the store, and where the run's chain
    now stands (its number of entries and its head hash), anchored in the run's history."""

    new: int
    entries: int
    head: str


class AuditBatch(BaseModel):
    """Input of the `spine.audit_append` activity: entries in `seq` order."""

    run_id: str
    workflow_run_id: str
    agent: str
    account: str
    entries: list[AuditEntry]


def digest(value: object) -> str:
    """sha256 of a canonical JSON encoding, for audit records of arguments and content."""
    body = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


class BudgetRules(BaseModel):
    """How a run degrades as it nears a budget (policy `[budgets]`)."""

    soft_fraction: float = 0.8
    approval_fraction: float = 0.9
    approver_roles: list[str] = Field(default_factory=lambda: ["supervisor"])
    compensate_on_exhausted: bool = False
    cheaper_models: dict[str, str] = Field(default_factory=dict)
    daily_usd: float | None = None
    monthly_usd: float | None = None


# ----------------------------------------------------------------------------- budget ledger


class Reservation(BaseModel):
    reservation_id: str
    run_id: str
    amount_usd: float
    day: str
    month: str
    state: Literal["reserved", "committed", "released"] = "reserved"
    actual_usd: float = 0.0
    reserved_at: str = ""


class WindowTotals(BaseModel):
    committed_usd: float = 0.0
    reserved_usd: float = 0.0


class LedgerState(BaseModel):
    """The ledger's whole state; carried across continue-as-new."""

    account: str
    reservations: dict[str, Reservation] = Field(default_factory=dict)
    windows: dict[str, WindowTotals] = Field(default_factory=dict)
    overspend_usd: float = 0.0
    exposure: dict[str, float] = Field(
        default_factory=dict, description="`<day>|<tool:arg:per-value>` -> total that day."
    )


class LedgerOp(BaseModel):
    """One atomic ledger operation: settle earlier reservations, then maybe reserve anew.

    Settling and reserving in one update keeps a run to one ledger call per model turn.
    """

    run_id: str
    commit: dict[str, float] = Field(default_factory=dict, description="reservation -> actual")
    release: list[str] = Field(default_factory=list)
    reserve_id: str | None = None
    reserve_usd: float = 0.0
    reserve_min_usd: float | None = Field(
        default=None,
        description="The least this reservation may be. When `reserve_usd` does not fit, the "
        "ledger grants a smaller block, sized to the headroom it sees now (at least this much), "
        "instead of refusing: runs starting together size their blocks from what they last "
        "heard, the ledger from what is true.",
    )
    daily_limit_usd: float | None = None
    monthly_limit_usd: float | None = None
    exposure_add: dict[str, float] = Field(
        default_factory=dict,
        description="Add to the account's totals today, by `tool:arg:per-value` (cumulative "
        "approval rules scoped account_day).",
    )
    exposure_query: list[str] = Field(default_factory=list, description="Totals to read back.")


class BudgetCall(BaseModel):
    """Input of the `spine.budget_apply` activity."""

    account: str
    op: LedgerOp


class LedgerAnswer(BaseModel):
    granted: bool
    reason: str = ""
    day: str
    month: str
    day_committed_usd: float
    day_reserved_usd: float
    month_committed_usd: float
    used_fraction: float = Field(
        description="Largest share of a limit that is committed or reserved, this call included "
        "(what reservations are sized by)."
    )
    spent_fraction: float = Field(
        default=0.0,
        description="Largest share of a limit that is committed (spent): what the degrade and "
        "ask-to-continue thresholds compare. Other runs' reservations are upper bounds, not "
        "spend, so they do not make a run degrade or ask.",
    )
    exposure: dict[str, float] = Field(
        default_factory=dict, description="The totals asked for, today, before this operation."
    )
    granted_usd: float | None = Field(
        default=None, description="What the reservation holds when granted (see reserve_min_usd)."
    )
    refused: str | None = Field(
        default=None,
        description="Set when the ledger refused this operation of a batch (nothing of it was "
        "applied); names what was wrong.",
    )


#: The most operations one `apply_batch` update may carry.
MAX_LEDGER_BATCH = 500


class LedgerBatch(BaseModel):
    """Operations of many runs on one account, applied in order by one ledger update (group
    commit: a hot account's ledger sees one update per worker round trip, not one per run)."""

    ops: list[LedgerOp] = Field(min_length=1, max_length=MAX_LEDGER_BATCH)


class LedgerBatchAnswer(BaseModel):
    answers: list[LedgerAnswer]


class BudgetWindowView(BaseModel):
    window: str
    committed_usd: float
    reserved_usd: float


class BudgetView(BaseModel):
    account: str
    windows: list[BudgetWindowView]
    open_reservations: int
    overspend_usd: float


# ---------------------------------------------------------------------------------- identity


class VerifyInput(BaseModel):
    claim: Claim | None
    purpose: Literal["start", "decide", "operate", "fork", "ledger"]
    workflow_id: str
    payload_digest: str
    at: datetime
    """When the claim is judged: the run's start (a retried activity judges the same)."""


class Verdict(BaseModel):
    principal: PrincipalView | None = None
    problem: str | None = None


class VerifyCarryInput(BaseModel):
    workflow_id: str
    run_id: str
    continued_run_id: str | None


class ForkStateInput(BaseModel):
    fork_from: ForkFrom
    request: AgentRequest
    principal: PrincipalView
