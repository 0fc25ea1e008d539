"""The control plane's synchronous backstops: a workflow outbound interceptor on activity starts.

The agent loop already refuses what the policy does not allow (and tells the model), and awaits
the guards that wait (approvals, ledger reservations, parking). This interceptor enforces two of
those rules one level lower, on the activity start itself, so workflow code that skips the loop's
checks (a bug, a subclass, a custom agent workflow) still cannot break them:

- a ``tool.<name>`` activity starts only if the run's :class:`~spine.guardrails.allowlist.Allowlist`
  grants it (or it is the compensation or fallback of a granted tool); workflows that expose no
  guards may not start Spine tools at all;
- a ``spine.model_call`` of a run whose account has a shared budget starts only while a ledger
  reservation covers it (:meth:`~spine.guardrails.budget.BudgetGate.may_call_model`);
- a sub-agent (a child ``AgentWorkflow``) starts only for a sub-agent tool the allowlist grants,
  and only as the agent that tool names.

A workflow exposes its guards as ``self.guards`` (a :class:`RunGuards`); the interceptor depends on
the guards, never on the workflow class. Decisions are computed from the policy slice pinned in
history, so replay makes the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import RawValue
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ExecuteWorkflowInput,
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ActivityHandle, ChildWorkflowHandle

from spine.activities.errors import PolicyDenied
from spine.contract import (
    ACTIVITY_MODEL_CALL,
    LEDGER_UPDATES,
    LEDGER_WORKFLOW_TYPE,
    UPDATE_DECIDE,
    UPDATE_OPERATE,
    WORKFLOW_TYPE,
    ApprovalDecision,
    OperatorCommand,
    tool_of,
)
from spine.guardrails.allowlist import Allowlist
from spine.guardrails.approvals import ApprovalDesk
from spine.guardrails.budget import BudgetGate
from spine.guardrails.identity import (
    CURRENT,
    HEADER,
    VERIFIED,
    Claim,
    IdentityError,
    Keyring,
    Purpose,
    digest,
    parse_claim,
)


@dataclass
class RunGuards:
    """The guards a Spine run exposes to interceptors (``self.guards`` on the workflow)."""

    approvals: ApprovalDesk
    allowlist: Allowlist | None = None
    """Set once the run has resolved its agent; until then every tool is refused."""
    budget: BudgetGate | None = None
    start_claim: Claim | None = None
    """The claim the run was started with (verified by the run through an activity)."""
    start_claim_problem: str | None = None


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


def _check_child(workflow_type: object, args: Sequence[object]) -> None:
    if workflow_type != WORKFLOW_TYPE:
        return
    guards = guards_of_current_run()
    child = args[0] if args else None
    link = getattr(child, "parent", None)
    problem: str | None = None
    if guards is None or guards.allowlist is None:
        problem = "the run's policy is not resolved, so it may not start sub-agents"
    elif link is None:
        problem = "a sub-agent run must name its parent"
    else:
        problem = guards.allowlist.denial(link.tool)
        tool = next((t for t in guards.allowlist.spec.tools if t.name == link.tool), None)
        if problem is None and (tool is None or tool.sub_agent != getattr(child, "agent", None)):
            problem = f"tool {link.tool!r} does not run agent {getattr(child, 'agent', None)!r}"
    if problem:
        workflow.logger.warning("policy interceptor refused a sub-agent: %s", problem)
        raise ApplicationError(f"policy: {problem}", type=PolicyDenied.__name__, non_retryable=True)


class _Outbound(WorkflowOutboundInterceptor):
    async def start_child_workflow(
        self, input: StartChildWorkflowInput
    ) -> ChildWorkflowHandle[Any, Any]:
        _check_child(input.workflow, input.args)
        return await super().start_child_workflow(input)

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


# ------------------------------------------------------------------------------------ identity


def read_claim(headers: Mapping[str, Payload]) -> Claim | None:
    """The ``spine_principal`` claim in a call's headers, or None when there is none.

    Raises:
        IdentityError: the header is there but is not a claim.
    """
    raw = headers.get(HEADER)
    if raw is None:
        return None
    try:
        [value] = PayloadConverter.default.from_payloads([raw])
    except Exception as err:  # noqa: BLE001  # any decoding failure: the header is not a claim
        raise IdentityError(f"header {HEADER!r} cannot be decoded: {err}") from None
    return parse_claim(value)


def refusal(message: str) -> ApplicationError:
    """A final refusal of a decision or command: non-retryable, typed, one line."""
    return ApplicationError(message, type="DecisionRefused", non_retryable=True)


M = TypeVar("M", bound=BaseModel)


def decode(raw: RawValue, model: type[M]) -> tuple[M | None, str | None]:
    """A signal's or update's payload as `model`, or None and what is wrong with it (one line).

    Updates and signals take their payload raw and decode it here, so a payload that is not a
    decision (or command) is refused like any other bad decision, naming the field, instead of
    failing in the SDK as a retryable ``RuntimeError`` (updates) or a dropped signal.
    """
    try:
        value = workflow.payload_converter().from_payload(raw.payload)
        return model.model_validate(value), None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        return None, f"invalid {model.__name__}: {where}: {first['msg']}"
    except Exception as err:  # noqa: BLE001  # anything that does not decode is refused, not fatal
        return None, f"invalid {model.__name__}: {type(err).__name__}"


def decoded(payload: object, model: type[M]) -> M:
    """An update's payload as `model` (decoded already by the identity interceptor, or raw).

    Raises:
        ApplicationError: ``DecisionRefused``, naming what is wrong with the payload.
    """
    if isinstance(payload, model):
        return payload
    if not isinstance(payload, RawValue):
        raise refusal(f"the payload is not a {model.__name__}")
    value, problem = decode(payload, model)
    if value is None:
        raise refusal(problem or f"the payload is not a {model.__name__}")
    return value


#: Update name -> (purpose of the claim it needs, the payload it carries).
_SIGNED_UPDATES: dict[str, tuple[Purpose, type[BaseModel]]] = {
    UPDATE_DECIDE: ("decide", ApprovalDecision),
    UPDATE_OPERATE: ("operate", OperatorCommand),
}


class _IdentityInbound(WorkflowInboundInterceptor):
    """Hands each call's claim to the run: verified here for updates (their validators run
    once, never on replay), passed on unverified for starts and signals (the run verifies those
    through an activity, so the verdict is in history)."""

    keyring: ClassVar[Keyring]

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        guards = guards_of_current_run()
        if guards is not None:
            try:
                guards.start_claim = read_claim(input.headers)
            except IdentityError as err:
                guards.start_claim_problem = str(err)
        return await self.next.execute_workflow(input)

    async def handle_signal(self, input: HandleSignalInput) -> None:
        try:
            claim = read_claim(input.headers)
        except IdentityError:
            claim = None
        token = CURRENT.set(claim)
        try:
            await self.next.handle_signal(input)
        finally:
            CURRENT.reset(token)

    def handle_update_validator(self, input: HandleUpdateInput) -> None:
        ledger = (
            workflow.info().workflow_type == LEDGER_WORKFLOW_TYPE and input.update in LEDGER_UPDATES
        )
        signed = _SIGNED_UPDATES.get(input.update)
        purpose: Purpose | None = "ledger" if ledger else (signed[0] if signed else None)
        if purpose is None or (not ledger and guards_of_current_run() is None):
            return self.next.handle_update_validator(input)
        payload = input.args[0] if input.args else None
        if signed is not None and isinstance(payload, RawValue):
            # Decoded here, so a payload that is not a decision is a refusal, not a crash.
            payload = decoded(payload, signed[1])
            input.args = [payload, *input.args[1:]]
        if not isinstance(payload, BaseModel):
            raise refusal(f"{input.update}: the payload is not a {purpose} payload")
        try:
            claim = read_claim(input.headers)
            if claim is None:
                raise IdentityError(
                    f"unauthenticated: no {HEADER!r} header (sign with `spine`, or see "
                    "`spine sign --help` for the Temporal CLI)"
                )
            principal = self.keyring.verify(
                claim,
                purpose=purpose,
                workflow_id=workflow.info().workflow_id,
                payload_digest=digest(payload.model_dump(mode="json")),
            )
            if ledger and principal.name not in self.keyring.grants.workers:
                raise IdentityError(
                    f"principal {principal.name!r} is not a Spine worker; only workers "
                    "operate budget ledgers"
                )
        except IdentityError as err:
            workflow.logger.warning("refused %s: %s", input.update, err)
            raise refusal(str(err)) from None
        token = VERIFIED.set(principal)
        try:
            self.next.handle_update_validator(input)
        finally:
            VERIFIED.reset(token)

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        try:
            claim = read_claim(input.headers)
        except IdentityError:
            claim = None
        token = CURRENT.set(claim)
        try:
            return await self.next.handle_update_handler(input)
        finally:
            CURRENT.reset(token)


class IdentityInterceptor(Interceptor):
    """Register on the worker (the :class:`~spine.SpinePlugin` does): verified principals."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        keyring = self.keyring

        class _Configured(_IdentityInbound):
            pass

        _Configured.keyring = keyring
        return _Configured
