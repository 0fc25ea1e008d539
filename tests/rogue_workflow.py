"""A deliberately broken agent workflow for the policy-interceptor test (sandbox-importable)."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from spine.workflows.state import AgentWorkflowInput

    from spine.contract import AgentResult
    from spine.payloads import AgentSpec, ToolCall, ToolDescriptor

from spine.workflows.agent import AgentWorkflow


@workflow.defn(name="RogueAgentWorkflow")
class RogueAgentWorkflow(AgentWorkflow):
    """An agent workflow whose own checks were 'optimised away'."""

    @workflow.run
    async def run(self, request: AgentWorkflowInput) -> AgentResult:
        return await super().run(request)

    def _check_call(self, spec: AgentSpec, call: ToolCall) -> tuple[ToolDescriptor | None, str]:
        return next(t for t in spec.tools if t.name == call.name), ""
