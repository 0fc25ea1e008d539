"""Test kit: real servers for your own pytest suites, the way Spine's own tests use them.

Everything starts from the installed binaries (``temporal``, ``temporal-test-server``, ``bao``)
on free loopback ports; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import hvac
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment

from spine.contract import SEARCH_ATTRIBUTES, tool_of


def binary(name: str) -> str:
    """Path of a binary installed next to this Python (the venv) or on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name!r} is not installed; pip install the spine project first")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: object, *, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `check()` (a callable returning truthy) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]  # any zero-arg callable
                return
        except Exception as err:  # noqa: BLE001  # polling: the next try decides
            last = err
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}: {last}")


@contextlib.asynccontextmanager
async def temporal_dev_server(
    *,
    db_file: Path | None = None,
    port: int | None = None,
    data_converter: DataConverter = pydantic_data_converter,
    ui_port: int | None = None,
) -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server with Spine's search attributes registered.

    `db_file` persists its state in SQLite; with the same `db_file` and `port`, a second server
    takes over where a stopped one left off (a free port is picked when `port` is None).
    `data_converter` is the one of the environment's client, e.g.
    `spine.guardrails.codec.encrypted_data_converter(...)` for encrypted payloads. With `ui_port`
    the
    server also serves its Web UI there (``http://127.0.0.1:<ui_port>``).
    """
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        data_converter=data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        port=port,
        dev_server_database_filename=str(db_file) if db_file else None,
        ui=ui_port is not None,
        ui_port=ui_port,
        # The SDK's 5 s default is too short on a loaded 2-core machine.
        dev_server_startup_timeout=timedelta(seconds=90),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.enableUpdateWorkflowExecution=true",
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


@contextlib.asynccontextmanager
async def temporal_time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server, for tests where timers matter."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class VaultDev:
    """A running OpenBao dev server."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    port: int
    tokens: dict[str, str] = field(default_factory=dict)
    """Tokens of the principals :meth:`seed_principals` made, by name."""

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.url, token=self.token)

    def seed_principals(
        self, names: Mapping[str, tuple[str, ...]], *, worker: str = "spine-worker"
    ) -> dict[str, str]:
        """Make `names` principals (name -> OpenBao identity groups), each logging in with
        userpass (password ``pw-<name>``), plus the worker's own principal; returns a token per
        person, for :meth:`signer`."""
        from spine.guardrails.principals import login_userpass, seed_principal

        root = self.client()
        seed_principal(root, worker)  # the worker signs with this dev server's root token
        tokens = {}
        for name, groups in names.items():
            seed_principal(root, name, password=f"pw-{name}", groups=groups)
            tokens[name] = login_userpass(self.url, name, f"pw-{name}")
        return tokens

    def signer(self, tokens: Mapping[str, str]) -> VaultSigner:
        """A signer that signs as whichever of `tokens`' principals a call names."""
        from spine.guardrails.principals import VaultSigner

        return VaultSigner(url=self.url, tokens=dict(tokens))

    def signed(self, client: Client) -> Client:
        """`client` signing each call as the principal it names (the request's `user`, the
        decision's `by`), with the tokens in :attr:`tokens`."""
        from spine.client.identity import SigningInterceptor

        return Client(
            client.service_client,
            namespace=client.namespace,
            data_converter=client.data_converter,
            interceptors=[SigningInterceptor(self.signer(self.tokens))],
        )

    def worker_client(self, client: Client, principal: str = "spine-worker") -> Client:
        """`client` signing as the worker's own principal, as a worker's budget activity does
        (for budget ledgers run on their own)."""
        from spine.guardrails.principals import VaultSigner
        from spine.plugin import signing_client

        signer = VaultSigner(self.url, {principal: self.token}, default=principal)
        return signing_client(client, signer)

    def keyring(self, policy: Policy | None = None) -> Keyring:
        """The principals' keys loaded from this server the way a worker loads them, with
        `policy`'s grants (default: the shipped policy)."""
        from spine.guardrails.identity import Keyring
        from spine.guardrails.policy import load_policy
        from spine.guardrails.principals import VaultKeyring

        keyring = Keyring((policy or load_policy()).grants())
        VaultKeyring(keyring, lambda fresh=False: self.client()).refresh()
        return keyring

    def put_secret(self, path: str, data: dict[str, str], mount: str = "secret") -> None:
        self.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point=mount
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_vault_dev(port: int | None = None, token: str | None = None) -> VaultDev:
    """Start ``bao server -dev`` on a free port and wait until it is unsealed."""
    port = port or free_port()
    token = token or secrets.token_hex(16)
    process = subprocess.Popen(
        [
            binary("bao"),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-dev-root-token-id={token}",
            "-dev-no-store-token",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BAO_LOG_LEVEL": "warn"},
    )
    vault = VaultDev(url=f"http://127.0.0.1:{port}", token=token, process=process, port=port)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"bao server exited with {process.returncode}")
        return httpx.get(f"{vault.url}/v1/sys/health", timeout=2).status_code == 200

    try:
        wait_until(healthy, what=f"OpenBao dev server on port {port}")
    except BaseException:
        vault.stop()
        raise
    return vault


