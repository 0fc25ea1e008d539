"""Replay is deterministic: recorded histories replay against today's `AgentWorkflow`.

``tests/histories/*.json`` are event histories of representative runs: the demo with an approval,
a run that compensates, one that parks and is retried by an operator, one that continues as new
(one file per run of the chain), and a fork. Each is replayed by a `Replayer` with the
:class:`~spine.SpinePlugin` every worker runs with (sandbox passthrough modules, policy
interceptor, pydantic converter), so a workflow change that is not replay-safe fails here, in CI,
before it reaches running workflows. Fix the change (``workflow.patched``), or, if the new
commands are intended and no old run is in flight, regenerate the files and commit them::

    python -m tests.record_histories
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from spine.plugin import SpineConfig, SpinePlugin

HISTORIES = Path(__file__).parent / "histories"
FILES = sorted(HISTORIES.glob("*.json"))


def _replayer() -> Replayer:
    """A replayer set up by the plugin every Spine worker runs with."""
    return Replayer(workflows=[], plugins=[SpinePlugin(SpineConfig())])


def _history(path: Path, text: str | None = None) -> WorkflowHistory:
    """The file's history; the workflow id is ``history-<scenario>`` (see the recorder)."""
    scenario = path.name.split(".")[0]
    return WorkflowHistory.from_json(f"history-{scenario}", text or path.read_text())


def test_every_scenario_is_recorded():
    """The recorded set covers approval, compensation, parking, continue-as-new, a fork, outputs
    stored by reference, a run that moved to a new build under worker versioning, a turn
    whose calls ran at once and the demo on the lean shape (`spine-lean-run`)."""
    scenarios = {p.name.split(".")[0] for p in FILES}
    assert scenarios == {
        "demo-approval",
        "compensation",
        "park-retry",
        "continue-as-new",
        "fork",
        "large-output",
        "rollout",
        "parallel",
        "lean-demo",
    }
    assert len([p for p in FILES if p.name.startswith("continue-as-new.")]) >= 2
    # The current shape: a local agent resolution behind its patch marker, and no upsert of
    # the search attributes the start carried.
    markers = []
    for event in json.loads((HISTORIES / "lean-demo.json").read_text())["events"]:
        marker = event.get("markerRecordedEventAttributes")
        if marker is not None:
            details = marker["details"]
            key = "patch-data" if marker["markerName"] == "core_patch" else "data"
            markers.append(json.loads(base64.b64decode(details[key]["payloads"][0]["data"])))
    assert {"id": "spine-lean-run", "deprecated": False} in markers
    assert "spine.resolve_agent" in [m.get("activity_type") for m in markers]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_history_replays(path: Path):
    """Today's workflow code makes the same commands as the recorded run did."""
    result = await _replayer().replay_workflow(_history(path))
    assert result.replay_failure is None


async def test_changed_commands_fail_replay():
    """A history whose commands differ from the code's (an activity renamed) fails replay."""
    path = HISTORIES / "demo-approval.json"
    data = json.loads(path.read_text())
    for event in data["events"]:
        scheduled = event.get("activityTaskScheduledEventAttributes")
        if scheduled and scheduled["activityType"]["name"].startswith("tool."):
            scheduled["activityType"]["name"] = "tool.renamed"
            break
    with pytest.raises(NondeterminismError):
        await _replayer().replay_workflow(_history(path, json.dumps(data)))
