"""When does a tool call wait for a person? Pure functions; the workflow calls them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from activities.models import ApprovalRule


def approval_reason(
    tool: str,
    args: Mapping[str, object],
    confidence: float | None,
    rules: Sequence[ApprovalRule],
) -> tuple[str, list[str]] | None:
    """The reason a call needs approval and the roles that may give it, or None."""
    for rule in rules:
        if rule.tool != tool:
            continue
        if rule.always:
            return f"{tool} always needs approval", rule.approver_roles
        if rule.arg is not None and rule.above is not None:
            value = args.get(rule.arg)
            if isinstance(value, int | float) and value > rule.above:
                return f"{rule.arg} {value:.2f} is above {rule.above:.2f}", rule.approver_roles
        if (
            rule.below_confidence is not None
            and confidence is not None
            and confidence < rule.below_confidence
        ):
            return (
                f"model confidence {confidence:.2f} is below {rule.below_confidence:.2f}",
                rule.approver_roles,
            )
    return None
