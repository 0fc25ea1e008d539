"""The Spine worker process: ``spine worker``, ``python worker.py`` or ``python -m spine.worker``.

Reads its settings from the environment (:meth:`SpineConfig.from_env`), connects with Spine's
data converter, runs a Temporal worker with :class:`~spine.plugin.SpinePlugin` and telemetry
until SIGINT/SIGTERM, then drains in-flight tasks. Startup mistakes (policy, tool definitions,
telemetry settings, an unreachable Temporal, a shared database that cannot be reached or
migrated) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime
from temporalio.worker import Worker

from spine.activities.tools import ToolDefinitionError
from spine.client.runs import SpineClientError, connect
from spine.guardrails.policy import PolicyError, load_policy
from spine.observability.telemetry import TelemetryError, telemetry_from_env
from spine.plugin import AgentModuleError, SpineConfig, SpinePlugin, load_registry
from spine.store import StoreUnavailable

log = logging.getLogger("spine.worker")


async def run_worker(config: SpineConfig | None = None) -> None:
    """Connect, serve until SIGINT/SIGTERM, then drain gracefully."""
    config = config or SpineConfig.from_env()
    # The policy and the agents first: a mistake there is named before anything connects.
    policy = load_policy(config.policy_path)
    registry = load_registry(config.agent_modules)
    telemetry = telemetry_from_env(config.settings)
    if telemetry.runtime is not None:
        Runtime.set_default(telemetry.runtime)
    client = await connect()
    worker = Worker(
        client,
        task_queue=config.task_queue,
        plugins=[
            SpinePlugin(config, policy=policy, registry=registry),
            *telemetry.worker_plugins(policy.price_table()),
        ],
        max_concurrent_activities=config.max_concurrent_activities,
    )
    log.info("telemetry: %s", telemetry.summary)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with worker:
            log.info("spine worker serving task queue %r", config.task_queue)
            await stop.wait()
            log.info("shutting down: finishing in-flight tasks")
    finally:
        telemetry.shutdown()
    log.info("worker stopped")


class RetryableFailureFilter(logging.Filter):
    """One line, not a traceback, for an activity attempt that failed in a way Temporal retries.

    The SDK logs every failed attempt with its traceback; under a dependency outage that is
    megabytes a minute of the same frames. The error type and message are what matter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, ApplicationError) and not err.non_retryable:
            record.msg = f"{record.getMessage()}: {err.type}: {err.message}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def importable_cwd() -> None:
    """Put the current directory on the import path, as ``python worker.py`` (run where the
    agent lives) and ``python -m`` do, so ``SPINE_AGENTS=my_agent`` finds ``./my_agent.py``
    from the ``spine`` console script too. Appended: it never shadows an installed module."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.append(cwd)


def main() -> None:
    """Entry point: log setup, run the worker, exit 2 with one line on a startup mistake."""
    importable_cwd()
    logging.basicConfig(
        level=os.environ.get("SPINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("temporalio.activity").addFilter(RetryableFailureFilter())
    code = 0
    try:
        asyncio.run(run_worker())
    except (
        PolicyError,
        ToolDefinitionError,
        TelemetryError,
        SpineClientError,
        AgentModuleError,
    ) as err:
        print(f"spine worker: error: {err}", file=sys.stderr)
        code = 2
    except StoreUnavailable as err:  # the shared database is down or refuses the migrations
        print(f"spine worker: error: {err.message}", file=sys.stderr)
        code = 2
    except ValueError as err:  # a malformed setting (SPINE_DATABASE_URL, a size, ...)
        print(f"spine worker: error: {err}", file=sys.stderr)
        code = 2
    # Leave without interpreter finalisation: the SDK's native threads can still touch Python
    # while it finalises and abort a clean exit (sdk-python#300). Everything is flushed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