@dataclass
class DemoService:
    url: str
    api_key: str
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> object:
        response = httpx.get(
            f"{self.url}{path}", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10
        )
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, object]) -> object:
        response = httpx.post(
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_demo_service(db_path: Path, api_key: str | None = None) -> DemoService:
    """Start the demo business service (``python -m spine.demo``) on a free port."""
    port = free_port()
    api_key = api_key or secrets.token_hex(16)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spine.demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--db",
            str(db_path),
        ],
        env={**os.environ, "SPINE_DEMO_API_KEY": api_key},
        stdout=subprocess.DEVNULL,
    )
    service = DemoService(url=f"http://127.0.0.1:{port}", api_key=api_key, process=process)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"demo service exited with {process.returncode}")
        return httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200

    try:
        wait_until(healthy, what=f"demo service on port {port}")
    except BaseException:
        service.stop()
        raise
    return service


#: The demo's principals (the default policy grants them roles): name -> identity groups.
DEMO_PRINCIPALS: dict[str, tuple[str, ...]] = {
    "alice": (),
    "vera": (),
    "bob": (),
    "dana": (),
    "ops": (),
}


@contextlib.contextmanager
def demo_stack(tmp: Path) -> Iterator[tuple[VaultDev, DemoService]]:
    """OpenBao seeded with the demo's secret and principals, plus the demo business service."""
    service = start_demo_service(tmp / "demo-service.db")
    vault = None
    try:
        vault = start_vault_dev()
        vault.put_secret("spine/acme", {"api_key": service.api_key})
        vault.tokens = vault.seed_principals(DEMO_PRINCIPALS)
        yield vault, service
    finally:
        service.stop()
        if vault:
            vault.stop()


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries (or a user to run them as) are not on this machine."""


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server bin directory (``SPINE_TEST_PG_BIN`` overrides): Debian's
    ``/usr/lib/postgresql/<version>/bin``, else wherever ``initdb`` is on PATH."""
    if given := os.environ.get("SPINE_TEST_PG_BIN"):
        return Path(given)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class PostgresServer:
    """A running PostgreSQL server of its own (trust auth for user ``spine`` on 127.0.0.1)."""

    dsn: str
    """``postgresql://spine@127.0.0.1:<port>/postgres``: what ``SPINE_DATABASE_URL`` takes."""
    port: int
    bindir: Path
    datadir: Path
    user: str | None
    """The OS user the server runs as (``postgres`` when this process is root), or None."""

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (``pg_ctl``, ``psql``, ...) as the server's user."""
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.datadir.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def database(self, name: str) -> str:
        """Create database `name` (if new) and return its DSN: one database per test or run."""
        found = self.run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "spine", "-d", "postgres",
            "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'",
        )  # fmt: skip
        if found.stdout.strip() != "1":
            made = self.run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "spine", name
            )
            if made.returncode != 0:
                raise RuntimeError(f"createdb {name} failed: {made.stderr.strip()}")
        return self.dsn.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def postgres_server(*, port: int | None = None) -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL server from the installed binaries on a free port.

    Its data lives in a temporary directory, removed afterwards; fsync is off (a test server).
    The server refuses to run as root, so under root it runs as the ``postgres`` user Debian's
    package creates.

    Raises:
        PostgresUnavailable: no server binaries (``apt-get install -y postgresql``, or set
            ``SPINE_TEST_PG_BIN``), or root with no ``postgres`` user.
        RuntimeError: the server did not start (its log's tail is in the message).
    """
    import pwd
    import tempfile

    bindir = postgres_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found (apt-get install -y postgresql, or set "
            "SPINE_TEST_PG_BIN to the directory holding initdb and pg_ctl)"
        )
    user = None
    account = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root and there is no 'postgres' user to run the server as"
            ) from None
        user = account.pw_name
    root = Path(tempfile.mkdtemp(prefix="spine-pg-"))
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
    port = port or free_port()
    server = PostgresServer(
        dsn=f"postgresql://spine@127.0.0.1:{port}/postgres",
        port=port,
        bindir=bindir,
        datadir=root / "data",
        user=user,
    )
    try:
        init = server.run(
            "initdb", "-D", str(server.datadir), "-U", "spine", "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-2000:]}")
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        start = server.run(
            "pg_ctl", "-D", str(server.datadir), "-o", options, "-l", str(root / "log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        if start.returncode != 0:
            log = (
                (root / "log").read_text(errors="replace")[-2000:]
                if (root / "log").exists()
                else ""
            )
            raise RuntimeError(f"PostgreSQL did not start: {start.stderr.strip()} {log}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def set_current_build(
    client: Client, deployment_name: str, build_id: str, *, timeout: float = 60.0
) -> None:
    """Make `build_id` the current version of worker deployment `deployment_name` (what
    ``temporal worker deployment set-current-version`` does) and wait until the server has
    propagated the change to the deployment's task queues.

    A version is known to the server once one of its workers has polled, so this retries until
    then.

    Raises:
        TimeoutError: the version did not become current within `timeout` seconds.
    """
    from temporalio.api.enums.v1 import RoutingConfigUpdateState
    from temporalio.api.workflowservice.v1 import (
        DescribeWorkerDeploymentRequest,
        SetWorkerDeploymentCurrentVersionRequest,
    )
    from temporalio.service import RPCError

    service = client.workflow_service
    request = SetWorkerDeploymentCurrentVersionRequest(
        namespace=client.namespace,
        deployment_name=deployment_name,
        build_id=build_id,
        identity="spine-test-kit",
    )
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            await service.set_worker_deployment_current_version(request)
            break
        except RPCError as err:  # the version is not registered until its workers poll
            last = err.message
        await asyncio.sleep(0.25)
    else:
        raise TimeoutError(
            f"build {build_id!r} of deployment {deployment_name!r} did not become current "
            f"within {timeout:.0f}s: {last}"
        )
    describe = DescribeWorkerDeploymentRequest(
        namespace=client.namespace, deployment_name=deployment_name
    )
    while time.monotonic() < deadline:
        info = (await service.describe_worker_deployment(describe)).worker_deployment_info
        current = info.routing_config.current_deployment_version.build_id
        done = RoutingConfigUpdateState.ROUTING_CONFIG_UPDATE_STATE_COMPLETED
        if current == build_id and info.routing_config_update_state == done:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(
        f"build {build_id!r} of deployment {deployment_name!r} was set current but the change "
        f"did not reach its task queues within {timeout:.0f}s"
    )


REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this test kit lives in; `start_worker_process` runs ``worker.py`` from here."""


def _worker_polls(process: subprocess.Popen[bytes], env: Mapping[str, str]) -> bool:
    """Whether `process` polls both the workflow and the activity side of its task queue.

    Asks the Temporal CLI, which reads ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE`` and the other
    env-config settings from `env` as the worker does, and matches pollers by the SDK's default
    worker identity ``<pid>@<host>``, so a recently killed worker on the same queue does not count.
    """
    queue = env.get("SPINE_TASK_QUEUE") or "spine-agents"
    found = subprocess.run(
        [binary("temporal"), "task-queue", "describe", "--task-queue", queue, "-o", "json"],
        env=env,
        capture_output=True,
        timeout=30,
        check=True,
    )
    pollers = json.loads(found.stdout).get("pollers") or []
    mine = {
        p.get("taskQueueType")
        for p in pollers
        if str(p.get("identity", "")).startswith(f"{process.pid}@")
    }
    return {"workflow", "activity"} <= mine


def start_worker_process(
    env: Mapping[str, str],
    *,
    log_file: Path | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 120.0,
) -> subprocess.Popen[bytes]:
    """Start ``python worker.py`` as a child process and return once it polls its task queue.

    Blocks while it waits; from async code call it through ``asyncio.to_thread``.

    Args:
        env: Laid over this process's environment: ``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
            ``SPINE_TASK_QUEUE``, ``VAULT_ADDR`` and ``VAULT_TOKEN`` (or the AppRole ids),
            ``SPINE_DEMO_URL``, ``SPINE_STATE_DIR`` and so on (see `spine.SpineConfig.from_env`).
        log_file: Where the worker's stdout and stderr (its log) are appended; inherited if None.
        cwd: Directory holding ``worker.py``; without one there, ``python -m spine.worker`` is run.
        timeout: Seconds to wait for it to poll both its workflow and its activity task queue.

    Raises:
        RuntimeError: the worker exited, or did not poll in time (it is stopped first).

    Stop it with `stop_worker_process`, or ``os.kill(process.pid, signal.SIGKILL)`` it to
    simulate a crash.
    """
    full_env = {**os.environ, **env}
    if (cwd / "worker.py").exists():
        command = [sys.executable, "worker.py"]
    else:
        command = [sys.executable, "-m", "spine.worker"]
    log = open(log_file, "ab") if log_file else None
    try:
        process = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT if log else None
        )
    finally:
        if log:
            log.close()  # the child keeps its own descriptor

    def where() -> str:
        if not log_file:
            return ""
        tail = log_file.read_text(errors="replace")[-2000:].strip()
        return f" (log {log_file}):\n{tail}" if tail else f" (log {log_file} is empty)"

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"worker.py exited with code {process.returncode}{where()}")
            try:
                if _worker_polls(process, full_env):
                    return process
            except (subprocess.SubprocessError, ValueError) as err:  # server not answering yet
                last = err
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker.py (pid {process.pid}) did not poll task queue "
                    f"{full_env.get('SPINE_TASK_QUEUE') or 'spine-agents'!r} within "
                    f"{timeout:.0f}s; last error: {last}{where()}"
                )
            time.sleep(0.25)
    except BaseException:
        stop_worker_process(process)
        raise


