"""`SpineAlertsWorkflow`: one alert check as a workflow, for a Temporal Schedule to start.

`spine alerts schedule` creates the Schedule (every 5 minutes by default, overlapping runs
skipped); each run evaluates the rules once through the ``spine.alerts_check`` activity, so every
check, its retries and what it found are in Event History.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from spine.contract import ACTIVITY_ALERTS_CHECK
    from spine.observability.alerts import AlertsCheckInput, AlertsCheckResult

ALERTS_WORKFLOW_TYPE = "SpineAlertsWorkflow"
ALERTS_SCHEDULE_ID = "spine-alerts"


@workflow.defn(name=ALERTS_WORKFLOW_TYPE)
class SpineAlertsWorkflow:
    @workflow.run
    async def run(self, request: AlertsCheckInput) -> AlertsCheckResult:
        # Pin "now" in the input so every retry of the activity judges the same window.
        request = request.model_copy(update={"at": request.at or workflow.now()})
        return await workflow.execute_activity(
            ACTIVITY_ALERTS_CHECK,
            request,
            result_type=AlertsCheckResult,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=60),
                maximum_attempts=10,
            ),
            summary="alerts check",
        )
