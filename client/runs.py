"""Typed helpers to start, watch and steer Spine runs from outside the workflow.

Everything here speaks the contract's names (workflow type `AgentWorkflow`, query `state`, update
`decide`, signals `approval` and `operator`) and the pydantic models of `spine.contract`, and
turns the failures a user can cause or fix into a one-line `SpineClientError`::

    SpineClientError            a clear, one-line reason; the CLI prints it and exits 1
     +-- TemporalUnreachable    no Temporal server answers at the configured address
"""

from __future__ import annotations

import asyncio
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Literal
from uuid import uuid4

from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import ApplicationError, FailureError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from spine.client.identity import SigningInterceptor, signer_from_env
from spine.contract import (
    AGENT_CHECK_WORKFLOW_TYPE,
    DEFAULT_TASK_QUEUE,
    SA_ACCOUNT,
    SA_AGENT,
    SA_COST,
    SA_STATUS,
    SA_STEPS,
    WORKFLOW_TYPE,
    AgentRequest,
    AgentResult,
    ApprovalDecision,
    DecisionAck,
    OperatorCommand,
    StateView,
)
from spine.guardrails.codec import CodecConfigError, data_converter_from_env
from spine.guardrails.identity import IdentityError
from spine.guardrails.principals import VaultSigner
from spine.payloads import AgentCheck, ResolveAgentInput

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DEFAULT_UI_URL = "http://localhost:8233"


# A running workflow answers a query only through a worker; without one the server would keep the
# caller waiting, so the wait is bounded and turned into advice.
QUERY_TIMEOUT = timedelta(seconds=10)

RunHandle = WorkflowHandle[object, AgentResult]
"""A handle on one Spine run; `result()` gives an `AgentResult`."""


class SpineClientError(Exception):
    """A failure the user can understand and usually fix, stated in one line."""


class TemporalUnreachable(SpineClientError):
    """No Temporal server answered at `address`."""

    def __init__(self, address: str, cause: str) -> None:
        super().__init__(
            f"cannot reach Temporal at {address!r} ({cause}); "
            "start it with temporal-dev/up or set TEMPORAL_ADDRESS"
        )
        self.address = address
        self.cause = cause


def task_queue() -> str:
    """The task queue Spine's workers poll: `SPINE_TASK_QUEUE`, default `spine-agents`."""
    return os.environ.get("SPINE_TASK_QUEUE") or DEFAULT_TASK_QUEUE


_default_task_queue = task_queue  # `start_run` has a parameter of the same name


async def connect(
    *,
    address: str | None = None,
    namespace: str | None = None,
    data_converter: DataConverter | None = None,
    signer: VaultSigner | None | Literal["env"] = "env",
) -> Client:
    """Connect to Temporal with Spine's pydantic data converter, encrypting when configured.

    Settings come from Temporal's env-config (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`,
    `TEMPORAL_PROFILE`, the config file, TLS and API-key settings); `address` and `namespace`
    override them. Defaults: `localhost:7233`, namespace `default`. Payloads are encrypted when
    `SPINE_CODEC_KEYS`, `SPINE_CODEC_KEY` or `SPINE_CODEC_VAULT_PATH` is set (see
    `spine.guardrails.codec`); `data_converter` overrides that choice. Workers built on this client
    use its converter.

    Starts, decisions and operator commands are signed as the logged-in principal (``spine
    login``, or ``SPINE_VAULT_TOKEN``): `signer` overrides that, None sends no claims (workers
    then refuse them).

    Raises:
        SpineClientError: the configuration, the payload keys or the credentials cannot be
            loaded.
        TemporalUnreachable: nothing answers at the address.
    """
    if signer == "env":
        try:
            signer = signer_from_env()
        except IdentityError as e:
            raise SpineClientError(str(e)) from e
    if data_converter is None:
        try:
            # May read the keyring from Vault, which blocks.
            data_converter = await asyncio.to_thread(data_converter_from_env, os.environ)
        except CodecConfigError as e:
            raise SpineClientError(f"cannot load payload encryption keys: {e}") from e
    try:
        config = ClientConfig.load_client_connect_config(
            profile=os.environ.get("TEMPORAL_PROFILE") or None
        )
    except Exception as e:  # the loader raises plain RuntimeError/ValueError for bad files
        raise SpineClientError(f"cannot load Temporal client configuration: {e}") from e
    target = address or config.get("target_host") or DEFAULT_ADDRESS
    if "://" in target:
        raise SpineClientError(
            f"Temporal address {target!r} is a URL; set TEMPORAL_ADDRESS to host:port"
        )
    try:
        return await Client.connect(
            target,
            namespace=namespace or config.get("namespace") or DEFAULT_NAMESPACE,
            api_key=config.get("api_key"),
            tls=config.get("tls"),
            rpc_metadata=config.get("rpc_metadata", {}),
            data_converter=data_converter,
            interceptors=[SigningInterceptor(signer)] if signer is not None else [],
        )
    except ValueError as e:
        raise SpineClientError(
            f"invalid Temporal address {target!r} ({e}); set TEMPORAL_ADDRESS to host:port"
        ) from e
    except RuntimeError as e:
        raise TemporalUnreachable(target, _connect_cause(str(e))) from e


