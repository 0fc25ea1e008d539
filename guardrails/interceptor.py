"""The control plane's synchronous backstops: a workflow outbound interceptor on activity starts.

The agent loop already refuses what the policy does not allow (and tells the model), and awaits
the guards that wait (approvals, ledger reservations, parking). This interceptor enforces two of
those rules one level lower, on the activity start itself, so workflow code that skips the loop's
checks (a bug, a subclass, a custom agent workflow) still cannot break them:

- a ``tool.<name>`` activity starts only if the run's :class:`~spine.guardrails.allowlist.Allowlist`
  grants it (or it is the compensation or fallback of a granted tool); workflows that expose no
  guards may not start Spine tools at all;
- a ``spine.model_call`` of a run whose account has a shared budget starts only while a ledger
  reservation covers it (:meth:`~spine.guardrails.budget.BudgetGate.may_call_model`).

A workflow exposes its guards as ``self.guards`` (a :class:`RunGuards`); the interceptor depends on
the guards, never on the workflow class. Decisions are computed from the policy slice pinned in
history, so replay makes the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

from spine.activities.errors import PolicyDenied
from spine.contract import ACTIVITY_MODEL_CALL, tool_of
from spine.guardrails.allowlist import Allowlist
from spine.guardrails.approvals import ApprovalDesk
from spine.guardrails.budget import BudgetGate


@dataclass
class RunGuards:
    """The guards a Spine run exposes to interceptors (``self.guards`` on the workflow)."""

    approvals: ApprovalDesk
    allowlist: Allowlist | None = None
    """Set once the run has resolved its agent; until then every tool is refused."""
    budget: BudgetGate | None = None


def guards_of_current_run() -> RunGuards | None:
    """The current workflow's guards, or None for a workflow that is not a Spine run."""
    guards = getattr(workflow.instance(), "guards", None)
    return guards if isinstance(guards, RunGuards) else None


def _check(activity: str) -> None:
    guards = guards_of_current_run()
    tool = tool_of(activity)
    problem: str | None = None
    if tool is not None:
        if guards is None:
            problem = f"workflow {workflow.info().workflow_type!r} has no tool policy"
        elif guards.allowlist is None:
            problem = "the run's policy is not resolved yet"
        else:
            problem = guards.allowlist.denial(tool)
    elif activity == ACTIVITY_MODEL_CALL and guards is not None and guards.budget is not None:
        problem = guards.budget.may_call_model()
    if problem:
        workflow.logger.warning("policy interceptor refused %s: %s", activity, problem)
        raise ApplicationError(f"policy: {problem}", type=PolicyDenied.__name__, non_retryable=True)


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
    """Register on the worker (the :class:`~spine.SpinePlugin` does): the policy backstops."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound
