"""Spine's user-facing contract in code: names and payloads a user types and scripts against.

``docs/contract.md`` is the prose; this module is the one definition of every name in it: the
workflow type and task queue, the query, signals and update, the activity names, the search
attributes, and the pydantic models of the request, the result, the `state` query and the
decisions people send. Stdlib, pydantic and ``temporalio.common`` only, so workflow code imports
it through the sandbox (it is a passthrough module).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from temporalio.common import SearchAttributeKey

JsonObject = dict[str, object]

# ----------------------------------------------------------------------------------- names

WORKFLOW_TYPE = "AgentWorkflow"
DEFAULT_TASK_QUEUE = "spine-agents"
QUERY_STATE = "state"
SIGNAL_APPROVAL = "approval"
UPDATE_DECIDE = "decide"
SIGNAL_OPERATOR = "operator"
UPDATE_OPERATE = "operate"
#: The Temporal header carrying the caller's signed claim (spine.guardrails.identity).
PRINCIPAL_HEADER = "spine_principal"

#: Activities every Spine worker serves (tools are ``tool.<name>``, see :func:`tool_activity`).
ACTIVITY_RESOLVE_AGENT = "spine.resolve_agent"
ACTIVITY_MODEL_CALL = "spine.model_call"
ACTIVITY_BUDGET_APPLY = "spine.budget_apply"
ACTIVITY_AUDIT_APPEND = "spine.audit_append"
ACTIVITY_ALERTS_CHECK = "spine.alerts_check"
ACTIVITY_VERIFY_PRINCIPAL = "spine.verify_principal"
ACTIVITY_VERIFY_CARRY = "spine.verify_carry"
ACTIVITY_FORK_STATE = "spine.fork_state"
ACTIVITY_TAINT_CHECK = "spine.taint_check"
TOOL_ACTIVITY_PREFIX = "tool."

#: `spine run` asks the task queue whether a worker serves the agent before it starts a run.
AGENT_CHECK_WORKFLOW_TYPE = "SpineAgentCheck"
LEDGER_WORKFLOW_TYPE = "SpineBudgetLedger"
#: The ledger's updates: one operation, or a batch of many runs' operations (group commit).
#: Both must be signed by a worker principal.
LEDGER_UPDATE = "apply"
LEDGER_BATCH_UPDATE = "apply_batch"
LEDGER_UPDATES = (LEDGER_UPDATE, LEDGER_BATCH_UPDATE)
DEFAULT_LEDGER_TASK_QUEUE = "spine-ledger"


def tool_activity(tool: str) -> str:
    """The activity name of a tool: ``tool.<name>``, so history reads like the story."""
    return f"{TOOL_ACTIVITY_PREFIX}{tool}"


def tool_of(activity_name: str) -> str | None:
    """The tool an activity name runs, or None when it is not a tool activity."""
    if activity_name.startswith(TOOL_ACTIVITY_PREFIX):
        return activity_name[len(TOOL_ACTIVITY_PREFIX) :]
    return None


def rate_limited_queue(task_queue: str, group: str) -> str:
    """The task queue of a rate-limited tool group: the server enforces its rate fleet-wide."""
    return f"{task_queue}--rl-{group}"


def sub_agent_workflow_id(idempotency_key: str, agent: str) -> str:
    """The workflow id of the sub-agent run a call starts: ``<the call's key>/<agent>``, so a
    retried or replayed call finds the same child."""
    return f"{idempotency_key}/{agent}"


def ledger_workflow_id(account: str) -> str:
    """The workflow id of an account's budget ledger."""
    return f"spine-budget-{account}"


# ------------------------------------------------------------------------ search attributes

SA_AGENT = SearchAttributeKey.for_keyword("SpineAgent")
SA_ACCOUNT = SearchAttributeKey.for_keyword("SpineAccount")
SA_STATUS = SearchAttributeKey.for_keyword("SpineStatus")
SA_COST = SearchAttributeKey.for_float("SpineCostUSD")
SA_STEPS = SearchAttributeKey.for_int("SpineSteps")
SA_FORKED_FROM = SearchAttributeKey.for_keyword("SpineForkedFrom")
"""On a fork: the workflow id it was forked from."""

