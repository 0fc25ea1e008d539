"""When does a tool call wait for a person? Pure functions; the workflow calls them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from spine.payloads import ApprovalRule


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
