"""The workflow's request, state, signals and result (CONTRACT.md). Stdlib and pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from activities.models import AgentSpec, ChatMessage, JsonObject, ScriptTurn

WORKFLOW_TYPE = "AgentWorkflow"
DEFAULT_TASK_QUEUE = "spine-agents"

RunStatus = Literal[
    "running", "awaiting_approval", "parked", "completed", "failed", "compensated", "rejected"
]
Provider = Literal["openai", "anthropic", "scripted"]


def rate_limited_queue(task_queue: str, group: str | None) -> str:
    """The task queue of a rate-limited tool group: the server enforces its rate fleet-wide."""
    return f"{task_queue}--rl-{group}"


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


def model_path(choice: ModelChoice | None, spec: AgentSpec) -> list[tuple[str, str]]:
    """(provider, model) for a run's model, then each of its fallbacks, as the run will try them.

    The first model's name is ``""`` when the request names none and the policy has no default
    for its provider; the caller refuses that (and models with no price) in its own words.
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


class Limits(BaseModel):
    """Per-run limits; they can only tighten what the policy allows."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(default=None, ge=1)
    max_usd: float | None = Field(default=None, ge=0)


class AgentRequest(BaseModel):
    """Input of `AgentWorkflow` (CONTRACT.md)."""

    model_config = ConfigDict(extra="forbid")

    agent: str
    goal: str
    user: str
    role: str
    account: str
    model: ModelChoice | None = None
    limits: Limits | None = None


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0


class PendingApproval(BaseModel):
    approval_id: str
    tool: str
    args: JsonObject
    reason: str


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


class RunState(BaseModel):
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


class ApprovalDecision(BaseModel):
    """Payload of the `approval` signal and the `decide` update."""

    approval_id: str
    decision: Literal["approve", "reject"]
    by: str
    role: str
    reason: str = ""


class OperatorCommand(BaseModel):
    """Payload of the `operator` signal for a parked run."""

    action: Literal["retry", "skip", "compensate", "abort"]
    by: str
    role: str
    reason: str = ""


class DecisionAck(BaseModel):
    """What the `decide` update returns."""

    approval_id: str
    decision: Literal["approve", "reject"]
    status: RunStatus


class AgentResult(BaseModel):
    """Result of `AgentWorkflow` (CONTRACT.md)."""

    status: RunStatus
    output: str | None
    steps: int
    usage: Usage
    side_effects: list[SideEffect]
    reason: str | None = None
    retries: int = 0
    path: list[str] = Field(default_factory=list)


class Carry(BaseModel):
    """State carried across continue-as-new. Everything but the transcript, which stays in the
    transcript store and is referenced by length and digest."""

    step: int
    usage: Usage
    side_effects: list[SideEffect]
    transcript_len: int
    transcript_digest: str
    pending_messages: list[ChatMessage]
    invalid_calls: int = 0
    script_pos: int = 0
    retries: int = 0
    path: list[str] = Field(default_factory=list)
    budget: BudgetCarry = Field(default_factory=lambda: BudgetCarry())
    audit_seq: int = 0
    untrusted_text: str = ""
    spec: AgentSpec


class BudgetCarry(BaseModel):
    """The run's side of the account ledger: what to settle next and how far it has degraded."""

    to_commit: dict[str, float] = Field(default_factory=dict)
    to_release: list[str] = Field(default_factory=list)
    ledger_fraction: float = 0.0
    last_input_tokens: int = 0
    degraded_to: str | None = None
    approved_to_continue: bool = False
    block_id: str | None = None
    block_usd: float = 0.0
    block_spent_usd: float = 0.0


class AgentWorkflowInput(AgentRequest):
    """What the workflow actually receives: the request plus, after continue-as-new, `carry`."""

    carry: Carry | None = None


# ----------------------------------------------------------------------------- budget ledger

LEDGER_WORKFLOW_TYPE = "SpineBudgetLedger"
DEFAULT_LEDGER_TASK_QUEUE = "spine-ledger"


def ledger_workflow_id(account: str) -> str:
    return f"spine-budget-{account}"


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


class LedgerOp(BaseModel):
    """One atomic ledger operation: settle earlier reservations, then maybe reserve anew.

    Settling and reserving in one update keeps a run to one ledger call per model turn.
    """

    run_id: str
    commit: dict[str, float] = Field(default_factory=dict, description="reservation -> actual")
    release: list[str] = Field(default_factory=list)
    reserve_id: str | None = None
    reserve_usd: float = 0.0
    daily_limit_usd: float | None = None
    monthly_limit_usd: float | None = None


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
        description="Largest share of a limit that is committed or reserved, this call included."
    )


class BudgetWindowView(BaseModel):
    window: str
    committed_usd: float
    reserved_usd: float


class BudgetView(BaseModel):
    account: str
    windows: list[BudgetWindowView]
    open_reservations: int
    overspend_usd: float
