"""Who is asking: the run's checks of its starter, its carried state, and signed signals.

A new run verifies the claim it was started with (``spine.verify_principal``, so the verdict is
in history) and checks the request against it: `user` must be the principal, `role` one the
policy grants them, `account` one they may act for. A run that continues as new checks that its
carried state came from the run before it (``spine.verify_carry``); a carry a starter sent is
refused and forgotten. Signals are verified the same way before they count; updates are verified
by the identity interceptor in their validators.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RawValue

with workflow.unsafe.imports_passed_through():
    from spine.guardrails.identity import Claim, Purpose, payload_digest, request_digest
    from spine.guardrails.interceptor import decode as decode_payload
    from spine.payloads import PrincipalView
    from spine.workflows.state import AgentWorkflowInput, StopRun

from spine.workflows import calls

M = TypeVar("M", bound=BaseModel)


def refused(problem: str) -> StopRun:
    """The run ends `failed` before it did anything: nothing to undo."""
    return StopRun("failed", f"refused: {problem}", compensate=False)


async def admit(
    request: AgentWorkflowInput, claim: Claim | None, claim_problem: str | None
) -> PrincipalView:
    """The verified principal who started this run, checked against the request.

    Raises:
        StopRun: no claim, a claim that does not verify, or a request the principal may not make.
    """
    if claim_problem:
        raise refused(claim_problem)
    purpose: Purpose = "fork" if request.fork_from is not None else "start"
    verdict = await calls.verify_principal(
        claim, purpose, request_digest(request), workflow.info().start_time
    )
    principal = verdict.principal
    if verdict.problem or principal is None:
        raise refused(verdict.problem or "the claim did not verify")
    if request.user != principal.name:
        raise refused(f"user {request.user!r} is not the principal who signed ({principal.name!r})")
    if request.role not in principal.roles:
        raise refused(
            f"principal {principal.name!r} does not hold role {request.role!r} "
            f"(holds: {', '.join(principal.roles) or 'none'})"
        )
    if not principal.may_act_for(request.account):
        raise refused(f"principal {principal.name!r} may not act for account {request.account!r}")
    return principal


async def admit_carry() -> None:
    """Raises :class:`StopRun` unless the carried state came from this run's own chain."""
    verdict = await calls.verify_carry()
    if verdict.problem:
        raise refused(verdict.problem)


def decode(raw: RawValue, model: type[M]) -> tuple[M | None, str | None]:
    """A signal's payload as `model`, or None and what is wrong with it (in one line)."""
    return decode_payload(raw, model)


async def verified(
    claim: Claim | None, purpose: Purpose, payload: BaseModel
) -> tuple[PrincipalView | None, str | None]:
    """The principal who signed a signal's payload, or None and why not."""
    verdict = await calls.verify_principal(claim, purpose, payload_digest(payload), workflow.now())
    return verdict.principal, verdict.problem
