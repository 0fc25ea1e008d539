"""Parking, without a server: operator commands, the parking timeout, the retry budget."""

from __future__ import annotations

from datetime import timedelta

import pytest
from temporalio.exceptions import ApplicationError

from spine.contract import OperatorCommand
from spine.guardrails.parking import Parking
from spine.payloads import PrincipalView
from spine.workflows.state import StopRun
from tests.unit.kit import FakeRun, state

OPS = PrincipalView(name="ops", roles=["operator"])


def command(action: str, role: str = "operator") -> OperatorCommand:
    return OperatorCommand(action=action, by="ops", role=role)  # type: ignore[arg-type]


async def test_an_operator_retries_a_parked_step():
    """A parked run waits for an operator with a role the policy names; retry resumes it."""
    run = FakeRun()
    parking = Parking(state(), run.hooks())

    def operator() -> None:
        assert parking.problem(command("retry", role="viewer"), "parked", OPS) == (
            "principal 'ops' does not hold role 'viewer' (holds: operator)"
        )
        viewer = PrincipalView(name="ops", roles=["viewer"])
        assert parking.problem(command("retry", role="viewer"), "parked", viewer) == (
            "role 'viewer' may not operate runs; allowed: operator, supervisor"
        )
        assert parking.problem(command("retry"), "parked", None) == (
            "unauthenticated: the command carries no verified principal"
        )
        assert parking.problem(command("skip"), "parked", OPS) == (
            "a model turn cannot be skipped; use retry, compensate or abort"
        )
        parking.accept(command("retry"))

    run.answers = [operator]
    got = await parking.park("model call at step 1 failed: ...", skippable=False)
    assert got.action == "retry"
    assert run.statuses == [("parked", "model call at step 1 failed: ..."), ("running", None)]
    assert parking.problem(command("retry"), "running", OPS) == "the run is running, not parked"


@pytest.mark.parametrize(
    ("action", "keep_status"), [("compensate", False), ("abort", True)], ids=["compensate", "abort"]
)
async def test_compensate_and_abort_end_the_run(action: str, keep_status: bool):
    """Compensate ends the run and undoes; abort ends it and keeps `failed`."""
    run = FakeRun()
    parking = Parking(state(), run.hooks())
    run.answers = [lambda: parking.accept(command(action))]
    with pytest.raises(StopRun) as stopped:
        await parking.park("tool failed", skippable=True)
    assert stopped.value.keep_status is keep_status


async def test_nobody_comes_in_time():
    """After the policy's parking timeout the run fails (and compensates)."""
    run = FakeRun(answers=["timeout"])
    parking = Parking(state(), run.hooks())
    with pytest.raises(StopRun, match="parked longer than 259200s without an operator; why"):
        await parking.park("why", skippable=True)
    assert run.waits == [timedelta(hours=72)]


def test_the_retry_budget_caps_each_call():
    """A call gets its own attempts, but never more than the run has retries left."""
    parking = Parking(state(retries=98), FakeRun().hooks())
    assert parking.retry_policy(8, 0.5, 20).maximum_attempts == 3
    parking.failed(ApplicationError("down", type="DependencyUnavailable"))
    assert parking.state.retries == 100
    assert parking.retry_policy(8, 0.5, 20).maximum_attempts == 1