def _connect_cause(message: str) -> str:
    """The readable core of the core SDK's connect error (e.g. 'Connection refused')."""
    found = re.search(r'(?:message|error): "([^"]+)"', message)
    if found:
        return found.group(1)
    return message.removeprefix("Failed client connect: ").splitlines()[0][:200]


def run_id_for(request: AgentRequest) -> str:
    """A fresh workflow id for `request`: `<agent>-<12 hex digits>`."""
    return f"{request.agent}-{uuid4().hex[:12]}"


async def start_run(
    client: Client,
    request: AgentRequest,
    *,
    workflow_id: str | None = None,
    task_queue: str | None = None,
) -> RunHandle:
    """Start an `AgentWorkflow` run and return its handle.

    Sets the search attributes `SpineAgent`, `SpineAccount` and `SpineStatus="running"` (unless
    `SPINE_SEARCH_ATTRIBUTES=0`), and a static summary and details for the Web UI.

    Raises:
        SpineClientError: the id is taken, or the server refuses the start (for instance because
            Spine's search attributes are not registered).
    """
    wid = workflow_id or run_id_for(request)
    queue = task_queue or _default_task_queue()
    details = "\n".join(
        f"- **{k}**: {v}"
        for k, v in (
            ("agent", request.agent),
            ("user", request.user),
            ("role", request.role),
            ("account", request.account),
        )
    )
    try:
        return await client.start_workflow(
            WORKFLOW_TYPE,
            request,
            id=wid,
            task_queue=queue,
            result_type=AgentResult,
            search_attributes=_search_attributes(request),
            static_summary=f"{request.agent}: {request.goal[:80]}",
            static_details=details,
        )
    except WorkflowAlreadyStartedError as e:
        raise SpineClientError(
            f"a run with id {wid!r} already exists in namespace {client.namespace!r}; "
            "pick another --id"
        ) from e
    except RPCError as e:
        if e.status == RPCStatusCode.INVALID_ARGUMENT and "search attribute" in e.message.lower():
            raise SpineClientError(
                f"cannot start run {wid!r}: {e.message}; Spine's search attributes are not "
                f"registered in namespace {client.namespace!r} (temporal-dev/up registers them)"
            ) from e
        raise SpineClientError(f"cannot start run {wid!r}: {e.message}") from e


#: How long `check_agent` waits for the task queue's workers to answer.
AGENT_CHECK_TIMEOUT = timedelta(seconds=60)