def stop_worker_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM a worker process (it drains and exits 0); SIGKILL it after `timeout` seconds.

    Returns its exit code (negative: the number of the signal that ended it).
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


# ------------------------------------------------------------------------------------------
# Test kit for your own agents: script the model, run a worker built like production, and
# assert over a finished run. Typical use (see examples/notes_agent/README.md):
#
#     turns = script().tool("read_note", note_id="n-1").tool("save_summary", ...).text("Saved.")
#     async with spine_worker(client, agent_modules=("my_agent",), policy_path=POLICY) as w:
#         handle = await start_scripted_run(client, w, "my-agent", "Summarise n-1", turns, ...)
#         result = await handle.result()
#     await assert_tools_called(handle, ["read_note", "save_summary"])
#     await assert_side_effects(handle, ["save_summary"])
#
# Imports are here, not at the top, so this kit stays one appended block.
# ------------------------------------------------------------------------------------------

import re  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar  # noqa: E402

from pydantic import BaseModel  # noqa: E402
from temporalio.api.common.v1 import Payloads  # noqa: E402
from temporalio.api.history.v1 import HistoryEvent  # noqa: E402

from spine.client.runs import RunHandle, start_run  # noqa: E402
from spine.contract import (  # noqa: E402
    AgentRequest,
    AgentResult,
    ApprovalDecision,
    Limits,
    ModelChoice,
    ScriptToolCall,
    ScriptTurn,
    SideEffect,
    TokenUsage,
    Usage,
)
from spine.payloads import ToolCallInput  # noqa: E402