#: Every search attribute Spine uses; register them in each namespace Spine runs in.
SEARCH_ATTRIBUTES = (SA_AGENT, SA_ACCOUNT, SA_STATUS, SA_COST, SA_STEPS, SA_FORKED_FROM)

# ------------------------------------------------------------------------------- boundaries

#: Principal (user) names: OpenBao entity names, lower case.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
#: Account names: they become Vault paths and ledger ids, so nothing else gets in.
ACCOUNT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
#: Role and agent names.
LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
#: The most tokens one model call may report; more is an answer that is not believable.
MAX_TOKENS_PER_CALL = 10_000_000
MAX_GOAL_CHARS = 50_000
MAX_REASON_CHARS = 2_000

# ---------------------------------------------------------------------------------- request

RunStatus = Literal[
    "running", "awaiting_approval", "parked", "completed", "failed", "compensated", "rejected"
]
Provider = Literal["openai", "anthropic", "scripted"]


class TokenUsage(BaseModel):
    """Tokens reported by the provider for one call (bounded: numbers from outside are)."""

    input_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_CALL)
    output_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_PER_CALL)


class ScriptToolCall(BaseModel):
    """A tool call in a scripted turn."""

    name: str
    args: JsonObject = Field(default_factory=dict)
    raw_args: str | None = Field(
        default=None, description="Argument text as a model would emit it; overrides `args`."
    )


class ScriptTurn(BaseModel):
    """One turn of the scripted model (docs/contract.md)."""

    text: str | None = None
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)
    confidence: float | None = Field(default=None, ge=0, le=1)
    usage: TokenUsage | None = None
    error: Literal["transient", "terminal"] | None = Field(
        default=None,
        description=(
            "Make the scripted model fail this turn on the run's own model: transient (every "
            "attempt fails) or terminal. Fallback models answer the turn normally."
        ),
    )


class ModelChoice(BaseModel):
    """Which model answers. `script` is used by the scripted provider only."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider = "scripted"
    name: str | None = None
    fallback: list[str] = Field(default_factory=list)
    script: list[ScriptTurn] = Field(default_factory=list)
    fail_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Scripted model only: transient failure rate."
    )
    sub_agents: dict[str, ModelChoice] = Field(
        default_factory=dict,
        max_length=16,
        description="The model of each sub-agent the run may call, by agent name (a scripted "
        "child's script goes here). A sub-agent not named uses this provider with its own "
        "default model. Choosing a model grants nothing: the child's policy and its budget "
        "carve-out still apply.",
    )


class Limits(BaseModel):
    """Per-run limits; they can only tighten what the policy allows."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(default=None, ge=1)
    max_usd: float | None = Field(default=None, ge=0)


class ForkFrom(BaseModel):
    """A fork starts from another run's state at the end of a step (``spine replay``).

    The worker rebuilds that state from the original's history and checks it against today's
    policy; nothing of the state is taken from the caller.
    """

    model_config = ConfigDict(extra="forbid")

    workflow_id: str = Field(max_length=255)
    step: int = Field(ge=0, le=1_000_000)


class AgentRequest(BaseModel):
    """Input of `AgentWorkflow` (docs/contract.md).

    `user`, `role` and `account` are checked against the verified principal who started the
    run (the ``spine_principal`` header): they grant nothing by themselves.
    """

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(pattern=LABEL_PATTERN)
    goal: str = Field(max_length=MAX_GOAL_CHARS)
    user: str = Field(pattern=NAME_PATTERN)
    role: str = Field(pattern=LABEL_PATTERN)
    account: str = Field(pattern=ACCOUNT_PATTERN)
    model: ModelChoice | None = None
    limits: Limits | None = None
    fork_from: ForkFrom | None = None


# ------------------------------------------------------------------------- state and result


class Usage(BaseModel):
    """Tokens and cost of a run so far."""

    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0