async def check_agent(
    client: Client, request: AgentRequest, *, task_queue: str | None = None
) -> AgentCheck:
    """Ask the task queue whether a worker serves `request.agent`, before starting a run.

    Starts nothing on the run's behalf: a short `SpineAgentCheck` workflow resolves the agent
    the way the run would (a worker that does not serve it refuses and the task goes back to
    the queue), and returns the agent's tools.

    Raises:
        SpineClientError: no worker polls the task queue, or none of its workers serves the
            agent (one line, naming both).
    """
    from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    queue = task_queue or _default_task_queue()
    try:
        described = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
    except RPCError as e:
        raise SpineClientError(f"cannot describe task queue {queue!r}: {e.message}") from e
    if not described.pollers:
        raise SpineClientError(
            f"no worker polls task queue {queue!r} in namespace {client.namespace!r}, so "
            f"nothing would run agent {request.agent!r}; start one with `spine worker` "
            "(SPINE_AGENTS names the agents it serves, SPINE_TASK_QUEUE its queue)"
        )
    try:
        return await client.execute_workflow(
            AGENT_CHECK_WORKFLOW_TYPE,
            ResolveAgentInput(agent=request.agent, role=request.role, account=request.account),
            id=f"spine-agent-check-{uuid4().hex[:12]}",
            task_queue=queue,
            result_type=AgentCheck,
            execution_timeout=AGENT_CHECK_TIMEOUT,
        )
    except WorkflowFailureError as e:
        raise SpineClientError(
            f"no worker on task queue {queue!r} serves agent {request.agent!r}: "
            f"{_failure_message(e.cause)}"
        ) from e
    except RPCError as e:
        raise SpineClientError(f"cannot check agent {request.agent!r}: {e.message}") from e


def _search_attributes(request: AgentRequest) -> TypedSearchAttributes | None:
    # Same switch as the worker's: a namespace without Spine's attributes can still run agents.
    if os.environ.get("SPINE_SEARCH_ATTRIBUTES", "1").lower() in ("0", "false"):
        return None
    return TypedSearchAttributes(
        [
            SearchAttributePair(SA_AGENT, request.agent),
            SearchAttributePair(SA_ACCOUNT, request.account),
            SearchAttributePair(SA_STATUS, "running"),
            # What the run would upsert first; with them the run upserts nothing at its start.
            SearchAttributePair(SA_STEPS, 0),
            SearchAttributePair(SA_COST, 0.0),
        ]
    )


def get_run(client: Client, workflow_id: str, *, run_id: str | None = None) -> RunHandle:
    """A handle on an existing run (the latest run of `workflow_id` unless `run_id` is given)."""
    return client.get_workflow_handle(workflow_id, run_id=run_id, result_type=AgentResult)


def _namespace(handle: RunHandle) -> str:
    # Handles do not expose their client publicly, but the namespace makes errors actionable.
    client = getattr(handle, "_client", None)
    return client.namespace if isinstance(client, Client) else DEFAULT_NAMESPACE


@contextmanager
def _rpc_errors(handle: RunHandle, action: str) -> Iterator[None]:
    """Turn the server's refusals of `action` on `handle` into one-line errors."""
    try:
        yield
    except RPCError as e:
        wid = handle.id
        msg = e.message
        if e.status == RPCStatusCode.NOT_FOUND and "already completed" in msg.lower():
            raise SpineClientError(
                f"run {wid!r} has already finished; {action} is no longer possible"
            ) from e
        if e.status == RPCStatusCode.NOT_FOUND:
            raise SpineClientError(f"no run {wid!r} in namespace {_namespace(handle)!r}") from e
        if e.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED) or (
            e.status == RPCStatusCode.FAILED_PRECONDITION and "poller" in msg.lower()
        ):
            raise SpineClientError(
                f"run {wid!r} did not answer ({action}): no worker seems to be polling; "
                f"start one with `spine worker` (task queue {task_queue()!r})"
            ) from e
        raise SpineClientError(f"{action} failed for run {wid!r}: {msg}") from e


async def describe(handle: RunHandle) -> WorkflowExecutionDescription:
    """Describe the run (status, times, search attributes) without needing a worker."""
    with _rpc_errors(handle, "describe"):
        return await handle.describe()


async def get_state(handle: RunHandle) -> StateView:
    """The run's current `state` query answer (needs a worker polling its task queue)."""
    with _rpc_errors(handle, "state query"):
        try:
            return await handle.query("state", result_type=StateView, rpc_timeout=QUERY_TIMEOUT)
        except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as e:
            raise SpineClientError(f"state query on run {handle.id!r} failed: {e}") from e