if TYPE_CHECKING:
    from temporalio.worker import Worker  # noqa: E402  # imported lazily at run time: it is heavy

    from spine.guardrails.identity import Keyring  # noqa: E402
    from spine.guardrails.policy import Policy  # noqa: E402
    from spine.guardrails.principals import VaultSigner  # noqa: E402

T_Model = TypeVar("T_Model", bound=BaseModel)


class OnTaskQueue(Protocol):
    """Anything that polls a task queue: a worker from `spine_worker`, a Temporal `Worker`."""

    @property
    def task_queue(self) -> str: ...


Run = RunHandle | AgentResult
"""What the assertions take: a run's handle (read through its history) or its result."""


class ScriptBuilder(list[ScriptTurn]):
    """The scripted model's turns, built fluently; it *is* the ``list[ScriptTurn]``.

    Each of :meth:`tool` and :meth:`text` adds a turn; :meth:`also`, :meth:`confidence`,
    :meth:`usage` and :meth:`fail` change the last one.
    """

    def __init__(self, tokens: tuple[int, int] | None = (100, 20)) -> None:
        super().__init__()
        self._tokens = tokens

    def _turn(self, turn: ScriptTurn) -> ScriptBuilder:
        if self._tokens is not None:
            turn.usage = TokenUsage(input_tokens=self._tokens[0], output_tokens=self._tokens[1])
        self.append(turn)
        return self

    def _last(self) -> ScriptTurn:
        if not self:
            raise ValueError("add a turn with .tool(...) or .text(...) first")
        return self[-1]

    def tool(self, name: str, /, **args: object) -> ScriptBuilder:
        """A turn in which the model calls tool `name` with `args`."""
        return self._turn(ScriptTurn(tool_calls=[ScriptToolCall(name=name, args=args)]))

    def also(self, name: str, /, **args: object) -> ScriptBuilder:
        """One more tool call in the last turn (parallel tool calls)."""
        self._last().tool_calls.append(ScriptToolCall(name=name, args=args))
        return self

    def parallel(self, *calls: tuple[str, Mapping[str, object]]) -> ScriptBuilder:
        """A turn in which the model calls several tools at once: ``(name, args)`` each.

        The run executes them concurrently, up to the agent's ``max_parallel_tool_calls``.
        """
        if not calls:
            raise ValueError("parallel() needs at least one (name, args) call")
        turn = ScriptTurn(
            tool_calls=[ScriptToolCall(name=name, args=dict(args)) for name, args in calls]
        )
        return self._turn(turn)

    def raw(self, name: str, raw_args: str) -> ScriptBuilder:
        """A turn calling `name` with argument text as a model would emit it (may be bad JSON)."""
        call = ScriptToolCall(name=name, raw_args=raw_args)
        return self._turn(ScriptTurn(tool_calls=[call]))

    def text(self, text: str) -> ScriptBuilder:
        """A final-answer turn."""
        return self._turn(ScriptTurn(text=text))

    def confidence(self, value: float) -> ScriptBuilder:
        """The model's confidence in the last turn (approval rules may look at it)."""
        self._last().confidence = value
        return self

    def usage(self, input_tokens: int, output_tokens: int) -> ScriptBuilder:
        """Tokens the last turn reports (what it costs)."""
        self._last().usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        return self

    def fail(self, kind: Literal["transient", "terminal"] = "transient") -> ScriptBuilder:
        """Make the run's model fail the last turn (fallback models still answer it)."""
        self._last().error = kind
        return self


