"""The Spine worker: the one place that wires converter, sandbox, activities and agents.

Run it with ``python worker.py`` or ``spine worker``. Tests and ``spine demo`` build their workers
through :func:`build_worker` too, so what is tested is what runs.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime
from temporalio.worker import Plugin as WorkerPlugin
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from spine.activities.breakers import Breakers
from spine.activities.budget import BudgetActivities
from spine.activities.llm import ModelActivities, ModelProvider
from spine.activities.tools import (
    Registry,
    SecretResolver,
    ToolDefinitionError,
    ToolRunner,
    make_tool_activities,
)
from spine.activities.transcript import TranscriptStore
from spine.contract import DEFAULT_LEDGER_TASK_QUEUE, DEFAULT_TASK_QUEUE, rate_limited_queue
from spine.guardrails.interceptor import PolicyInterceptor
from spine.guardrails.policy import Policy, PolicyError, load_policy
from spine.guardrails.secrets import NoSecrets, VaultSecrets
from spine.observability.alerts import AlertActivities, AlertEngine
from spine.observability.audit import AuditActivities, AuditStore, store_from_env
from spine.observability.telemetry import TelemetryError, telemetry_from_env
from spine.workflows.agent import AgentWorkflow
from spine.workflows.alerts import SpineAlertsWorkflow
from spine.workflows.ledger import BudgetLedger

log = logging.getLogger("spine.worker")

#: Modules the workflow sandbox passes through instead of re-importing per run.
PASSTHROUGH_MODULES = (
    "pydantic",  # models cross the boundary; re-importing per run is slow and breaks isinstance
    "pydantic_core",  # compiled core of pydantic, must be shared with it
    "jsonschema",  # validates model arguments; pure and deterministic, heavy to import
    "referencing",  # jsonschema's $ref resolver
    "rpds",  # compiled persistent maps used by referencing
    "spine.contract",  # stdlib + pydantic only: the request, result and decision models
    "spine.payloads",  # stdlib + pydantic only: activity inputs and results
    "spine.workflows.state",  # stdlib + pydantic only: the run state and its transitions
    "spine.activities.errors",  # stdlib + temporalio only: the error taxonomy
    "spine.guardrails.hooks",  # stdlib only: what guards need from the run
    "spine.guardrails.allowlist",  # pure: the one allowlist (loop and interceptor share it)
    "spine.guardrails.approvals",  # pure: approval rules and the approval desk
    "spine.guardrails.budget",  # pure: prices, limits, reservations
    "spine.guardrails.parking",  # pure: operator commands and the retry budget
    "spine.guardrails.saga",  # pure: compensation order
    "spine.guardrails.interceptor",  # temporalio only; the backstops, and RunGuards they read
    "spine.observability.metrics",  # stdlib + temporalio only: replay-aware metric helpers
    "spine.observability.trail",  # pure: the run's queue of audit entries
)


@dataclass
class WorkerConfig:
    """Everything a worker needs besides the Temporal client. Defaults come from the env."""

    task_queue: str = DEFAULT_TASK_QUEUE
    policy_path: Path | None = None
    state_dir: Path = Path(".spine")
    agent_modules: tuple[str, ...] = ("spine.demo.agent",)
    settings: Mapping[str, str] = field(default_factory=dict)
    secrets: SecretResolver | None = None
    providers: Mapping[str, ModelProvider] | None = None
    search_attributes: bool = True
    max_concurrent_activities: int = 200
    audit_store: AuditStore | None = None
    """The audit log; default: ``SPINE_AUDIT_DSN`` from `settings`, else SQLite in `state_dir`."""
    ledger: bool = True
    ledger_task_queue: str = DEFAULT_LEDGER_TASK_QUEUE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        env = dict(os.environ if env is None else env)
        modules = tuple(
            m.strip() for m in env.get("SPINE_AGENTS", "spine.demo.agent").split(",") if m
        )
        return cls(
            task_queue=env.get("SPINE_TASK_QUEUE", DEFAULT_TASK_QUEUE),
            policy_path=Path(env["SPINE_POLICY"]) if env.get("SPINE_POLICY") else None,
            state_dir=Path(env.get("SPINE_STATE_DIR", ".spine")),
            agent_modules=modules,
            settings=env,
            secrets=VaultSecrets.from_env(env),
            search_attributes=env.get("SPINE_SEARCH_ATTRIBUTES", "1") not in ("0", "false"),
            ledger=env.get("SPINE_LEDGER_WORKER", "1") not in ("0", "false"),
            ledger_task_queue=env.get("SPINE_LEDGER_TASK_QUEUE", DEFAULT_LEDGER_TASK_QUEUE),
        )


def load_registry(modules: tuple[str, ...]) -> Registry:
    """Import each agent module and let it `register(registry)`; check the result."""
    registry = Registry()
    for name in modules:
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if register is None:
            raise ValueError(f"agent module {name!r} has no register(registry) function")
        register(registry)
    registry.check()
    return registry


def default_providers(settings: Mapping[str, str]) -> dict[str, ModelProvider]:
    """OpenAI and Anthropic adapters with SDK retries off; keys and base URLs from settings."""
    from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env

    return {
        "openai": openai_provider_from_env(settings),
        "anthropic": anthropic_provider_from_env(settings),
    }


class SpineWorker:
    """The agent worker and, unless disabled, the budget-ledger worker, run together.

    Use it like a Temporal `Worker`: ``async with build_worker(...)`` or ``await w.run()``.
    """

    def __init__(self, workers: Sequence[Worker], http: httpx.AsyncClient) -> None:
        self.workers = list(workers)
        self._http = http

    @property
    def task_queue(self) -> str:
        return self.workers[0].task_queue

    async def __aenter__(self) -> SpineWorker:
        for worker in self.workers:
            await worker.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in reversed(self.workers):
            await worker.__aexit__(None, None, None)
        await self._http.aclose()

    async def run(self) -> None:
        try:
            await asyncio.gather(*(w.run() for w in self.workers))
        finally:
            await self._http.aclose()

    async def shutdown(self) -> None:
        await asyncio.gather(*(w.shutdown() for w in self.workers))


def _sandbox() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    )


def build_ledger_worker(client: Client, task_queue: str = DEFAULT_LEDGER_TASK_QUEUE) -> Worker:
    """A worker serving only the per-account budget ledgers (`SpineBudgetLedger`)."""
    return Worker(
        client, task_queue=task_queue, workflows=[BudgetLedger], workflow_runner=_sandbox()
    )


def build_worker(
    client: Client,
    *,
    task_queue: str | None = None,
    config: WorkerConfig | None = None,
    policy: Policy | None = None,
    extra_workflows: Sequence[type] = (),
    plugins: Sequence[WorkerPlugin] = (),
) -> SpineWorker:
    """A worker serving `AgentWorkflow` and every registered tool on `task_queue`, plus the
    budget ledgers on `config.ledger_task_queue` (unless `config.ledger` is False).

    Raises :class:`spine.guardrails.policy.PolicyError` or
    :class:`spine.activities.tools.ToolDefinitionError`
    with a clear message when the policy or a tool definition is wrong.
    """
    config = config or WorkerConfig.from_env()
    policy = policy or load_policy(config.policy_path)
    registry = load_registry(config.agent_modules)
    http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
    breakers = Breakers(policy.runtime.breaker_threshold, policy.runtime.breaker_reset_s)
    runner = ToolRunner(registry, config.secrets or NoSecrets(), http, config.settings, breakers)
    audit = AuditActivities(config.audit_store or store_from_env(config.settings, config.state_dir))
    models = ModelActivities(
        registry,
        policy,
        TranscriptStore(config.state_dir / "transcripts.db"),
        config.providers if config.providers is not None else default_providers(config.settings),
        search_attributes=config.search_attributes,
        breakers=breakers,
        audit_append=audit.store.append,
    )
    budget = BudgetActivities(client, config.ledger_task_queue)
    alerts = AlertActivities(
        AlertEngine.from_policy(audit.store, policy, config.settings, http=http)
    )
    agents = Worker(
        client,
        task_queue=task_queue or config.task_queue,
        workflows=[AgentWorkflow, SpineAlertsWorkflow, *extra_workflows],
        activities=[
            models.resolve_agent,
            models.model_call,
            budget.apply,
            audit.append,
            alerts.check,
            *make_tool_activities(runner),
        ],
        workflow_runner=_sandbox(),
        interceptors=[PolicyInterceptor()],
        plugins=list(plugins),
        max_concurrent_activities=config.max_concurrent_activities,
    )
    workers = [agents]
    tool_activities = make_tool_activities(runner)
    for group, rate in sorted(policy.rate_limits.items()):
        # Temporal enforces this rate on the queue for all workers polling it, fleet-wide.
        workers.append(
            Worker(
                client,
                task_queue=rate_limited_queue(agents.task_queue, group),
                activities=tool_activities,
                max_task_queue_activities_per_second=rate,
                plugins=list(plugins),  # tool spans and metrics come from the plugin
                max_concurrent_activities=config.max_concurrent_activities,
            )
        )
    if config.ledger:
        workers.append(build_ledger_worker(client, config.ledger_task_queue))
    return SpineWorker(workers, http)


async def run_worker(config: WorkerConfig | None = None) -> None:
    """Connect, serve until SIGINT/SIGTERM, then drain gracefully."""
    from spine.client.runs import connect

    config = config or WorkerConfig.from_env()
    telemetry = telemetry_from_env(config.settings)
    if telemetry.runtime is not None:
        Runtime.set_default(telemetry.runtime)
    client = await connect()
    policy = load_policy(config.policy_path)
    worker = build_worker(
        client,
        config=config,
        policy=policy,
        plugins=telemetry.worker_plugins(policy.price_table()),
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


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("SPINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("temporalio.activity").addFilter(RetryableFailureFilter())
    from spine.client.runs import SpineClientError  # the client side imports lazily too

    code = 0
    try:
        asyncio.run(run_worker())
    except (PolicyError, ToolDefinitionError, TelemetryError, SpineClientError) as err:
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
