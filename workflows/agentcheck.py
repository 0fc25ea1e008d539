"""`SpineAgentCheck`: does a worker on this task queue serve an agent? (``spine run`` asks first.)

The check resolves the agent the way a run does (``spine.resolve_agent``, refused and requeued by
workers that do not serve it) and returns the agent's tool names, so ``spine run`` of an agent
nobody serves is one line and starts nothing. It writes no audit entry, says nothing of who may
use what, and grants nothing: the run that follows is checked in full.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from spine.contract import ACTIVITY_RESOLVE_AGENT, AGENT_CHECK_WORKFLOW_TYPE
    from spine.payloads import AgentCheck, AgentSpec, ResolveAgentInput

from spine.workflows.calls import RESOLVE_RETRY


@workflow.defn(name=AGENT_CHECK_WORKFLOW_TYPE)
class SpineAgentCheck:
    @workflow.run
    async def run(self, request: ResolveAgentInput) -> AgentCheck:
        spec = await workflow.execute_activity(
            ACTIVITY_RESOLVE_AGENT,
            request,
            result_type=AgentSpec,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RESOLVE_RETRY,
            summary=f"check agent {request.agent}",
        )
        return AgentCheck(agent=spec.name, tools=[t.name for t in spec.tools])