def scripted_model(
    turns: Sequence[ScriptTurn], *, sub_agents: Mapping[str, Sequence[ScriptTurn]] | None = None
) -> ModelChoice:
    """The scripted model with `turns`, and a script for each sub-agent named in `sub_agents`."""
    return ModelChoice(
        provider="scripted",
        script=list(turns),
        sub_agents={
            agent: ModelChoice(provider="scripted", script=list(child))
            for agent, child in (sub_agents or {}).items()
        },
    )


def script(*, tokens: tuple[int, int] | None = (100, 20)) -> ScriptBuilder:
    """Start a scripted-model script; every turn reports `tokens` (input, output) unless
    changed with ``.usage(...)`` (None: report no usage)."""
    return ScriptBuilder(tokens)


@contextlib.asynccontextmanager
async def spine_worker(client: Client, **config: object) -> AsyncIterator[Worker]:
    """A running worker with :class:`spine.SpinePlugin`, the same way production builds one.

    `config` are :class:`spine.SpineConfig` fields (``agent_modules``, ``policy_path``,
    ``settings``, ``secrets``, ``providers``, ...). Test-friendly defaults: a fresh task queue
    (``worker.task_queue`` tells which), a temporary ``state_dir``, and no real model providers
    (``providers={}``: the scripted model only).
    """
    from spine.plugin import SpineConfig, build_worker  # lazily: it imports every activity

    with tempfile.TemporaryDirectory(prefix="spine-test-") as tmp:
        options: dict[str, object] = {
            "task_queue": f"test-{uuid.uuid4()}",
            "state_dir": Path(tmp),
            "providers": {},
            **config,
        }
        built = build_worker(client, config=SpineConfig(**options))  # type: ignore[arg-type]  # SpineConfig checks its fields
        try:
            async with built:
                yield built
        finally:
            mcp = sys.modules.get("spine.activities.mcp")  # loaded only if an agent uses MCP tools
            if mcp is not None:
                await mcp.close_mcp_sessions()  # MCP servers the run started stop with it


