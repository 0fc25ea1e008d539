"""When a tool call waits for a person, and the desk where those waits are decided.

:func:`approval_rule` and :func:`tainted_args` say *whether* a call waits (pure functions over the
policy's rules). :class:`ApprovalDesk` keeps a run's open approvals: it opens one, checks every
decision that arrives (unknown, already decided, a role that may not decide), waits for the
answer, escalates or rejects on the rule's timeout, and ends the run on a rejection. The `decide`
update's validator, the `approval` signal and the telemetry interceptor all ask the desk.

Deterministic; waiting and audit go through :class:`~spine.guardrails.hooks.RunHooks`, so the
desk is tested without a server. A sandbox passthrough module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import timedelta

from spine.contract import ApprovalDecision, DecisionAck, JsonObject, PendingApproval, RunStatus
from spine.guardrails.hooks import RunHooks
from spine.observability.metrics import record_approval_requested
from spine.payloads import ApprovalRule, ToolDescriptor
from spine.workflows.state import RunState, StopRun


def approval_rule(
    tool: str,
    args: Mapping[str, object],
    confidence: float | None,
    rules: Sequence[ApprovalRule],
    *,
    tainted: Sequence[str] = (),
) -> tuple[str, ApprovalRule] | None:
    """The first rule that makes this call wait, with the reason, or None.

    `tainted` names the arguments whose values were copied from untrusted tool output.
    """
    for rule in rules:
        if rule.tool != tool:
            continue
        if rule.always:
            return f"{tool} always needs approval", rule
        if rule.arg is not None and rule.above is not None:
            value = args.get(rule.arg)
            if isinstance(value, int | float) and value > rule.above:
                return f"{rule.arg} {value:.2f} is above {rule.above:.2f}", rule
        if (
            rule.below_confidence is not None
            and confidence is not None
            and confidence < rule.below_confidence
        ):
            return (
                f"model confidence {confidence:.2f} is below {rule.below_confidence:.2f}",
                rule,
            )
        if rule.untrusted_args and tainted:
            return (
                f"argument(s) {', '.join(tainted)} copy text from untrusted tool output",
                rule,
            )
    return None


def tainted_args(args: Mapping[str, object], untrusted_text: str) -> list[str]:
    """Arguments whose values appear in text that came from untrusted tool output.

    Numbers match however they were written there ("10,000", "10000", "10000.00"); strings
    match when they are at least four characters long, so ids like "o-1" do not trip it.
    """
    if not untrusted_text:
        return []
    haystack = untrusted_text.replace(",", "").replace("_", "").lower()
    found = []
    for name, value in args.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if abs(value) < 10:
                continue  # single digits are everywhere; not evidence of copying
            forms = {f"{value:g}", f"{value:.2f}"}
            if value == int(value):
                forms.add(str(int(value)))
            if any(re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", haystack) for f in forms):
                found.append(name)
        elif isinstance(value, str) and len(value) >= 4 and value.lower() in haystack:
            found.append(name)
    return found


class ApprovalDesk:
    """A run's approvals: the rules, the open requests, the decisions and who may make them."""

    def __init__(self, state: RunState, hooks: RunHooks, *, agent: str) -> None:
        self.state = state
        self._hooks = hooks
        self._agent = agent
        self._open: dict[str, PendingApproval] = {}
        self._roles: dict[str, list[str]] = {}
        self._decisions: dict[str, ApprovalDecision] = {}
        self.refused: list[str] = []
        """Decisions the run refused, one line each (the signal path has nobody to tell)."""

    # ------------------------------------------------------------------------------ rules

    def rule_for(
        self, tool: ToolDescriptor, args: Mapping[str, object], confidence: float | None
    ) -> tuple[str, ApprovalRule] | None:
        """The rule that makes this call wait, and why; None when it may run at once."""
        rules = self.state.agent.approval_rules
        watch_taint = any(r.tool == tool.name and r.untrusted_args for r in rules)
        tainted = tainted_args(args, self.state.untrusted_text) if watch_taint else []
        return approval_rule(tool.name, args, confidence, rules, tainted=tainted)

    # ---------------------------------------------------------------------------- waiting

    async def request(
        self,
        tool: str,
        args: JsonObject,
        reason: str,
        roles: list[str],
        rule: ApprovalRule | None = None,
    ) -> ApprovalDecision:
        """Open an approval and wait for its decision; per `rule`, a timeout escalates (once)
        or rejects.

        Raises:
            StopRun: the call was rejected (status `rejected`).
        """
        hooks = self._hooks
        approval_id = f"ap-{self.state.step}-{hooks.new_id()}"
        self._open[approval_id] = PendingApproval(
            approval_id=approval_id, tool=tool, args=args, reason=reason
        )
        self._roles[approval_id] = roles
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
        )
        await hooks.flush()
        timeout = rule.timeout_s if rule else None
        escalate = rule is not None and rule.on_timeout == "escalate"
        while True:
            try:
                await hooks.wait(
                    lambda: approval_id in self._decisions,
                    timedelta(seconds=timeout) if timeout else None,
                )
                break
            except TimeoutError:
                assert rule is not None and timeout is not None
                if escalate:
                    escalate = False
                    self._escalate(approval_id, tool, rule, timeout)
                    await hooks.flush()
                    continue
                self._decisions[approval_id] = ApprovalDecision(
                    approval_id=approval_id,
                    decision="reject",
                    by="spine",
                    role="policy",
                    reason=f"no decision within {timeout:.0f}s",
                )
                self._audit(self._decisions[approval_id], accepted=True)
                break
        decision = self._decisions[approval_id]
        hooks.set_status("running", None)
        if decision.decision == "reject":
            raise StopRun(
                "rejected",
                f"approval {approval_id} for {tool} rejected by {decision.by} "
                f"({decision.role}): {decision.reason or 'no reason given'}",
            )
        return decision

    def _escalate(self, approval_id: str, tool: str, rule: ApprovalRule, timeout: float) -> None:
        self._roles[approval_id] = list(rule.escalate_to)
        pending = self._open[approval_id]
        pending.reason += f"; escalated to {', '.join(rule.escalate_to)} after {timeout:.0f}s"
        self._hooks.record(
            "policy_decision",
            "spine",
            decision="escalated",
            tool=tool,
            approval_id=approval_id,
            reason=pending.reason,
            approver_roles=rule.escalate_to,
        )

    # -------------------------------------------------------------------------- decisions

    def problem(self, decision: ApprovalDecision) -> str | None:
        """Why `decision` must be refused, or None when it is acceptable."""
        if decision.approval_id not in self._open:
            return f"unknown approval {decision.approval_id!r} for this run"
        if decision.approval_id in self._decisions:
            return f"approval {decision.approval_id!r} was already decided"
        roles = self._roles.get(decision.approval_id, [])
        if decision.role not in roles:
            return (
                f"role {decision.role!r} may not decide approval {decision.approval_id!r}; "
                f"allowed: {', '.join(roles)}"
            )
        return None

    def accept(self, decision: ApprovalDecision) -> None:
        """Take an acceptable decision (check :meth:`problem` first)."""
        self._decisions[decision.approval_id] = decision
        self._audit(decision, accepted=True)

    def refuse(self, decision: ApprovalDecision, problem: str) -> None:
        """Record a refused decision (the signal path: nobody hears a refusal otherwise)."""
        self._hooks.warn(f"refused approval signal from {decision.by}: {problem}")
        self.refused.append(f"approval by {decision.by} ({decision.role}): {problem}")
        self._audit(decision, accepted=False, problem=problem)

    def ack(self, decision: ApprovalDecision) -> DecisionAck:
        """What the `decide` update answers once `decision` is taken."""
        status: RunStatus = (
            "rejected"
            if decision.decision == "reject"
            else "awaiting_approval"
            if any(k not in self._decisions for k in self._open)
            else "running"
        )
        return DecisionAck(
            approval_id=decision.approval_id, decision=decision.decision, status=status
        )

    def pending(self) -> list[PendingApproval]:
        """Open approvals not yet decided."""
        return [a for k, a in self._open.items() if k not in self._decisions]

    def _audit(
        self, decision: ApprovalDecision, *, accepted: bool, problem: str | None = None
    ) -> None:
        self._hooks.record(
            "approval",
            decision.by,
            approval_id=decision.approval_id,
            decision=decision.decision,
            by=decision.by,
            role=decision.role,
            reason=problem or decision.reason,
            accepted=accepted,
        )