async def decide(handle: RunHandle, decision: ApprovalDecision) -> DecisionAck:
    """Approve or reject a pending approval through the `decide` update.

    The workflow's validator refuses an unknown or already decided approval and a role that may
    not approve it; the refusal is raised here and nothing is written to history.

    Raises:
        SpineClientError: the decision was refused, with the validator's reason.
    """
    with _rpc_errors(handle, f"{decision.decision} of {decision.approval_id!r}"):
        try:
            return await handle.execute_update("decide", decision, result_type=DecisionAck)
        except WorkflowUpdateFailedError as e:
            raise SpineClientError(
                f"{decision.decision} of {decision.approval_id!r} on run {handle.id!r} "
                f"refused: {_failure_message(e.cause)}"
            ) from e


async def signal_approval(handle: RunHandle, decision: ApprovalDecision) -> None:
    """Send the decision as the `approval` signal.

    Signals are accepted unchecked; the workflow checks the decision and records a refused one in
    its audit log, so use `decide` when the caller should hear about a refusal.
    """
    with _rpc_errors(handle, f"{decision.decision} signal for {decision.approval_id!r}"):
        await handle.signal("approval", decision)


async def operate(handle: RunHandle, cmd: OperatorCommand) -> StateView:
    """Send an operator command through the `operate` update: refused at once (wrong principal
    or role, not parked, not skippable) with the reason; nothing is written to history then.

    Raises:
        SpineClientError: the command was refused, with the run's reason.
    """
    with _rpc_errors(handle, f"operator {cmd.action!r}"):
        try:
            return await handle.execute_update("operate", cmd, result_type=StateView)
        except WorkflowUpdateFailedError as e:
            raise SpineClientError(
                f"operator {cmd.action} on run {handle.id!r} refused: {_failure_message(e.cause)}"
            ) from e


async def signal_operator(handle: RunHandle, cmd: OperatorCommand) -> None:
    """Send an operator command (retry, skip, compensate, abort) to a parked run."""
    with _rpc_errors(handle, f"operator {cmd.action!r} signal"):
        await handle.signal("operator", cmd)


async def wait_result(handle: RunHandle) -> AgentResult:
    """Wait for the run to close and return its result (following continue-as-new).

    Raises:
        SpineClientError: the workflow failed, was terminated, cancelled or timed out instead of
            returning a result.
    """
    with _rpc_errors(handle, "result"):
        try:
            return await handle.result()
        except WorkflowFailureError as e:
            raise SpineClientError(
                f"run {handle.id!r} ended without a result: {_failure_message(e.cause)}"
            ) from e


async def watch(handle: RunHandle, *, interval: float = 0.5) -> AsyncIterator[StateView]:
    """Poll the `state` query and yield each state whose status, step or approvals changed.

    Stops once the workflow has closed; then call `wait_result` for the outcome.
    """
    done = asyncio.ensure_future(handle.result())
    last: tuple[str, int, tuple[str, ...]] | None = None
    try:
        while not done.done():
            try:
                state = await get_state(handle)
            except SpineClientError:
                if done.done():
                    break
                raise
            key = (
                state.status,
                state.step,
                tuple(p.approval_id for p in state.pending_approvals),
            )
            if key != last:
                last = key
                yield state
            await asyncio.wait([done], timeout=interval)
    finally:
        if not done.done():
            done.cancel()
        # Retrieve the outcome so a failed result is not reported as never retrieved.
        await asyncio.gather(done, return_exceptions=True)


def _failure_message(cause: BaseException) -> str:
    """The innermost human message of a Temporal failure chain."""
    while isinstance(cause, FailureError) and cause.__cause__ is not None:
        if isinstance(cause, ApplicationError) and cause.message:
            break
        cause = cause.__cause__
    if isinstance(cause, FailureError):
        return cause.message or type(cause).__name__
    return str(cause) or type(cause).__name__


def web_ui_url(
    workflow_id: str, run_id: str | None = None, namespace: str = "default", ui: str | None = None
) -> str:
    """The Temporal Web UI page of a run (at `ui`, else `SPINE_UI_URL`, default
    `http://localhost:8233`)."""
    ui = (ui or os.environ.get("SPINE_UI_URL") or DEFAULT_UI_URL).rstrip("/")
    url = (
        f"{ui}/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/workflows/{urllib.parse.quote(workflow_id, safe='')}"
    )
    if run_id:
        url += f"/{urllib.parse.quote(run_id, safe='')}/history"
    return url
