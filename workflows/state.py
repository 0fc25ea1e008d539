"""A run's state: what `AgentWorkflow` holds and carries across continue-as-new."""

from __future__ import annotations

from pydantic import BaseModel, Field

from spine.contract import AgentRequest, ModelChoice, SideEffect, Usage
from spine.payloads import AgentSpec, ChatMessage


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
