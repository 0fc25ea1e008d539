"""How often a working run refreshes its step and cost search attributes: the policy's
`runtime.progress_every_s`, pinned in the agent spec the run resolves at its start (so it replays
as decided); a spec from before the setting keeps the interval its run started with. Each
refresh is a history event and a visibility write, which under load is server work per run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spine.activities.llm import build_spec
from spine.guardrails.policy import PolicyError, load_policy
from spine.payloads import AgentSpec, ResolveAgentInput
from spine.plugin import load_registry
from spine.workflows.state import RunState
from spine.workflows.visibility import PROGRESS_EVERY, Visibility
from tests.helpers import custom_policy

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _view(spec: AgentSpec) -> tuple[Visibility, RunState, list[list[str]], list[datetime]]:
    state = RunState(spec=spec)
    sent: list[list[str]] = []
    clock = [T0]
    view = Visibility(
        state,
        agent=spec.name,
        account="acme",
        now=lambda: clock[0],
        upsert=lambda pairs: sent.append([p.key.name for p in pairs]),
    )
    return view, state, sent, clock


def _spec(tmp_path, progress_every_s: float | None) -> AgentSpec:
    policy = load_policy(
        custom_policy(
            tmp_path,
            lambda p: p.setdefault("runtime", {}).update({"progress_every_s": 45}),
        )
    )
    spec = build_spec(
        load_registry(["spine.demo.agent"]),
        policy,
        ResolveAgentInput(agent="refund-agent", role="support"),
    )
    assert spec.progress_every_s == 45  # the policy's setting reaches the pinned spec
    return spec.model_copy(update={"progress_every_s": progress_every_s})


def _progress_at(view: Visibility, state: RunState, clock: list[datetime], seconds: float) -> None:
    clock[0] = T0 + timedelta(seconds=seconds)
    state.step += 1
    view.publish(progress=True)


def test_a_run_refreshes_its_progress_at_most_every_interval_of_its_spec(tmp_path) -> None:
    view, state, sent, clock = _view(_spec(tmp_path, 60))
    view.publish(progress=True)  # the first publish sends what is not yet known
    assert len(sent) == 1
    for seconds in (5, 20, 40, 59):
        _progress_at(view, state, clock, seconds)
    assert len(sent) == 1, "steps within a minute refresh nothing"
    _progress_at(view, state, clock, 61)
    assert sent[-1] == ["SpineSteps"] and len(sent) == 2
    # A change of status is shown at once, whatever the interval.
    view.set("waiting_approval", "refund above 100")
    assert sent[-1] == ["SpineStatus"] and len(sent) == 3


def test_a_spec_from_before_the_setting_keeps_the_interval_its_run_started_with(
    tmp_path,
) -> None:
    view, state, sent, clock = _view(_spec(tmp_path, None))
    view.publish(progress=True)
    _progress_at(view, state, clock, PROGRESS_EVERY.total_seconds() - 1)
    assert len(sent) == 1
    _progress_at(view, state, clock, PROGRESS_EVERY.total_seconds() + 1)
    assert len(sent) == 2
    # A spec recorded by an older worker has no such field at all: it decodes to None.
    old = _spec(tmp_path, None).model_dump(mode="json")
    del old["progress_every_s"]
    assert AgentSpec.model_validate(old).progress_every_s is None


@pytest.mark.parametrize("value", [0, -5, 86400])
def test_the_policy_refuses_an_interval_out_of_bounds(tmp_path, value) -> None:
    path = custom_policy(
        tmp_path, lambda p: p.setdefault("runtime", {}).update({"progress_every_s": value})
    )
    with pytest.raises(PolicyError, match="progress_every_s"):
        load_policy(path)
