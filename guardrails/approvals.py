"""When a tool call waits for a person, and the desk where those waits are decided.

:func:`approval_rule` says *whether* a call waits, from the policy's rules: an amount above a
line, a cumulative total above a line (per order, in the run or the account's day), a confidence
below a threshold (a turn that reports none counts as below every threshold unless the rule says
``missing_confidence = "ignore"``), arguments that copy untrusted content, or any call once
untrusted content is in the run's context. :class:`ApprovalDesk` keeps a run's open approvals:
it opens one, checks every decision against the *verified* principal who signed it (the signer
must be who the decision names, hold the role it claims, be one of the approver roles, not be the
run's own requester, and not have approved this one already when several approvers are needed),
waits, escalates or rejects on the rule's timeout, and ends the run on a rejection.

Deterministic; waiting and audit go through :class:`~spine.guardrails.hooks.RunHooks`, so the
desk is tested without a server. A sandbox passthrough module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from spine.contract import ApprovalDecision, DecisionAck, JsonObject, PendingApproval, RunStatus
from spine.guardrails.hooks import RunHooks
from spine.guardrails.taint import tainted_args
from spine.observability.metrics import record_approval_requested
from spine.payloads import ApprovalRule, PrincipalView, ToolDescriptor
from spine.workflows.state import RunState, StopRun, cumulative_amounts


def approval_rule(
    tool: str,
    args: Mapping[str, object],
    confidence: float | None,
    rules: Sequence[ApprovalRule],
    *,
    tainted: Sequence[str] = (),
    untrusted_seen: bool = False,
    totals: Mapping[str, float] | None = None,
) -> tuple[str, ApprovalRule] | None:
    """The first rule that makes this call wait, with the reason, or None.

    `tainted` names the arguments whose values came from untrusted content; `untrusted_seen`
    says whether any untrusted content is in the run's context; `totals` are what cumulative
    rules count so far, by ``tool:arg:per-value`` (this call not included).
    """
    for rule in rules:
        if rule.tool != tool:
            continue
        if rule.always:
            return f"{tool} always needs approval", rule
        value = args.get(rule.arg) if rule.arg is not None else None
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if rule.above is not None and number is not None and number > rule.above:
            return f"{rule.arg} {number:.2f} is above {rule.above:.2f}", rule
        if rule.cumulative_above is not None and number is not None:
            per = str(args.get(rule.per, "")) if rule.per else ""
            done = (totals or {}).get(f"{tool}:{rule.arg}:{per}", 0.0)
            if done + number > rule.cumulative_above:
                where = f" for {rule.per} {per}" if rule.per else ""
                scope = "today on this account" if rule.scope == "account_day" else "in this run"
                return (
                    f"{rule.arg} {number:.2f} brings the total{where} {scope} to "
                    f"{done + number:.2f}, above {rule.cumulative_above:.2f}",
                    rule,
                )
        if rule.below_confidence is not None:
            if confidence is None and rule.missing_confidence == "low":
                return (
                    f"the model gave no confidence (counted as below {rule.below_confidence:.2f})",
                    rule,
                )
            if confidence is not None and confidence < rule.below_confidence:
                return (
                    f"model confidence {confidence:.2f} is below {rule.below_confidence:.2f}",
                    rule,
                )
        if rule.untrusted_args and tainted:
            return (
                f"argument(s) {', '.join(tainted)} copy text from untrusted tool output",
                rule,
            )
        if rule.after_untrusted and untrusted_seen:
            return f"untrusted content is in the run's context; {tool} needs approval", rule
    return None


def describe_rule(rule: ApprovalRule) -> str:
    """A policy approval rule in one line: `issue_refund: amount above 50.00 -> supervisor`."""
    conditions = []
    if rule.always:
        conditions.append("always")
    if rule.above is not None:
        conditions.append(f"{rule.arg} above {rule.above:.2f}")
    if rule.cumulative_above is not None:
        conditions.append(
            f"total {rule.arg} per {rule.per or 'call'} above {rule.cumulative_above:.2f}"
        )
    if rule.below_confidence is not None:
        conditions.append(f"confidence below {rule.below_confidence:.2f}")
    if rule.untrusted_args:
        conditions.append("untrusted arguments")
    if rule.after_untrusted:
        conditions.append("after untrusted content")
    approvers = ", ".join(rule.approver_roles)
    return f"{rule.tool}: {', '.join(conditions) or 'no condition'} -> {approvers}"


def _iso(at: datetime | None, after_s: float | None = 0.0) -> str | None:
    if at is None or after_s is None:
        return None
    return (at + timedelta(seconds=after_s)).isoformat()


@dataclass
class _Open:
    """An approval asked for, and the decisions it has had."""

    asked: PendingApproval
    roles: list[str]
    required: int = 1
    approvals: list[ApprovalDecision] = field(default_factory=list)
    final: ApprovalDecision | None = None


class ApprovalDesk:
    """A run's approvals: the rules, the open requests, the decisions and who may make them."""

    def __init__(
        self, state: RunState, hooks: RunHooks, *, agent: str, allow_self_approval: bool = False
    ) -> None:
        self.state = state
        self._hooks = hooks
        self._agent = agent
        self._allow_self = allow_self_approval
        self._open: dict[str, _Open] = {}
        self.refused: list[str] = []
        """Decisions the run refused, one line each."""

    # ------------------------------------------------------------------------------ rules

    def rule_for(
        self,
        tool: ToolDescriptor,
        args: Mapping[str, object],
        confidence: float | None,
        *,
        day_totals: Mapping[str, float] | None = None,
    ) -> tuple[str, ApprovalRule] | None:
        """The rule that makes this call wait, and why; None when it may run at once.

        `day_totals` are the account's totals today for the rules scoped ``account_day`` (the
        ledger keeps them); the run's own totals are in the run state.
        """
        rules = self.state.agent.approval_rules
        watch_taint = any(r.tool == tool.name and r.untrusted_args for r in rules)
        tainted = tainted_args(args, self.state.untrusted) if watch_taint else []
        totals = {**self.state.totals}
        for rule in rules:
            if rule.scope == "account_day" and rule.tool == tool.name:
                for key, _ in cumulative_amounts(self.state, tool.name, dict(args)):
                    totals[key] = (day_totals or {}).get(key, 0.0)
        return approval_rule(
            tool.name,
            args,
            confidence,
            rules,
            tainted=tainted,
            untrusted_seen=self.state.untrusted_seen,
            totals=totals,
        )

    # ---------------------------------------------------------------------------- waiting

    async def request(
        self,
        tool: str,
        args: JsonObject,
        reason: str,
        roles: list[str],
        rule: ApprovalRule | None = None,
        *,
        confidence: float | None = None,
    ) -> ApprovalDecision:
        """Open an approval and wait for its decision; per `rule`, a timeout escalates (once)
        or rejects. `confidence` is the model's for the turn (shown to the approver).

        Raises:
            StopRun: the call was rejected (status `rejected`).
        """
        hooks = self._hooks
        approval_id = f"ap-{self.state.step}-{hooks.new_id()}"
        required = rule.approvals_required if rule else 1
        now = hooks.now() if hooks.now else None
        timeout = rule.timeout_s if rule else None
        self._open[approval_id] = _Open(
            PendingApproval(
                approval_id=approval_id,
                tool=tool,
                args=args,
                reason=reason,
                step=self.state.step,
                approver_roles=list(roles),
                approvals_required=required,
                rule=describe_rule(rule) if rule else None,
                confidence=confidence,
                untrusted_seen=self.state.untrusted_seen,
                requested_at=_iso(now),
                deadline=_iso(now, timeout) if timeout else None,
                on_timeout=rule.on_timeout if rule and timeout else None,
                escalate_to=list(rule.escalate_to) if rule and timeout else [],
            ),
            list(roles),
            required,
        )
        hooks.set_status("awaiting_approval", None)
        record_approval_requested(self._agent, tool)
        hooks.record(
            "policy_decision",
            "spine",
            decision="needs_approval",
            tool=tool,
            approval_id=approval_id,
            reason=reason,
            approver_roles=roles,
            approvals_required=required,
        )
        await hooks.flush()
        escalate = rule is not None and rule.on_timeout == "escalate"
        opened = self._open[approval_id]
        while True:
            try:
                await hooks.wait(
                    lambda: opened.final is not None,
                    timedelta(seconds=timeout) if timeout else None,
                )
                break
            except asyncio.CancelledError:
                self._withdraw(approval_id, tool)
                raise
            except TimeoutError:
                assert rule is not None and timeout is not None
                if escalate:
                    escalate = False
                    self._escalate(approval_id, tool, rule, timeout)
                    await hooks.flush()
                    continue
                opened.final = ApprovalDecision(
                    approval_id=approval_id,
                    decision="reject",
                    by="spine",
                    role="policy",
                    reason=f"no decision within {timeout:.0f}s",
                )
                self._audit(opened.final, accepted=True, principal="spine")
                break
        decision = opened.final
        assert decision is not None
        # Other calls of the turn may still wait for their own approvals.
        hooks.set_status("awaiting_approval" if self.pending() else "running", None)
        if decision.decision == "reject":
            raise StopRun(
                "rejected",
                f"approval {approval_id} for {tool} rejected by {decision.by} "
                f"({decision.role}): {decision.reason or 'no reason given'}",
            )
        return decision

    def _withdraw(self, approval_id: str, tool: str) -> None:
        """The call stopped waiting (another call of its turn ended the run): close the request."""
        opened = self._open.get(approval_id)
        if opened is None or opened.final is not None:
            return
        del self._open[approval_id]
        self._hooks.record(
            "policy_decision",
            "spine",
            decision="withdrawn",
            tool=tool,
            approval_id=approval_id,
            reason="the run ended before a decision",
        )
        if not self.pending():
            self._hooks.set_status("running", None)

    def _escalate(self, approval_id: str, tool: str, rule: ApprovalRule, timeout: float) -> None:
        opened = self._open[approval_id]
        opened.roles = list(rule.escalate_to)
        opened.asked.reason += f"; escalated to {', '.join(rule.escalate_to)} after {timeout:.0f}s"
        now = self._hooks.now() if self._hooks.now else None
        opened.asked.approver_roles = list(rule.escalate_to)
        opened.asked.deadline = _iso(now, timeout)
        opened.asked.on_timeout = "reject"
        opened.asked.escalate_to = []
        self._hooks.record(
            "policy_decision",
            "spine",
            decision="escalated",
            tool=tool,
            approval_id=approval_id,
            reason=opened.asked.reason,
            approver_roles=rule.escalate_to,
        )

    # -------------------------------------------------------------------------- decisions

    def problem(self, decision: ApprovalDecision, principal: PrincipalView | None) -> str | None:
        """Why `decision`, signed by `principal`, must be refused; None when it is acceptable."""
        if principal is None:
            return "unauthenticated: the decision carries no verified principal"
        if decision.by != principal.name:
            return f"by {decision.by!r} is not the principal who signed ({principal.name!r})"
        if decision.role not in principal.roles:
            return (
                f"principal {principal.name!r} does not hold role {decision.role!r} "
                f"(holds: {', '.join(principal.roles) or 'none'})"
            )
        opened = self._open.get(decision.approval_id)
        if opened is None:
            return f"unknown approval {decision.approval_id!r} for this run"
        if opened.final is not None:
            return f"approval {decision.approval_id!r} was already decided"
        if decision.role not in opened.roles:
            return (
                f"role {decision.role!r} may not decide approval {decision.approval_id!r}; "
                f"allowed: {', '.join(opened.roles)}"
            )
        if principal.name == self.state.principal and not self._allow_self:
            return f"{principal.name!r} requested this run and cannot approve its own request"
        if any(a.by == principal.name for a in opened.approvals):
            return (
                f"{principal.name!r} already approved {decision.approval_id!r}; it needs "
                f"{opened.required} distinct approvers"
            )
        return None

    def accept(self, decision: ApprovalDecision) -> None:
        """Take an acceptable decision (check :meth:`problem` first). A rejection decides; an
        approval decides once the rule's number of distinct approvers is reached."""
        opened = self._open[decision.approval_id]
        if decision.decision == "reject":
            opened.final = decision
        else:
            opened.approvals.append(decision)
            opened.asked.approved_by.append(decision.by)
            if len(opened.approvals) >= opened.required:
                opened.final = decision
        self._audit(decision, accepted=True, principal=decision.by)

    def refuse(
        self, decision: ApprovalDecision | None, problem: str, principal: str | None
    ) -> None:
        """Record a refused decision (audited with who really signed it, if anyone); a payload
        that was not a decision at all is recorded too."""
        who = principal or "unauthenticated"
        self._hooks.warn(f"refused approval decision signed by {who}: {problem}")
        self.refused.append(f"approval by {who}: {problem}")
        if decision is None:
            self._hooks.record("approval", who, principal=who, reason=problem, accepted=False)
            return
        self._audit(decision, accepted=False, problem=problem, principal=who)

    def ack(self, decision: ApprovalDecision) -> DecisionAck:
        """What the `decide` update answers once `decision` is taken."""
        opened = self._open[decision.approval_id]
        status: RunStatus = (
            "rejected"
            if decision.decision == "reject"
            else "awaiting_approval"
            if opened.final is None or self.pending()
            else "running"
        )
        return DecisionAck(
            approval_id=decision.approval_id, decision=decision.decision, status=status
        )

    def pending(self) -> list[PendingApproval]:
        """Open approvals not yet decided."""
        return [o.asked for o in self._open.values() if o.final is None]

    def _audit(
        self,
        decision: ApprovalDecision,
        *,
        accepted: bool,
        principal: str,
        problem: str | None = None,
    ) -> None:
        self._hooks.record(
            "approval",
            principal,
            approval_id=decision.approval_id,
            decision=decision.decision,
            by=decision.by,
            principal=principal,
            role=decision.role,
            reason=problem or decision.reason,
            accepted=accepted,
        )
