"""Client side of Spine: typed helpers (`spine.client.runs`), the `spine` command and the demo."""

from spine.client.runs import (
    RunHandle,
    SpineClientError,
    TemporalUnreachable,
    connect,
    decide,
    describe,
    get_run,
    get_state,
    signal_approval,
    signal_operator,
    start_run,
    task_queue,
    wait_result,
    watch,
    web_ui_url,
)

__all__ = [
    "RunHandle",
    "SpineClientError",
    "TemporalUnreachable",
    "connect",
    "decide",
    "describe",
    "get_run",
    "get_state",
    "signal_approval",
    "signal_operator",
    "start_run",
    "task_queue",
    "wait_result",
    "watch",
    "web_ui_url",
]
