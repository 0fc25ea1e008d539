"""Build "v2" of `AgentWorkflow` for the roll-out test (tests/test_rollout.py).

A change that is not replay-compatible on purpose: every run of build v2 first starts a short
timer, a command build v1 never issued, so replaying a v1 history on this code would fail with a
nondeterminism error. A run of v2 also says so in its result's path. Worker versioning must keep
v1 runs on v1 workers and move them to v2 only through continue-as-new.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RawValue

with workflow.unsafe.imports_passed_through():
    from spine.contract import WORKFLOW_TYPE, AgentResult

from spine.workflows.agent import AgentWorkflow

V2_MARK = "finished on build v2"


@workflow.defn(name=WORKFLOW_TYPE)
class AgentWorkflowV2(AgentWorkflow):
    @workflow.run
    async def run(self, raw: RawValue) -> AgentResult:
        await workflow.sleep(timedelta(milliseconds=10))
        result = await super().run(raw)
        result.path.append(V2_MARK)
        return result