async def start_scripted_run(
    client: Client,
    worker: OnTaskQueue | str,
    agent: str,
    goal: str,
    turns: Sequence[ScriptTurn],
    *,
    user: str = "alice",
    role: str,
    account: str = "acme",
    limits: Limits | None = None,
    sub_agents: Mapping[str, Sequence[ScriptTurn]] | None = None,
) -> RunHandle:
    """Start `agent` on the scripted model on `worker`'s task queue (or a queue name).

    `sub_agents` scripts the sub-agents the run may call, by agent name: each child run of that
    agent replays its script (see :func:`child_runs` to find them).
    """
    request = AgentRequest(
        agent=agent,
        goal=goal,
        user=user,
        role=role,
        account=account,
        model=scripted_model(turns, sub_agents=sub_agents),
        limits=limits,
    )
    queue = worker if isinstance(worker, str) else worker.task_queue
    return await start_run(client, request, task_queue=queue)


async def _result(run: Run) -> AgentResult:
    return run if isinstance(run, AgentResult) else await run.result()


def _handle(run: Run, what: str) -> RunHandle:
    if isinstance(run, AgentResult):
        raise TypeError(f"{what} reads the run's history: pass its handle, not its AgentResult")
    return run


async def _events(handle: RunHandle) -> list[HistoryEvent]:
    """History events of the run and of every run it continued as new into, in order.

    A handle from ``start_run`` knows the first run; one got by workflow id alone starts at the
    latest run.
    """
    client = getattr(handle, "_client", None)  # handles do not expose their client publicly
    first = handle.first_execution_run_id or handle.run_id
    current = handle
    if isinstance(client, Client) and first:
        current = client.get_workflow_handle(handle.id, run_id=first, result_type=AgentResult)
    events: list[HistoryEvent] = []
    while True:
        history = await current.fetch_history()
        events.extend(history.events)
        last = history.events[-1] if history.events else None
        if (
            not isinstance(client, Client)
            or last is None
            or not last.HasField("workflow_execution_continued_as_new_event_attributes")
        ):
            return events
        run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        current = client.get_workflow_handle(handle.id, run_id=run_id, result_type=AgentResult)


async def _decode(handle: RunHandle, payloads: Payloads, cls: type[T_Model]) -> T_Model | None:
    client = getattr(handle, "_client", None)  # its converter applies any payload codec
    converter = client.data_converter if isinstance(client, Client) else pydantic_data_converter
    try:
        [value] = await converter.decode(payloads.payloads, [cls])
    except Exception:  # noqa: BLE001  # not this payload type: not what we look for
        return None
    return value if isinstance(value, cls) else None


async def tools_called(handle: RunHandle) -> list[str]:
    """Every tool the run called, in order: one entry per ``tool.<name>`` activity scheduled
    (retries are attempts of the same entry), compensation tools included."""
    names = []
    for event in await _events(handle):
        if event.HasField("activity_task_scheduled_event_attributes"):
            kind = event.activity_task_scheduled_event_attributes.activity_type.name
            tool = tool_of(kind)
            if tool is not None:
                names.append(tool)
    return names


async def assert_tools_called(run: Run, expected: Sequence[str]) -> list[str]:
    """Assert the run called exactly `expected` tools, in order (see :func:`tools_called`)."""
    called = await tools_called(_handle(run, "assert_tools_called"))
    assert called == list(expected), f"tools called: {called}, expected: {list(expected)}"
    return called


@dataclass(frozen=True)
class AskedApproval:
    """An approval the run asked for, and how it was decided."""

    approval_id: str
    tool: str
    decision: str
    by: str
    role: str


async def approvals_asked(handle: RunHandle) -> list[AskedApproval]:
    """Approvals asked and decided in the run, in order, read from its history.

    A decision (``decide`` update or ``approval`` signal) names its approval ``ap-<step>-...``;
    an approved call is the next tool scheduled at that step, a rejected one is named in the
    run's result. Decisions the workflow refused are not counted.
    """
    events = await _events(handle)
    decided: dict[str, ApprovalDecision] = {}
    asked: list[AskedApproval] = []
    waiting: list[ApprovalDecision] = []
    for event in events:
        decision = None
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            if request.input.name == "decide":
                decision = await _decode(handle, request.input.args, ApprovalDecision)
        elif event.HasField("workflow_execution_signaled_event_attributes"):
            signal = event.workflow_execution_signaled_event_attributes
            if signal.signal_name == "approval":
                decision = await _decode(handle, signal.input, ApprovalDecision)
        elif event.HasField("activity_task_scheduled_event_attributes") and waiting:
            scheduled = event.activity_task_scheduled_event_attributes
            call = await _decode(handle, scheduled.input, ToolCallInput)
            for pending in list(waiting):
                if call is not None and _approval_step(pending.approval_id) == call.step:
                    waiting.remove(pending)
                    asked.append(_asked(pending, call.tool))
        if decision is not None and decision.approval_id not in decided:
            decided[decision.approval_id] = decision
            if decision.decision == "approve":
                waiting.append(decision)
    rejected = [d for d in decided.values() if d.decision == "reject"]
    if rejected:
        reason = (await handle.result()).reason or ""
        for decision in rejected:
            found = re.search(rf"approval {re.escape(decision.approval_id)} for (\S+) ", reason)
            if found:
                asked.append(_asked(decision, found.group(1)))
    return asked


