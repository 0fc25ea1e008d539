"""The policy backstop: a workflow outbound interceptor every tool activity start passes through.

The agent loop already refuses calls the policy does not allow (and tells the model). This
interceptor enforces the same allowlist one level lower, on the activity start itself, so workflow
code that skips the loop's checks (a bug, a subclass, a custom agent workflow) still cannot
schedule a tool its run's role was not granted. It asks the running workflow instance for its
decision (`tool_denial(name)`), which is computed from the policy slice pinned in history, so
replay makes the same decision.

Imports only temporalio: it runs inside the workflow sandbox.
"""

from __future__ import annotations

from typing import Any, Protocol

from temporalio import workflow
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    Interceptor,
    StartActivityInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ActivityHandle

TOOL_PREFIX = "tool."


class PolicyGuarded(Protocol):
    def tool_denial(self, tool: str) -> str | None:
        """Why `tool` may not run in this workflow, or None when it may."""


def _check(activity: str) -> None:
    if not activity.startswith(TOOL_PREFIX):
        return
    instance = workflow.instance()
    deny = getattr(instance, "tool_denial", None)
    # Workflows that do not declare a policy (not Spine agents) may not start Spine tools.
    problem = (
        deny(activity[len(TOOL_PREFIX) :])
        if deny is not None
        else f"workflow {workflow.info().workflow_type!r} has no tool policy"
    )
    if problem:
        workflow.logger.warning("policy interceptor refused %s: %s", activity, problem)
        raise ApplicationError(f"policy: {problem}", type="PolicyDenied", non_retryable=True)


class _Outbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> ActivityHandle[Any]:
        _check(input.activity)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> ActivityHandle[Any]:
        _check(input.activity)
        return super().start_local_activity(input)


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))


class PolicyInterceptor(Interceptor):
    """Register on the worker: ``Worker(..., interceptors=[PolicyInterceptor()])``."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound
