"""`SpinePlugin`: everything a Temporal worker needs to run Spine agents, as one plugin.

A worker is a few lines::

    from temporalio.worker import Worker
    from spine import SpineConfig, SpinePlugin, connect

    config = SpineConfig.from_env()              # SPINE_AGENTS, SPINE_POLICY, VAULT_ADDR, ...
    client = await connect()
    worker = Worker(client, task_queue=config.task_queue, plugins=[SpinePlugin(config)])
    async with worker:
        ...

The plugin adds `AgentWorkflow` (and the alerts workflow), the model, budget, audit, alert and
tool activities of the agents in ``config.agent_modules``, the policy interceptor, and the
sandbox passthrough modules (each with its reason). While the worker runs it also runs Spine's
companion workers on the same client: one per fleet-wide rate-limited tool group (the server
enforces the rate on that task queue for every worker at once) and the budget ledgers' worker.
Other plugins on the worker (telemetry, say) are given to the companions too.

The client must use Spine's data converter (pydantic, plus payload encryption when configured):
connect with :func:`spine.connect`, or pass the plugin to ``Client.connect(plugins=[...])``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.plugin import SimplePlugin
from temporalio.worker import Plugin as WorkerPlugin
from temporalio.worker import Worker, WorkerConfig, WorkerDeploymentConfig, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from spine.activities.blobs import DEFAULT_INLINE_BYTES, DEFAULT_MAX_OUTPUT_BYTES, BlobStore
from spine.activities.blobs import MIGRATIONS as BLOB_MIGRATIONS
from spine.activities.breakers import Breakers
from spine.activities.budget import BudgetActivities
from spine.activities.identity import IdentityActivities
from spine.activities.llm import ModelActivities
from spine.activities.providers.base import ModelProvider
from spine.activities.tools import Registry, SecretResolver, ToolRunner, make_tool_activities
from spine.activities.transcript import MIGRATIONS as TRANSCRIPT_MIGRATIONS
from spine.activities.transcript import TranscriptStore
from spine.client.identity import SigningInterceptor
from spine.contract import DEFAULT_LEDGER_TASK_QUEUE, DEFAULT_TASK_QUEUE, rate_limited_queue
from spine.guardrails.identity import Keyring
from spine.guardrails.interceptor import IdentityInterceptor, PolicyInterceptor
from spine.guardrails.policy import Policy, load_policy
from spine.guardrails.principals import VaultKeyring, VaultSigner
from spine.guardrails.secrets import NoSecrets, VaultSecrets
from spine.observability import live
from spine.observability.alerts import AlertActivities, AlertEngine
from spine.observability.audit import MIGRATIONS as AUDIT_MIGRATIONS
from spine.observability.audit import (
    AuditActivities,
    AuditStore,
    DatabaseAuditStore,
    store_from_env,
)
from spine.observability.streams import LiveSink, NewEvent, StreamStore, stream_store_from_env
from spine.runner import for_converter
from spine.store import Database, database_from_env
from spine.workflows.agent import AgentWorkflow
from spine.workflows.agentcheck import SpineAgentCheck
from spine.workflows.alerts import SpineAlertsWorkflow
from spine.workflows.ledger import BudgetLedger

#: Modules the workflow sandbox passes through instead of re-importing per run.
PASSTHROUGH_MODULES = (
    "pydantic",  # models cross the boundary; re-importing per run is slow and breaks isinstance
    "pydantic_core",  # compiled core of pydantic, must be shared with it
    "jsonschema",  # validates model arguments; pure and deterministic, heavy to import
    "referencing",  # jsonschema's $ref resolver
    "rpds",  # compiled persistent maps used by referencing
    "cryptography",  # Ed25519 signature checks in update validators; compiled, import once
    "spine.contract",  # stdlib + pydantic only: the request, result and decision models
    "spine.payloads",  # stdlib + pydantic only: activity inputs and results
    "spine.workflows.state",  # stdlib + pydantic only: the run state and its transitions
    "spine.activities.errors",  # stdlib + temporalio only: the error taxonomy
    "spine.guardrails.hooks",  # stdlib only: what guards need from the run
    "spine.guardrails.identity",  # claims and the keyring (keys loaded by the worker)
    "spine.guardrails.taint",  # pure: the untrusted-token filter
    "spine.guardrails.allowlist",  # pure: the one allowlist (loop and interceptor share it)
    "spine.guardrails.approvals",  # pure: approval rules and the approval desk
    "spine.guardrails.budget",  # pure: prices, limits, reservations
    "spine.guardrails.parking",  # pure: operator commands and the retry budget
    "spine.guardrails.saga",  # pure: compensation order
    "spine.guardrails.interceptor",  # temporalio only; the backstops, and RunGuards they read
    "spine.observability.metrics",  # stdlib + temporalio only: replay-aware metric helpers
    "spine.observability.trail",  # pure: the run's queue of audit entries
    "spine.observability.live",  # stdlib + temporalio: one registry of the worker's stream sinks
)


log = logging.getLogger("spine.worker")


def uncompiled_workflow_modules() -> list[str]:
    """Spine's workflow modules that the sandbox would compile from source for every run.

    The sandbox imports the workflow modules afresh for each run it starts (the passthrough
    modules above excepted). With a current bytecode cache that is a load of the cached code;
    without one, and with ``PYTHONDONTWRITEBYTECODE`` set (as container images often set it),
    it is a compile from source each time: about 20 ms of CPU per run for Spine's modules, five
    times the rest of the sandbox's start. Empty when bytecode may be written, or is current.
    """
    if not sys.dont_write_bytecode:
        return []
    stale = []
    for name, module in sorted(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if not name.startswith("spine.workflows.") or not source or not source.endswith(".py"):
            continue
        if not _bytecode_is_current(source):
            stale.append(name)
    return stale


def _bytecode_is_current(source: str) -> bool:
    try:
        cached = importlib.util.cache_from_source(source)
        with open(cached, "rb") as f:
            header = f.read(16)
        stat = os.stat(source)
    except (OSError, NotImplementedError, ValueError):
        return False
    if header[:4] != importlib.util.MAGIC_NUMBER or len(header) < 16:
        return False
    if int.from_bytes(header[4:8], "little") & 0b1:
        return True  # hash-based: checked against the source by the import system itself
    mtime = int.from_bytes(header[8:12], "little")
    size = int.from_bytes(header[12:16], "little")
    return mtime == int(stat.st_mtime) & 0xFFFFFFFF and size == stat.st_size & 0xFFFFFFFF


def _warn_if_uncompiled() -> None:
    stale = uncompiled_workflow_modules()
    if stale:
        where = sorted({str(Path(sys.modules[n].__file__ or "").parent) for n in stale})
        log.warning(
            "%d of Spine's workflow modules have no current bytecode and PYTHONDONTWRITEBYTECODE "
            "is set: the workflow sandbox compiles them again for every run it starts (about 20 ms "
            "of CPU per run for all of Spine's). Compile them where they are installed: "
            "python -m compileall -q %s",
            len(stale),
            " ".join(where),
        )


def _flag(env: Mapping[str, str], name: str, default: str = "1") -> bool:
    return env.get(name, default).strip().lower() not in ("0", "false", "no", "off")


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    text = (env.get(name) or "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{name}={text!r} is not a positive number of bytes")
    return int(text)


@dataclass
class SpineConfig:
    """Everything a Spine worker needs besides the Temporal client. Defaults come from the env."""

    task_queue: str = DEFAULT_TASK_QUEUE
    policy_path: Path | None = None
    state_dir: Path = Path(".spine")
    agent_modules: tuple[str, ...] = ("spine.demo.agent",)
    settings: Mapping[str, str] = field(default_factory=dict)
    """Settings tools read (``ctx.setting``): the environment, by default."""
    secrets: SecretResolver | None = None
    """Where tools' secrets come from (Vault); None: no secrets, tools that need one fail."""
    identity: VaultSecrets | None = None
    """The OpenBao holding the principals' keys; None: the one `secrets` reads from, else the
    one ``VAULT_ADDR`` (with ``VAULT_TOKEN`` or ``VAULT_ROLE_ID``/``VAULT_SECRET_ID``) names."""
    providers: Mapping[str, ModelProvider] | None = None
    """Model providers by name; None: OpenAI and Anthropic from `settings`."""
    search_attributes: bool = True
    max_concurrent_activities: int = 200
    audit_store: AuditStore | None = None
    """The audit log; default: ``SPINE_AUDIT_DSN`` from `settings`, else the shared database,
    else SQLite (``audit.db``) in `state_dir`."""
    database: Database | None = None
    """Shared state (transcripts, large outputs; the audit log unless it has its own): default
    ``SPINE_DATABASE_URL`` from `settings` (PostgreSQL), else SQLite (``state.db``) in
    `state_dir`."""
    inline_output_bytes: int = DEFAULT_INLINE_BYTES
    """Tool outputs whose JSON is larger are stored in the shared database and go by reference."""
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    """Tool outputs whose JSON is larger are refused."""
    deployment_name: str | None = None
    """Temporal worker deployment this worker belongs to (``SPINE_DEPLOYMENT_NAME``); with
    `build_id`, the worker (and its companions) run under worker versioning."""
    build_id: str | None = None
    """This worker's build (``SPINE_BUILD_ID``), e.g. the image tag or git commit."""
    ledger: bool = True
    """Run the budget ledgers' worker next to this one (one per deployment is enough)."""
    ledger_task_queue: str = DEFAULT_LEDGER_TASK_QUEUE
    worker_principal: str = "spine-worker"
    """The principal this worker signs its budget-ledger operations as (its OpenBao identity)."""
    keyring_refresh_s: float = 30.0
    streams: bool = True
    """Publish runs' live streams (model tokens, step events); ``SPINE_STREAMS=0`` turns off."""
    stream_store: StreamStore | None = None
    """Where live streams go; default: ``SPINE_DATABASE_URL`` (PostgreSQL) from `settings`,
    else SQLite in `state_dir`."""

    def deployment(
        self, behaviour: VersioningBehavior = VersioningBehavior.PINNED
    ) -> WorkerDeploymentConfig | None:
        """Worker versioning settings with `behaviour` as the workflows' default, or None when
        the worker is unversioned.

        Agent runs (and alerts, and any workflow of yours on the worker) are pinned: a run stays
        on the build it started on and moves to the current build at its next continue-as-new.
        The budget ledgers' worker auto-upgrades (see :func:`ledger_worker`).

        Raises:
            ValueError: only one of `deployment_name` and `build_id` is set.
        """
        if not self.deployment_name and not self.build_id:
            return None
        if not (self.deployment_name and self.build_id):
            raise ValueError(
                "worker versioning needs both SPINE_DEPLOYMENT_NAME and SPINE_BUILD_ID "
                f"(got deployment {self.deployment_name!r}, build {self.build_id!r})"
            )
        return WorkerDeploymentConfig(
            version=WorkerDeploymentVersion(self.deployment_name, self.build_id),
            use_worker_versioning=True,
            default_versioning_behavior=behaviour,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SpineConfig:
        """``SPINE_TASK_QUEUE``, ``SPINE_POLICY``, ``SPINE_STATE_DIR``, ``SPINE_AGENTS``,
        ``VAULT_*``, ``SPINE_SEARCH_ATTRIBUTES``, ``SPINE_LEDGER_WORKER``,
        ``SPINE_LEDGER_TASK_QUEUE``, ``SPINE_INLINE_OUTPUT_BYTES``, ``SPINE_MAX_OUTPUT_BYTES``,
        ``SPINE_DEPLOYMENT_NAME`` and ``SPINE_BUILD_ID``
        (``SPINE_DATABASE_URL`` and ``SPINE_AUDIT_DSN`` are read from the settings when the
        worker starts); everything else is a setting tools may read.

        Raises:
            ValueError: a size setting is not a positive whole number.
        """
        env = dict(os.environ if env is None else env)
        modules = tuple(
            m.strip() for m in env.get("SPINE_AGENTS", "spine.demo.agent").split(",") if m.strip()
        )
        return cls(
            task_queue=env.get("SPINE_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
            policy_path=Path(env["SPINE_POLICY"]) if env.get("SPINE_POLICY") else None,
            state_dir=Path(env.get("SPINE_STATE_DIR") or ".spine"),
            agent_modules=modules,
            settings=env,
            secrets=VaultSecrets.from_env(env),
            search_attributes=_flag(env, "SPINE_SEARCH_ATTRIBUTES"),
            ledger=_flag(env, "SPINE_LEDGER_WORKER"),
            ledger_task_queue=env.get("SPINE_LEDGER_TASK_QUEUE") or DEFAULT_LEDGER_TASK_QUEUE,
            worker_principal=env.get("SPINE_WORKER_PRINCIPAL") or "spine-worker",
            inline_output_bytes=_size(env, "SPINE_INLINE_OUTPUT_BYTES", DEFAULT_INLINE_BYTES),
            max_output_bytes=_size(env, "SPINE_MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES),
            deployment_name=env.get("SPINE_DEPLOYMENT_NAME") or None,
            build_id=env.get("SPINE_BUILD_ID") or None,
            streams=_flag(env, "SPINE_STREAMS"),
        )


class AgentModuleError(ImportError):
    """An agent module (``SPINE_AGENTS``) cannot be imported; the message says which and why."""


def load_registry(modules: Sequence[str]) -> Registry:
    """Import each agent module and let it `register(registry)`; check the result.

    Raises:
        AgentModuleError: a module cannot be imported (an `ImportError`: named, in one line).
        ValueError: a module has no ``register``; :class:`ToolDefinitionError` for bad tools.
    """
    registry = Registry()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            missing = getattr(err, "name", None)
            why = (
                f"no module named {missing!r} on the Python path (the current directory is "
                "on it for `spine worker` and `spine tools`)"
                if missing and (missing == name or name.startswith(f"{missing}."))
                else f"{type(err).__name__}: {err}"
            )
            raise AgentModuleError(f"cannot import agent module {name!r}: {why}") from err
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


def sandbox(runner: WorkflowRunner | None = None) -> WorkflowRunner:
    """The workflow sandbox with Spine's passthrough modules (kept on, never switched off)."""
    if isinstance(runner, SandboxedWorkflowRunner):
        return dataclasses.replace(
            runner,
            restrictions=runner.restrictions.with_passthrough_modules(*PASSTHROUGH_MODULES),
        )
    if runner is not None:
        return runner  # a caller's own runner (e.g. for debugging) is theirs to configure
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    )


def _converter(existing: DataConverter | None) -> DataConverter:
    """Spine's models need the pydantic payload converter; a payload codec is kept."""
    if existing is None:
        return pydantic_data_converter
    if issubclass(existing.payload_converter_class, PydanticPayloadConverter):
        return existing
    return dataclasses.replace(existing, payload_converter_class=PydanticPayloadConverter)


@dataclass
class _Served:
    """What one worker's activities hold open, closed when the worker stops."""

    http: httpx.AsyncClient
    database: Database
    audit: AuditStore
    companions: list[Worker]
    keyring: VaultKeyring | None
    sink: LiveSink | None = None

    async def migrate(self) -> None:
        """Apply the shared-state migrations (idempotent; workers starting together are fine)."""
        await self.database.migrate([*TRANSCRIPT_MIGRATIONS, *BLOB_MIGRATIONS])
        if isinstance(self.audit, DatabaseAuditStore):
            await self.audit.database.migrate(AUDIT_MIGRATIONS)

    async def close(self) -> None:
        await self.http.aclose()
        await self.audit.close()
        if getattr(self.audit, "database", None) is not self.database:
            await self.database.close()


class SpinePlugin(SimplePlugin):
    """Spine's workflows, activities, interceptors and sandbox settings for a Temporal worker.

    Args:
        config: Worker settings (default :meth:`SpineConfig.from_env`).
        policy: The policy; default: loaded from ``config.policy_path`` (or the built-in one).
        registry: The agents and tools; default: loaded from ``config.agent_modules``.
        agent_workflow: The workflow class registered as ``AgentWorkflow``: Spine's, or a
            build of it of your own (a subclass with ``@workflow.defn(name="AgentWorkflow")``).

    Raises:
        PolicyError, ToolDefinitionError: the policy or a tool definition is wrong (the
            message names the entry); ImportError for an agent module that cannot be imported.
    """

    def __init__(
        self,
        config: SpineConfig | None = None,
        *,
        policy: Policy | None = None,
        registry: Registry | None = None,
        agent_workflow: type[AgentWorkflow] = AgentWorkflow,
    ) -> None:
        self.config = config or SpineConfig.from_env()
        if not (isinstance(agent_workflow, type) and issubclass(agent_workflow, AgentWorkflow)):
            raise TypeError(
                f"agent_workflow must be AgentWorkflow or a subclass, not {agent_workflow!r}"
            )
        self.policy = policy or load_policy(self.config.policy_path)
        self.registry = registry or load_registry(self.config.agent_modules)
        self.keyring = Keyring(self.policy.grants())
        self._served: dict[str, _Served] = {}
        self._companion_queues: set[str] = set()
        self._pending_activities: list[Callable[..., object]] = []
        super().__init__(
            "spine",
            data_converter=_converter,
            workflows=[agent_workflow, SpineAlertsWorkflow, SpineAgentCheck],
            workflow_runner=sandbox,
            interceptors=[PolicyInterceptor(), IdentityInterceptor(self.keyring)],
            activities=self._activities,
        )

    # `activities` is resolved inside configure_worker, where the client is known.
    def _activities(
        self, existing: Sequence[Callable[..., object]] | None
    ) -> list[Callable[..., object]]:
        return list(existing or []) + self._pending_activities

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        queue = config["task_queue"]
        if queue in self._companion_queues:
            return config  # a companion this plugin made itself: configured already
        client = config["client"]
        if not issubclass(client.data_converter.payload_converter_class, PydanticPayloadConverter):
            raise ValueError(
                "SpinePlugin needs a client with Spine's data converter: connect with "
                "spine.connect(), or pass the plugin to Client.connect(plugins=[...])"
            )
        settings = self.config.settings
        http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0))
        breakers = Breakers(
            self.policy.runtime.breaker_threshold, self.policy.runtime.breaker_reset_s
        )
        database = self.config.database or database_from_env(settings, self.config.state_dir)
        blobs = BlobStore(database)
        runner = ToolRunner(
            self.registry,
            self.config.secrets or NoSecrets(),
            http,
            settings,
            breakers,
            blobs=blobs,
            inline_bytes=self.config.inline_output_bytes,
            max_output_bytes=self.config.max_output_bytes,
        )
        audit = AuditActivities(
            self.config.audit_store
            or store_from_env(settings, self.config.state_dir, database=database)
        )
        models = ModelActivities(
            self.registry,
            self.policy,
            TranscriptStore(database),
            self.config.providers
            if self.config.providers is not None
            else default_providers(settings),
            search_attributes=self.config.search_attributes,
            breakers=breakers,
            audit_append=audit.store.append,
            blobs=blobs,
        )
        sink = None
        if self.config.streams:
            sink = LiveSink(
                self.config.stream_store or stream_store_from_env(settings, self.config.state_dir)
            )
        models.live = sink.publish if sink is not None else None
        vault = (
            self.config.identity
            or (self.config.secrets if isinstance(self.config.secrets, VaultSecrets) else None)
            or VaultSecrets.from_env(os.environ)
        )
        if vault is None:
            raise ValueError(
                "no OpenBao for principal keys: set VAULT_ADDR (with VAULT_TOKEN, or "
                "VAULT_ROLE_ID and VAULT_SECRET_ID), or pass "
                "SpineConfig(identity=VaultSecrets(...)); Spine verifies every start, decision "
                "and command against the keys kept there"
            )
        loader = VaultKeyring(self.keyring, vault.client, self.config.keyring_refresh_s)
        loader.refresh()
        self.keyring.refresher = loader.refresh_soon
        identity = IdentityActivities(
            self.keyring, client, self.policy, self.registry, loader.refresh, blobs
        )
        budget = BudgetActivities(
            signing_client(client, WorkerSigner(vault, self.config.worker_principal)),
            self.config.ledger_task_queue,
        )
        alerts = AlertActivities(
            AlertEngine.from_policy(audit.store, self.policy, settings, http=http)
        )
        self._pending_activities = [
            models.resolve_agent,
            models.model_call,
            budget.apply,
            audit.append,
            alerts.check,
            identity.verify_principal,
            identity.verify_carry,
            identity.fork_state,
            *make_tool_activities(runner),
        ]
        config = super().configure_worker(config)
        if "workflow_runner" in config:
            config["workflow_runner"] = for_converter(
                config["workflow_runner"], client.data_converter
            )
        deployment = self.config.deployment()
        if deployment is not None:
            config["deployment_config"] = deployment
        others = [p for p in config.get("plugins") or [] if p is not self]
        self._served[queue] = _Served(
            http, database, audit.store, self._companions(config, runner, others), loader, sink
        )
        return config

    def _companions(
        self, config: WorkerConfig, runner: ToolRunner, plugins: Sequence[WorkerPlugin]
    ) -> list[Worker]:
        """The rate-limited tool workers and the ledger worker that run beside this worker."""
        client, queue = config["client"], config["task_queue"]
        companions = []
        tools = make_tool_activities(runner)
        for group, rate in sorted(self.policy.rate_limits.items()):
            # Temporal enforces this rate on the queue for all workers polling it, fleet-wide.
            limited = rate_limited_queue(queue, group)
            self._companion_queues.add(limited)
            companions.append(
                Worker(
                    client,
                    task_queue=limited,
                    activities=tools,
                    max_task_queue_activities_per_second=rate,
                    plugins=list(plugins),  # tool spans and metrics come from telemetry
                    max_concurrent_activities=self.config.max_concurrent_activities,
                    deployment_config=self.config.deployment(),
                )
            )
        if self.config.ledger:
            self._companion_queues.add(self.config.ledger_task_queue)
            companions.append(
                ledger_worker(
                    client,
                    self.config.ledger_task_queue,
                    keyring=self.keyring,
                    deployment=self.config.deployment(VersioningBehavior.AUTO_UPGRADE),
                )
            )
        return companions

    async def run_worker(self, worker: Worker, next: Callable[[Worker], Awaitable[None]]) -> None:
        served = self._served.get(worker.task_queue)
        if served is None:
            return await next(worker)  # a companion
        _warn_if_uncompiled()
        refreshing = (
            asyncio.create_task(served.keyring.keep_fresh()) if served.keyring is not None else None
        )
        sink = served.sink
        publish = None
        if sink is not None:
            await sink.start()

            def publish(run_id: str, key: str, kind: str, data: dict[str, object], at: str) -> None:
                sink.publish(NewEvent(run_id, key, kind, data, at))

            live.register(worker.task_queue, publish)
        try:
            await served.migrate()  # before any task: a database that is down stops the start
            async with contextlib.AsyncExitStack() as stack:
                for companion in served.companions:
                    await stack.enter_async_context(companion)
                await next(worker)
        finally:
            if refreshing is not None:
                refreshing.cancel()
            if sink is not None:
                live.unregister(worker.task_queue, publish)
                await sink.stop()
            await served.close()


def ledger_worker(
    client: Client,
    task_queue: str = DEFAULT_LEDGER_TASK_QUEUE,
    *,
    keyring: Keyring,
    deployment: WorkerDeploymentConfig | None = None,
) -> Worker:
    """A worker serving only the per-account budget ledgers (`SpineBudgetLedger`); `keyring`
    verifies that each operation was signed by a Spine worker.

    Under worker versioning give it a `deployment` whose default behaviour is auto-upgrade: a
    ledger is a long-lived entity every run of its account depends on, so it follows the current
    build at its next task rather than keep an old build's workers alive (its code changes must
    be replay-safe, with ``workflow.patched``).
    """
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[BudgetLedger],
        workflow_runner=for_converter(sandbox(), client.data_converter),
        interceptors=[IdentityInterceptor(keyring)],
        deployment_config=deployment,
    )


def signing_client(client: Client, signer: VaultSigner) -> Client:
    """`client` with a signing interceptor: what a worker uses to operate budget ledgers."""
    return Client(
        client.service_client,
        namespace=client.namespace,
        data_converter=client.data_converter,
        interceptors=[SigningInterceptor(signer)],
    )


class WorkerSigner(VaultSigner):
    """Signs as the worker's own OpenBao identity (its token from the worker's Vault login)."""

    def __init__(self, vault: VaultSecrets, principal: str) -> None:
        super().__init__(url=vault.url, tokens={principal: ""}, default=principal)
        self._vault = vault

    def token(self, principal: str) -> str | None:
        return self._vault.client().token if principal == self.default else None


def build_worker(
    client: Client,
    *,
    config: SpineConfig | None = None,
    policy: Policy | None = None,
    extra_workflows: Sequence[type] = (),
    plugins: Sequence[WorkerPlugin] = (),
    agent_workflow: type[AgentWorkflow] = AgentWorkflow,
) -> Worker:
    """A Temporal worker with :class:`SpinePlugin` on ``config.task_queue`` (what tests, the demo
    and ``spine worker`` use): ``async with build_worker(client) as worker: ...``."""
    config = config or SpineConfig.from_env()
    return Worker(
        client,
        task_queue=config.task_queue,
        workflows=list(extra_workflows),
        plugins=[SpinePlugin(config, policy=policy, agent_workflow=agent_workflow), *plugins],
        max_concurrent_activities=config.max_concurrent_activities,
    )