def _approval_step(approval_id: str) -> int | None:
    found = re.match(r"ap-(\d+)-", approval_id)
    return int(found.group(1)) if found else None


def _asked(decision: ApprovalDecision, tool: str) -> AskedApproval:
    return AskedApproval(decision.approval_id, tool, decision.decision, decision.by, decision.role)


async def assert_approvals_asked(
    run: Run, expected: Sequence[str], *, decisions: Sequence[str] | None = None
) -> list[AskedApproval]:
    """Assert the run asked for approval of exactly the `expected` tools, in order, and, if
    given, that they were decided as `decisions` (``"approve"``/``"reject"``)."""
    asked = await approvals_asked(_handle(run, "assert_approvals_asked"))
    tools = [a.tool for a in asked]
    assert tools == list(expected), f"approvals asked for: {tools}, expected: {list(expected)}"
    if decisions is not None:
        made = [a.decision for a in asked]
        assert made == list(decisions), f"decisions: {made}, expected: {list(decisions)}"
    return asked


async def assert_side_effects(
    run: Run, expected: Sequence[str], *, compensated: bool | None = None
) -> list[SideEffect]:
    """Assert the run's completed side effects are the `expected` tools, in order; with
    `compensated`, that each was (True) or was not (False) undone."""
    effects = (await _result(run)).side_effects
    tools = [e.tool for e in effects]
    assert tools == list(expected), f"side effects: {tools}, expected: {list(expected)}"
    if compensated is not None:
        wrong = [e.tool for e in effects if e.compensated != compensated]
        state = "compensated" if compensated else "left in place"
        assert not wrong, f"side effects not {state}: {wrong}"
    return effects


async def assert_spend_at_most(run: Run, usd: float) -> Usage:
    """Assert the run spent at most `usd` on models (per the policy's prices)."""
    usage = (await _result(run)).usage
    assert usage.usd <= usd, f"run spent {usage.usd:.6f} USD, more than {usd:.6f}"
    return usage


@dataclass(frozen=True)
class CallTiming:
    """One tool call of a turn as history shows it: scheduled, and closed (None: still open)."""

    tool: str
    call_id: str
    scheduled: datetime
    closed: datetime | None


@dataclass(frozen=True)
class TurnTiming:
    """A step's tool calls (the model's, not compensations), from the run's history."""

    step: int
    calls: list[CallTiming]

    @property
    def duration(self) -> float:
        """Seconds from the first call scheduled to the last one closed."""
        start = min(c.scheduled for c in self.calls)
        end = max(c.closed or c.scheduled for c in self.calls)
        return (end - start).total_seconds()

    @property
    def max_concurrent(self) -> int:
        """The most calls of the turn that were scheduled and not yet closed at one moment."""
        edges = sorted(
            [(c.scheduled, 1) for c in self.calls]
            + [(c.closed, -1) for c in self.calls if c.closed is not None],
            key=lambda edge: (edge[0], edge[1]),  # a close before an open at the same instant
        )
        running = most = 0
        for _, delta in edges:
            running += delta
            most = max(most, running)
        return most


