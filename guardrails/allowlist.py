"""Which tools a run may use: the one allowlist, read by the loop and by the interceptor.

The policy grants tools to a role per agent, by name (any version) or pinned as
``name@version``; the run pins the grants when it starts (`AgentSpec.allowed_tools`), so replay
decides the same. The loop asks :meth:`Allowlist.check` before it proposes a call to anyone; the
policy interceptor asks :meth:`Allowlist.denial` on every tool activity start, so workflow code
that skips the loop's check still cannot schedule a tool the role was not granted.

Pure and deterministic: a sandbox passthrough module.
"""

from __future__ import annotations

from spine.payloads import AgentSpec, ToolCall, ToolDescriptor, ToolRef


class Allowlist:
    """The tools `role` may call in the agent `spec` describes."""

    def __init__(self, spec: AgentSpec, role: str) -> None:
        self.spec = spec
        self.role = role
        self._granted = {t.name: t for t in spec.tools if self.granted(t)}

    def granted(self, tool: ToolDescriptor) -> bool:
        """The policy grants `tool` by name (any version) or as ``name@version``."""
        allowed = self.spec.allowed_tools
        return tool.name in allowed or f"{tool.name}@{tool.version}" in allowed

    def offered(self) -> list[ToolRef]:
        """What the model is shown: every granted tool, pinned by version."""
        return [ToolRef(name=t.name, version=t.version) for t in self._granted.values()]

    def check(self, call: ToolCall) -> tuple[ToolDescriptor | None, str]:
        """The granted tool a model's call names, or None and what to tell the model."""
        tool = self._granted.get(call.name)
        if tool is not None:
            return tool, ""
        if any(t.name == call.name for t in self.spec.tools):
            return None, (
                f"refused: tool {call.name!r} is not allowed for role {self.role!r} in agent "
                f"{self.spec.name!r}"
            )
        known = ", ".join(sorted(self._granted)) or "none"
        return None, f"error: unknown tool {call.name!r}; available tools: {known}"

    def denial(self, tool: str) -> str | None:
        """Why the run may not start `tool` at all, or None when it may.

        Granted tools may run, and so may the compensations and fallbacks of granted tools (the
        saga and the alternate paths run them on the tool's behalf), and the compensations of
        a granted sub-agent's tools (the saga undoes what a finished sub-agent did).
        """
        for t in self._granted.values():
            if tool in (t.name, t.compensation, t.fallback) or tool in t.sub_agent_undo:
                return None
        return f"tool {tool!r} is not granted to role {self.role!r} in agent {self.spec.name!r}"
