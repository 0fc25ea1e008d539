"""Spine's metrics, recorded through Temporal's metric meters (Prometheus via the worker runtime).

Stdlib and temporalio only, so workflow code may import it (it is a sandbox passthrough module).
In a workflow every helper records through ``workflow.metric_meter()``, which records nothing
while history is replayed (after a worker restart, a cache eviction or a query on a closed run);
in an activity through ``activity.metric_meter()``; anywhere else the helpers do nothing. When
the worker's runtime exports no metrics (``SPINE_METRICS_ADDR`` unset) Temporal's meter is a
no-op, so calling them costs next to nothing.

Metric (Prometheus name)       kind              labels                      recorded by
spine_runs                     counter           agent, status               telemetry interceptor
spine_run_steps                histogram         agent, status               telemetry interceptor
spine_run_retries              histogram         agent, status               telemetry interceptor
spine_run_cost_usd             histogram (float) agent, status               telemetry interceptor
spine_approvals_requested      counter           agent, tool                 workflow code
spine_approvals_decided        counter           agent, tool, decision       telemetry interceptor
spine_policy_refusals          counter           agent, tool, reason         workflow code
spine_model_calls              counter           provider, model, outcome    telemetry interceptor
spine_model_tokens             counter           provider, model, type       telemetry interceptor
spine_model_cost_usd           histogram (float) provider, model             telemetry interceptor
spine_tool_calls               counter           tool, outcome               telemetry interceptor
spine_tool_failures            counter           tool, error_type            telemetry interceptor
spine_retries                  counter           kind, name                  telemetry interceptor

Approvals waiting right now: ``sum(spine_approvals_requested) - sum(spine_approvals_decided)``.
Temporal adds ``namespace``, ``task_queue`` and ``workflow_type`` (and ``activity_type`` in
activities) to every Spine metric, next to its own ``temporal_*`` SDK metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

from temporalio import activity, workflow
from temporalio.common import MetricMeter

Labels = Mapping[str, str | int | float | bool]


def _meter() -> MetricMeter | None:
    """The replay-aware meter of the current workflow or activity, or None elsewhere."""
    if workflow.in_workflow():
        return workflow.metric_meter()
    if activity.in_activity():
        return activity.metric_meter()
    return None


def _count(name: str, description: str, labels: Labels, value: int = 1) -> None:
    meter = _meter()
    if meter is not None and value > 0:
        meter.create_counter(name, description).add(value, labels)


def _histogram(name: str, description: str, labels: Labels, value: int, unit: str = "") -> None:
    meter = _meter()
    if meter is not None:
        meter.create_histogram(name, description, unit or None).record(max(value, 0), labels)


def _histogram_float(name: str, description: str, labels: Labels, value: float, unit: str) -> None:
    meter = _meter()
    if meter is not None:
        meter.create_histogram_float(name, description, unit).record(max(value, 0.0), labels)


# --- called from workflow code ---------------------------------------------------------------


def record_run_outcome(agent: str, status: str, steps: int, usd: float, retries: int = 0) -> None:
    """A run closed with `status` after `steps` steps, `retries` retries and `usd` spent.

    The telemetry interceptor calls this when ``AgentWorkflow`` returns; workflow code must not
    call it as well, or runs are counted twice.
    """
    labels = {"agent": agent, "status": status}
    _count("spine_runs", "Agent runs closed, by outcome", labels)
    _histogram("spine_run_steps", "Steps (model turns) per closed run", labels, steps)
    _histogram("spine_run_retries", "Activity retries per closed run", labels, retries)
    _histogram_float("spine_run_cost_usd", "Model cost per closed run", labels, usd, "USD")


def record_approval_requested(agent: str, tool: str) -> None:
    """A tool call started waiting for a person's approval; call it where the run starts to wait."""
    _count(
        "spine_approvals_requested",
        "Tool calls that waited for approval",
        {"agent": agent, "tool": tool},
    )


def record_approval_decided(agent: str, tool: str, decision: str) -> None:
    """An approval was decided (`approve` or `reject`); the telemetry interceptor calls this."""
    _count(
        "spine_approvals_decided",
        "Approvals decided, by decision",
        {"agent": agent, "tool": tool, "decision": decision},
    )


def record_policy_refusal(agent: str, tool: str, reason: str) -> None:
    """The workflow refused a tool call the model proposed (`reason`: a short fixed word such as
    ``not_allowed``, ``unknown_tool`` or ``invalid_arguments``, never free text)."""
    _count(
        "spine_policy_refusals",
        "Tool calls refused before running, by reason",
        {"agent": agent, "tool": tool, "reason": reason},
    )


# --- called from the activity side (the telemetry interceptor) --------------------------------


def record_model_call(
    provider: str,
    model: str,
    *,
    ok: bool,
    attempt: int,
    input_tokens: int = 0,
    output_tokens: int = 0,
    usd: float | None = None,
) -> None:
    """One attempt of the model activity, with its usage when it succeeded."""
    labels = {"provider": provider, "model": model}
    outcome = "ok" if ok else "error"
    _count("spine_model_calls", "Model call attempts", {**labels, "outcome": outcome})
    _count("spine_model_tokens", "Model tokens", {**labels, "type": "input"}, input_tokens)
    _count("spine_model_tokens", "Model tokens", {**labels, "type": "output"}, output_tokens)
    if usd is not None:
        _histogram_float("spine_model_cost_usd", "Model cost per call", labels, usd, "USD")
    if attempt > 1:
        _count("spine_retries", "Activity retry attempts", {"kind": "model", "name": provider})


def record_tool_call(tool: str, *, ok: bool, attempt: int, error_type: str | None = None) -> None:
    """One attempt of a tool activity."""
    outcome = "ok" if ok else "error"
    _count("spine_tool_calls", "Tool call attempts", {"tool": tool, "outcome": outcome})
    if not ok:
        _count(
            "spine_tool_failures",
            "Failed tool call attempts, by error type",
            {"tool": tool, "error_type": error_type or "unknown"},
        )
    if attempt > 1:
        _count("spine_retries", "Activity retry attempts", {"kind": "tool", "name": tool})