async def turn_timings(handle: RunHandle) -> dict[int, TurnTiming]:
    """Each step's tool calls with their times, read from the run's history (all of its chain).

    A turn whose calls ran concurrently has a ``duration`` close to its slowest call's and a
    ``max_concurrent`` above 1 (at most the agent's ``max_parallel_tool_calls``).
    """
    scheduled: dict[int, tuple[ToolCallInput, datetime]] = {}
    closed: dict[int, datetime] = {}
    for event in await _events(handle):
        when = event.event_time.ToDatetime()
        if event.HasField("activity_task_scheduled_event_attributes"):
            attributes = event.activity_task_scheduled_event_attributes
            if tool_of(attributes.activity_type.name) is None:
                continue
            call = await _decode(handle, attributes.input, ToolCallInput)
            if call is not None and call.purpose != "compensation":
                scheduled[event.event_id] = (call, when)
        for field_name in (
            "activity_task_completed_event_attributes",
            "activity_task_failed_event_attributes",
            "activity_task_timed_out_event_attributes",
            "activity_task_canceled_event_attributes",
        ):
            if event.HasField(field_name):
                closed[getattr(event, field_name).scheduled_event_id] = when
    turns: dict[int, list[CallTiming]] = {}
    for event_id, (call, when) in scheduled.items():
        timing = CallTiming(call.tool, call.call_id, when, closed.get(event_id))
        turns.setdefault(call.step, []).append(timing)
    return {step: TurnTiming(step, calls) for step, calls in sorted(turns.items())}


async def child_runs(handle: RunHandle) -> list[RunHandle]:
    """The sub-agent runs `handle`'s run started, in order (handles on each child workflow)."""
    client = getattr(handle, "_client", None)
    if not isinstance(client, Client):
        raise TypeError("child_runs needs a handle from a client (start_run or get_run)")
    children = []
    for event in await _events(handle):
        if event.HasField("child_workflow_execution_started_event_attributes"):
            started = event.child_workflow_execution_started_event_attributes
            children.append(
                client.get_workflow_handle(
                    started.workflow_execution.workflow_id,
                    run_id=started.workflow_execution.run_id,
                    result_type=AgentResult,
                )
            )
    return children


async def assert_sub_agents(run: RunHandle, expected: Sequence[str]) -> list[RunHandle]:
    """Assert the run started sub-agent runs of exactly the `expected` agents, in order."""
    children = await child_runs(run)
    agents = []
    for child in children:
        history = await child.fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        agents.append(await _child_agent(child, started.input))
    assert agents == list(expected), f"sub-agents started: {agents}, expected: {list(expected)}"
    return children


async def _child_agent(child: RunHandle, payloads: Payloads) -> str:
    from spine.workflows.state import AgentWorkflowInput  # the child's input names its parent

    request = await _decode(child, payloads, AgentWorkflowInput)
    return request.agent if request is not None else "?"


# ------------------------------------------------------------------------------------------
# The pytest plugin: installing Spine registers this module with pytest (entry point
# ``pytest11``), so a project's own tests, wherever they live, get these session fixtures:
#
#     client             a Temporal client on `temporal_env` that signs as the principal each
#                        call names (the request's `user`, the decision's `by`)
#     vault              a real OpenBao dev server (`VaultDev`) with `spine_principals` seeded
#     temporal_env       the real Temporal dev server (`temporal_dev_server()`)
#     spine_principals   who `vault` seeds: name -> OpenBao groups (default: the demo's five);
#                        override it in your conftest.py to seed your own people
#
# They need pytest-asyncio with session-scoped loops (``asyncio_mode = "auto"``,
# ``asyncio_default_fixture_loop_scope = "session"``, ``asyncio_default_test_loop_scope =
# "session"``). A conftest.py fixture of the same name takes precedence over these.
# ------------------------------------------------------------------------------------------

try:  # the plugin's fixtures exist only where pytest does; the kit itself does not need it
    import pytest as _pytest
    import pytest_asyncio as _pytest_asyncio
except ImportError:  # pragma: no cover  # the kit without pytest: no fixtures to define
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:

    @_pytest.fixture(scope="session")
    def spine_principals() -> dict[str, tuple[str, ...]]:
        """Principals the `vault` fixture seeds (name -> OpenBao identity groups)."""
        return dict(DEMO_PRINCIPALS)

    @_pytest_asyncio.fixture(scope="session", loop_scope="session")
    async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
        """The real Temporal dev server on a free port, Spine's search attributes registered."""
        async with temporal_dev_server() as env:
            yield env

    @_pytest.fixture(scope="session")
    def vault(spine_principals: dict[str, tuple[str, ...]]) -> Iterator[VaultDev]:
        """A real OpenBao dev server with `spine_principals` seeded (passwords ``pw-<name>``)."""
        server = start_vault_dev()
        try:
            server.tokens = server.seed_principals(spine_principals)
            yield server
        finally:
            server.stop()

    @_pytest.fixture(scope="session")
    def client(temporal_env: WorkflowEnvironment, vault: VaultDev) -> Client:
        """`temporal_env`'s client, signing each call as the principal it names."""
        return vault.signed(temporal_env.client)
