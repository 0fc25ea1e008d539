"""Allowlist, without a server: grants by name or pinned version; one answer, loop and backstop."""

from __future__ import annotations

from spine.guardrails.allowlist import Allowlist
from spine.payloads import ToolCall
from tests.unit.kit import spec


def call(name: str) -> ToolCall:
    return ToolCall(id="c1", name=name, args={})


def test_a_pinned_version_grants_only_that_version():
    """`issue_refund@2` does not grant version 1; `lookup_order` grants any version."""
    agent = spec(allowed_tools=["lookup_order", "issue_refund@2"])
    allowlist = Allowlist(agent, "support")
    assert [t.name for t in allowlist.offered()] == ["lookup_order"]
    tool, problem = allowlist.check(call("issue_refund"))
    assert tool is None and problem == (
        "refused: tool 'issue_refund' is not allowed for role 'support' in agent 'refund-agent'"
    )
    v2 = [
        t.model_copy(update={"version": 2}) if t.name == "issue_refund" else t for t in agent.tools
    ]
    pinned = Allowlist(agent.model_copy(update={"tools": v2}), "support")
    assert pinned.check(call("issue_refund"))[0] is not None


def test_unknown_tools_are_told_what_is_available():
    """A tool the agent does not have is an error that lists the granted tools."""
    viewer = Allowlist(spec(role="viewer"), "viewer")
    assert viewer.check(call("drop_tables")) == (
        None,
        "error: unknown tool 'drop_tables'; available tools: fetch_document, lookup_order",
    )


def test_the_backstop_allows_compensations_of_granted_tools_only():
    """A support run may start reverse_refund (its saga); a viewer run may not start either."""
    support = Allowlist(spec(), "support")
    assert support.denial("issue_refund") is None
    assert support.denial("reverse_refund") is None
    viewer = Allowlist(spec(role="viewer"), "viewer")
    assert viewer.denial("reverse_refund") == (
        "tool 'reverse_refund' is not granted to role 'viewer' in agent 'refund-agent'"
    )
