"""Parking: a run whose step keeps failing waits for an operator; and the run's retry budget.

A step that exhausted its retries and its alternate path (fallback model or tool) parks the run:
status `parked` (the dead-letter queue is ``SpineStatus="parked"``), and the run waits for an
operator's `retry`, `skip` (a tool call only), `compensate` or `abort`, up to the policy's
``parking_timeout_s``, after which it fails and compensates. The operator's role must be one of
the policy's ``operator_roles``.

Every failed attempt, of model and tool calls alike, counts against the run's
``max_retries_per_run``: :meth:`Parking.retry_policy` caps each call's attempts by what is left.

Deterministic; waiting and audit go through :class:`~spine.guardrails.hooks.RunHooks`. A sandbox
passthrough module.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, RetryState

from spine.activities.errors import NON_RETRYABLE_TYPES
from spine.contract import OperatorCommand, RunStatus
from spine.guardrails.hooks import RunHooks
from spine.payloads import PrincipalView
from spine.workflows.state import RunState, StopRun, apply_retries


class Skipped(Exception):  # noqa: N818  # control flow: the operator chose to skip the call
    """An operator skipped a parked tool call."""

    def __init__(self, command: OperatorCommand) -> None:
        super().__init__(command.reason)
        self.command = command


class Parking:
    """Where a run waits for an operator, and how many retries it has left."""

    def __init__(self, state: RunState, hooks: RunHooks) -> None:
        self.state = state
        self._hooks = hooks
        self._command: OperatorCommand | None = None
        self._parked = False
        self._skippable = False
        self._attempt_cap = 1
        self._one_at_a_time = asyncio.Lock()
        self.refused: list[str] = []
        """Operator commands the run refused, one line each."""

    # -------------------------------------------------------------------------- parking

    async def park(self, why: str, *, skippable: bool) -> OperatorCommand:
        """Wait for an operator; `retry` and `skip` return, the others end the run.

        Calls of one turn that run at once park one at a time: an operator answers one reason.

        Raises:
            StopRun: the operator chose `compensate` or `abort`, or nobody came in time.
        """
        async with self._one_at_a_time:
            return await self._park(why, skippable=skippable)

    async def _park(self, why: str, *, skippable: bool) -> OperatorCommand:
        hooks = self._hooks
        timeout = self.state.agent.parking_timeout_s
        hooks.warn(f"run parked: {why}")
        self._parked, self._skippable, self._command = True, skippable, None
        hooks.set_status("parked", why)
        hooks.record("policy_decision", "spine", decision="parked", reason=why)
        await hooks.flush()
        try:
            await hooks.wait(lambda: self._command is not None, timedelta(seconds=timeout))
        except TimeoutError:
            self._parked = False
            raise StopRun(
                "failed",
                f"parked longer than {timeout:.0f}s without an operator; {why}",
            ) from None
        command = self._command
        assert command is not None
        self._parked, self._command = False, None
        self.state.path.append(
            f"step {self.state.step}: operator {command.by} ({command.role}) chose {command.action}"
            + (f": {command.reason}" if command.reason else "")
        )
        if command.action == "compensate":
            raise StopRun("failed", f"operator {command.by} asked to compensate; {why}")
        if command.action == "abort":
            raise StopRun("failed", f"aborted by operator {command.by}; {why}", keep_status=True)
        hooks.set_status("running", None)
        return command

    def problem(
        self, command: OperatorCommand, status: RunStatus, principal: PrincipalView | None
    ) -> str | None:
        """Why `command`, signed by `principal`, must be refused for a run that is `status`."""
        if principal is None:
            return "unauthenticated: the command carries no verified principal"
        if command.by != principal.name:
            return f"by {command.by!r} is not the principal who signed ({principal.name!r})"
        if command.role not in principal.roles:
            return (
                f"principal {principal.name!r} does not hold role {command.role!r} "
                f"(holds: {', '.join(principal.roles) or 'none'})"
            )
        roles = self.state.spec.operator_roles if self.state.spec else []
        if command.role not in roles:
            return f"role {command.role!r} may not operate runs; allowed: {', '.join(roles)}"
        if status != "parked" or not self._parked:
            return f"the run is {status}, not parked"
        if self._command is not None:
            return "an operator command for this parking is already being handled"
        if command.action == "skip" and not self._skippable:
            return "a model turn cannot be skipped; use retry, compensate or abort"
        return None

    def accept(self, command: OperatorCommand) -> None:
        """Take an acceptable command (check :meth:`problem` first)."""
        self._command = command
        self._audit(command, accepted=True)

    def refuse(self, command: OperatorCommand | None, problem: str, principal: str | None) -> None:
        """Record a refused command (audited with who really signed it, if anyone); a payload
        that was not a command at all is recorded too."""
        who = principal or "unauthenticated"
        action = command.action if command else "command"
        self._hooks.warn(f"refused operator {action} signed by {who}: {problem}")
        self.refused.append(f"operator {action} by {who}: {problem}")
        if command is None:
            self._hooks.record("operator", who, principal=who, reason=problem, accepted=False)
            return
        self._audit(command, accepted=False, problem=problem, principal=who)

    def _audit(
        self,
        command: OperatorCommand,
        *,
        accepted: bool,
        problem: str | None = None,
        principal: str | None = None,
    ) -> None:
        self._hooks.record(
            "operator",
            principal or command.by,
            action=command.action,
            by=command.by,
            principal=principal or command.by,
            role=command.role,
            reason=problem or command.reason,
            accepted=accepted,
        )

    # --------------------------------------------------------------------- retry budget

    def retry_policy(
        self, attempts: int, initial_interval_s: float, maximum_interval_s: float
    ) -> RetryPolicy:
        """A call's own attempts, capped by what is left of the run's retry budget."""
        left = max(self.state.agent.max_retries_per_run - self.state.retries, 0)
        self._attempt_cap = max(1, min(attempts, left + 1))
        return RetryPolicy(
            initial_interval=timedelta(seconds=initial_interval_s),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=maximum_interval_s),
            maximum_attempts=self._attempt_cap,
            non_retryable_error_types=NON_RETRYABLE_TYPES,
        )

    def failed(self, err: BaseException, *, cap: int | None = None) -> None:
        """A call scheduled with the last :meth:`retry_policy` (or with attempt cap `cap`, when
        calls run at once) failed: count its retries."""
        # A local activity that gives up surfaces as its own ApplicationError, without retry state.
        exhausted = getattr(err, "retry_state", None) == RetryState.MAXIMUM_ATTEMPTS_REACHED
        attempts = cap if cap is not None else self._attempt_cap
        used = attempts if exhausted or isinstance(err, ApplicationError) else 1
        apply_retries(self.state, used - 1)
