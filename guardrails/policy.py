"""The policy file: allowlists, approval rules, limits and prices, validated at worker start.

Pure and deterministic; the workflow receives the relevant slice through the `resolve_agent`
activity (so a policy change never alters a running workflow's replay).
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spine.guardrails.identity import Grants
from spine.payloads import ApprovalRule, BudgetRules

DEFAULT_POLICY_PATH = Path(__file__).with_name("policy.toml")


class PolicyError(ValueError):
    """The policy file is missing or wrong; the message names the file and the entry."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Runtime(_Strict):
    continue_as_new_after_events: int = Field(default=10_000, ge=100)
    max_invalid_tool_calls: int = Field(default=3, ge=0)
    max_tokens: int = Field(default=1024, ge=1)
    max_retries_per_run: int = Field(default=100, ge=0)
    model_max_attempts: int = Field(default=8, ge=1)
    model_initial_interval_s: float = Field(default=0.5, gt=0)
    model_max_interval_s: float = Field(default=20.0, gt=0)
    parking_timeout_s: float = Field(default=7 * 24 * 3600, gt=0)
    operator_roles: list[str] = Field(default_factory=lambda: ["operator", "supervisor"])
    breaker_threshold: int = Field(default=10, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    max_sub_agent_depth: int = Field(default=3, ge=0, le=10)
    progress_every_s: float = Field(default=60.0, ge=1, le=3600)
    """A working run refreshes its `SpineSteps` and `SpineCostUSD` search attributes at most this
    often (`SpineStatus` changes at once). Each refresh is a history event and a visibility
    write; runs started before the setting existed keep the interval they started with."""
    on_failed_side_effect: Literal["fail", "complete"] = "fail"
    """A run whose model gives its final answer while a side-effect tool's last call was
    refused or failed: ``fail`` (it ends `failed`, its other side effects undone) or
    ``complete`` (the answer stands; the failed call is in the result's `failed_calls`)."""


class Price(_Strict):
    input: float = Field(ge=0)
    output: float = Field(ge=0)


class Prices(_Strict):
    version: str
    models: dict[str, Price] = Field(default_factory=dict)


class Models(_Strict):
    defaults: dict[str, str] = Field(default_factory=dict)


class Rule(_Strict):
    """One approval rule (see `spine.payloads.ApprovalRule` for what each field means)."""

    tool: str
    always: bool = False
    arg: str | None = None
    above: float | None = None
    cumulative_above: float | None = Field(default=None, ge=0)
    per: str | None = None
    scope: Literal["run", "account_day"] = "run"
    below_confidence: float | None = Field(default=None, ge=0, le=1)
    missing_confidence: Literal["low", "ignore"] = "low"
    untrusted_args: bool = False
    after_untrusted: bool = False
    approver_roles: list[str] = Field(default_factory=lambda: ["supervisor"], min_length=1)
    approvals_required: int = Field(default=1, ge=1, le=5)
    timeout_s: float | None = Field(default=None, gt=0)
    on_timeout: Literal["reject", "escalate"] = "reject"
    escalate_to: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.on_timeout == "escalate" and not self.escalate_to:
            raise ValueError("on_timeout = 'escalate' needs escalate_to = [roles]")
        if (self.above is not None or self.cumulative_above is not None) and self.arg is None:
            raise ValueError("above/cumulative_above need arg = '<numeric argument>'")
        return self


class PrincipalGrant(_Strict):
    """What a principal (or every member of an OpenBao identity group) may do."""

    roles: list[str] = Field(default_factory=list)
    accounts: list[str] = Field(default_factory=list, description='"*" for every account')


class Identity(_Strict):
    """How claims are checked (guardrails/identity.py)."""

    max_claim_age_s: float = Field(default=300, gt=0, le=3600)
    workers: list[str] = Field(
        default_factory=lambda: ["spine-worker"],
        description="Principals whose signed operations the budget ledger accepts.",
    )
    allow_self_approval: bool = False


class AgentPolicy(_Strict):
    max_steps: int = Field(default=20, ge=1)
    max_usd: float | None = Field(default=None, ge=0)
    max_parallel_tool_calls: int = Field(
        default=4, ge=1, le=64, description="Tool calls of one model turn that run at once."
    )
    roles: dict[str, list[str]] = Field(default_factory=dict)
    approvals: list[Rule] = Field(default_factory=list)


class AccountPolicy(_Strict):
    daily_usd: float | None = Field(default=None, ge=0)
    monthly_usd: float | None = Field(default=None, ge=0)


class Budgets(_Strict):
    soft_fraction: float = Field(default=0.8, gt=0, le=1)
    approval_fraction: float = Field(default=0.9, gt=0, le=1)
    approver_roles: list[str] = Field(default_factory=lambda: ["supervisor"], min_length=1)
    compensate_on_exhausted: bool = False
    cheaper_models: dict[str, str] = Field(default_factory=dict)


AlertRule = Literal["failure_rate_spike", "cost_per_run_spike", "loop", "drift"]


class FailureRateSpike(_Strict):
    factor: float = Field(default=2.0, gt=0)
    floor: float = Field(default=0.2, ge=0, le=1)
    statuses: list[str] = Field(default_factory=lambda: ["failed", "compensated"], min_length=1)


class CostPerRunSpike(_Strict):
    factor: float = Field(default=3.0, gt=1)
    min_usd: float = Field(default=0.0, ge=0)


class Drift(_Strict):
    metric: Literal["jsd", "tvd"] = "jsd"
    threshold: float = Field(default=0.3, gt=0, le=1)
    min_calls: int = Field(default=20, ge=1)


class Alerts(_Strict):
    """Anomaly alert rules (`guardrails/alerts.py`); see the `[alerts]` table of policy.toml."""

    rules: list[AlertRule] = Field(
        default_factory=lambda: ["failure_rate_spike", "cost_per_run_spike", "loop", "drift"]
    )
    window_s: float = Field(default=3600, gt=0)
    baseline_s: float = Field(default=86400, gt=0)
    min_runs: int = Field(default=5, ge=1)
    loop_repeats: int = Field(default=5, ge=2)
    webhook_url: str = ""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    failure_rate_spike: FailureRateSpike = Field(default_factory=FailureRateSpike)
    cost_per_run_spike: CostPerRunSpike = Field(default_factory=CostPerRunSpike)
    drift: Drift = Field(default_factory=Drift)


class Policy(_Strict):
    version: str
    runtime: Runtime = Field(default_factory=Runtime)
    models: Models = Field(default_factory=Models)
    prices: Prices
    agents: dict[str, AgentPolicy] = Field(default_factory=dict)
    accounts: dict[str, AccountPolicy] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    alerts: Alerts = Field(default_factory=Alerts)
    rate_limits: dict[str, float] = Field(
        default_factory=dict,
        description="Calls per second, fleet-wide, per tool rate-limit group.",
    )
    principals: dict[str, PrincipalGrant] = Field(default_factory=dict)
    groups: dict[str, PrincipalGrant] = Field(default_factory=dict)
    identity: Identity = Field(default_factory=Identity)
    digest: str = ""

    def grants(self) -> Grants:
        """The principal and group grants, for verifying claims."""
        return Grants(
            principals={n: (tuple(g.roles), tuple(g.accounts)) for n, g in self.principals.items()},
            groups={n: (tuple(g.roles), tuple(g.accounts)) for n, g in self.groups.items()},
            workers=tuple(self.identity.workers),
            max_age=timedelta(seconds=self.identity.max_claim_age_s),
        )

    def known_roles(self) -> set[str]:
        """Every role the policy names anywhere: a role outside this set is refused."""
        roles = set(self.runtime.operator_roles) | set(self.budgets.approver_roles)
        for agent in self.agents.values():
            roles |= set(agent.roles)
            for rule in agent.approvals:
                roles |= set(rule.approver_roles) | set(rule.escalate_to)
        for grant in [*self.principals.values(), *self.groups.values()]:
            roles |= set(grant.roles)
        return roles

    def allowed_tools(self, agent: str, role: str) -> list[str]:
        """Tools `role` may call in `agent`; empty (deny all) for unknown agents or roles."""
        policy = self.agents.get(agent)
        return list(policy.roles.get(role, [])) if policy else []

    def approval_rules(self, agent: str) -> list[ApprovalRule]:
        policy = self.agents.get(agent)
        if policy is None:
            return []
        return [ApprovalRule.model_validate(r.model_dump()) for r in policy.approvals]

    def budget_rules(self, account: str) -> BudgetRules:
        limits = self.accounts.get(account, AccountPolicy())
        return BudgetRules(
            **self.budgets.model_dump(),
            daily_usd=limits.daily_usd,
            monthly_usd=limits.monthly_usd,
        )

    def price_table(self) -> dict[str, tuple[float, float]]:
        return {name: (p.input, p.output) for name, p in self.prices.models.items()}

    @property
    def full_version(self) -> str:
        return f"{self.version}+{self.prices.version}#{self.digest[:12]}"


def load_policy(path: Path | str | None = None) -> Policy:
    """Load and validate a policy file; :class:`PolicyError` names what is wrong."""
    path = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PolicyError(f"cannot read policy file {str(path)!r}: {err.strerror}") from err
    try:
        data = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path}: not valid TOML: {err}") from err
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PolicyError(
            f"{path}: {where}: {first['msg']} ({err.error_count()} problem(s) in all)"
        ) from err
    policy.digest = hashlib.sha256(raw).hexdigest()
    return policy
