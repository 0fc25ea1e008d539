"""Payloads that cross the activity boundary. Stdlib and pydantic only: safe in the sandbox."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field

JsonObject = dict[str, object]


class TokenUsage(BaseModel):
    """Tokens reported by the provider for one call."""

    input_tokens: int = 0
    output_tokens: int = 0


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


class ScriptToolCall(BaseModel):
    name: str
    args: JsonObject = Field(default_factory=dict)
    raw_args: str | None = Field(
        default=None, description="Argument text as a model would emit it; overrides `args`."
    )


class ScriptTurn(BaseModel):
    """One turn of the scripted model (see CONTRACT.md)."""

    text: str | None = None
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)
    confidence: float | None = None
    usage: TokenUsage | None = None
    error: Literal["transient", "terminal"] | None = Field(
        default=None,
        description=(
            "Make the scripted model fail this turn on the run's own model: transient (every "
            "attempt fails) or terminal. Fallback models answer the turn normally."
        ),
    )


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
    confidence: float | None = None
    attempt: int = 1


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


class ToolCallResult(BaseModel):
    output: JsonObject
    attempt: int = 1


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


class ApprovalRule(BaseModel):
    """When a tool call waits for a person."""

    tool: str
    always: bool = False
    arg: str | None = None
    above: float | None = None
    below_confidence: float | None = None
    untrusted_args: bool = False
    approver_roles: list[str] = Field(default_factory=lambda: ["supervisor"])
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
    max_invalid_tool_calls: int = 3
    max_tokens: int = 1024
    continue_as_new_after_events: int = 10_000
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="USD per 1M tokens (input, output) by model name."
    )
    policy_version: str = ""
    search_attributes: bool = True
    operator_roles: list[str] = Field(default_factory=lambda: ["operator", "supervisor"])
    parking_timeout_s: float = 7 * 24 * 3600
    max_retries_per_run: int = 100
    model_max_attempts: int = 8
    model_initial_interval_s: float = 0.5
    model_max_interval_s: float = 20.0
    budget: BudgetRules = Field(default_factory=lambda: BudgetRules())
    rate_limits: dict[str, float] = Field(default_factory=dict)


class CompensationInput(BaseModel):
    """Input model of every compensation tool: the call being undone and what it returned."""

    tool: str
    args: JsonObject
    output: JsonObject


class ResolveAgentInput(BaseModel):
    agent: str
    role: str
    account: str = ""


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