class PendingApproval(BaseModel):
    """A tool call (or budget continuation) waiting for a person.

    Beyond the call and the reason: who may decide it and how many must, the rule that made it
    wait, what the model reported, and when it escalates or is rejected without a decision
    (the `state` query only: nothing here is in history).
    """

    approval_id: str
    tool: str
    args: JsonObject
    reason: str
    step: int = 0
    approver_roles: list[str] = Field(default_factory=list)
    approvals_required: int = 1
    approved_by: list[str] = Field(
        default_factory=list, description="Who approved so far (when several must)."
    )
    rule: str | None = Field(default=None, description="The policy rule, in one line.")
    confidence: float | None = Field(default=None, description="The model's, for this turn.")
    untrusted_seen: bool = Field(
        default=False, description="Untrusted content was in the run's context when it asked."
    )
    requested_at: str | None = Field(default=None, description="ISO 8601 UTC (workflow time).")
    deadline: str | None = Field(
        default=None, description="When the rule's timeout acts without a decision (UTC)."
    )
    on_timeout: Literal["reject", "escalate"] | None = None
    escalate_to: list[str] = Field(default_factory=list)


class SideEffect(BaseModel):
    """A side effect that completed, with what undoes it."""

    step: int
    call_id: str
    tool: str
    args: JsonObject
    output: JsonObject
    idempotency_key: str
    compensation: str | None = None
    compensated: bool = False
    sub_agent_run: str | None = Field(
        default=None,
        description="Done by a sub-agent: its workflow id. The parent undoes it if the parent "
        "is compensated after the sub-agent finished.",
    )


class FailedCall(BaseModel):
    """A tool call that did not do what the model asked: refused before it ran (not allowed,
    invalid arguments), failed in a way the model was told about, or skipped by an operator."""

    step: int
    tool: str
    outcome: Literal["refused", "failed", "skipped"]
    reason: str
    side_effects: bool = Field(
        default=False, description="The tool changes the outside world (a risky call)."
    )


#: What a run keeps of its failed calls for `state` and the result (the newest; older ones are
#: counted in the audit log).
MAX_FAILED_CALLS_SHOWN = 50


class StateView(BaseModel):
    """Answer of the `state` query."""

    status: RunStatus
    step: int
    pending_approvals: list[PendingApproval] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    reason: str | None = None
    agent: str = ""
    last_tool: str | None = None
    retries: int = 0
    path: list[str] = Field(default_factory=list)
    refused: list[str] = Field(
        default_factory=list,
        description="Decisions, commands and payloads the run refused, one line each.",
    )
    sub_agents: list[str] = Field(
        default_factory=list, description="Workflow ids of the sub-agent runs in progress."
    )
    failed_calls: list[FailedCall] = Field(
        default_factory=list,
        description="Tool calls refused, failed or skipped so far (the newest 50).",
    )


class AuditAnchor(BaseModel):
    """Where a run's audit chain stood when the run wrote it: entries and the head hash."""

    entries: int
    head: str


class AgentResult(BaseModel):
    """Result of `AgentWorkflow` (docs/contract.md)."""

    status: RunStatus
    output: str | None
    steps: int
    usage: Usage
    side_effects: list[SideEffect]
    reason: str | None = None
    retries: int = 0
    path: list[str] = Field(default_factory=list)
    audit: AuditAnchor | None = Field(
        default=None, description="The audit chain's final head: `spine audit verify` checks it."
    )
    failed_calls: list[FailedCall] = Field(
        default_factory=list,
        description="Tool calls refused, failed or skipped (the newest 50), whatever the status.",
    )


# ------------------------------------------------------------------------ people's decisions


class ApprovalDecision(BaseModel):
    """Payload of the `approval` signal and the `decide` update.

    `by` must be the principal who signed the ``spine_principal`` header, and `role` one the
    policy grants them; the signature binds the whole payload to this run.
    """

    approval_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    decision: Literal["approve", "reject"]
    by: str = Field(pattern=NAME_PATTERN)
    role: str = Field(pattern=LABEL_PATTERN)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class OperatorCommand(BaseModel):
    """Payload of the `operate` update (and `operator` signal) for a parked run."""

    action: Literal["retry", "skip", "compensate", "abort"]
    by: str = Field(pattern=NAME_PATTERN)
    role: str = Field(pattern=LABEL_PATTERN)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class DecisionAck(BaseModel):
    """What the `decide` update returns."""

    approval_id: str
    decision: Literal["approve", "reject"]
    status: RunStatus
