"""Session-wide real servers: Temporal dev server, OpenBao dev, the demo business service."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from spine.client.testing import (
    DemoService,
    PostgresServer,
    PostgresUnavailable,
    VaultDev,
    demo_stack,
    postgres_server,
    stop_worker_process,
    temporal_dev_server,
    temporal_time_skipping,
)
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig, build_worker
from tests.helpers import TEST_PRINCIPALS, signed_client, unavailable, write_test_policy


@pytest.fixture(scope="session")
async def temporal_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[WorkflowEnvironment]:
    async with temporal_dev_server() as env:
        yield env


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    async with temporal_time_skipping() as env:
        yield env


@pytest.fixture(scope="session")
def client(temporal_env: WorkflowEnvironment, vault: VaultDev) -> Client:
    """The session's client: it signs each call as the principal the call names (the request's
    `user`, the decision's `by`), with that principal's OpenBao token."""
    return signed_client(temporal_env.client, vault)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VaultDev, DemoService]]:
    with demo_stack(tmp_path_factory.mktemp("stack")) as (vault, service):
        vault.tokens.update(vault.seed_principals(TEST_PRINCIPALS))
        yield vault, service


@pytest.fixture(scope="session")
def test_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default policy, with the test principals (tests make fresh accounts for isolation)."""
    return write_test_policy(tmp_path_factory.mktemp("policy") / "policy.toml")


@pytest.fixture(scope="session")
def vault(stack: tuple[VaultDev, DemoService]) -> VaultDev:
    return stack[0]


@pytest.fixture(scope="session")
def service(stack: tuple[VaultDev, DemoService]) -> DemoService:
    return stack[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the session's own, on a free port (fails under CI if missing)."""
    try:
        server = postgres_server()
        running = server.__enter__()
    except PostgresUnavailable as err:
        unavailable(str(err))
    try:
        yield running
    finally:
        server.__exit__(None, None, None)


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4()}"


@pytest.fixture
def worker_config(
    vault: VaultDev, service: DemoService, tmp_path: Path, task_queue: str, test_policy: Path
) -> SpineConfig:
    settings = {"SPINE_DEMO_URL": service.url}
    return SpineConfig(
        task_queue=task_queue,
        policy_path=test_policy,
        state_dir=tmp_path / "state",
        settings=settings,
        secrets=VaultSecrets(vault.url, token=vault.token),
        providers={},
    )


@pytest.fixture
def make_worker(client: Client, worker_config: SpineConfig):
    @asynccontextmanager
    async def make(*, plugins: Sequence[object] = (), **overrides: object) -> AsyncIterator[Worker]:
        config = SpineConfig(**{**worker_config.__dict__, **overrides})
        async with build_worker(client, config=config, plugins=plugins) as w:  # type: ignore[arg-type]
            yield w

    return make


@pytest.fixture
def new_account(vault: VaultDev, service: DemoService):
    """Make a fresh account whose demo API key is in Vault at secret/spine/<account>."""

    def make(prefix: str = "acct") -> str:
        account = f"{prefix}-{uuid.uuid4().hex[:8]}"
        vault.put_secret(f"spine/{account}", {"api_key": service.api_key})
        return account

    return make


@pytest.fixture
def worker_env(
    client: Client, vault: VaultDev, service: DemoService, task_queue: str, tmp_path: Path
) -> dict[str, str]:
    """The environment a deployed worker gets, pointing at this session's servers."""
    return {
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": client.namespace,
        "SPINE_TASK_QUEUE": task_queue,
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
        "SPINE_DEMO_URL": service.url,
        "SPINE_STATE_DIR": str(tmp_path / "state"),
    }


@pytest.fixture
def worker_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test started; whatever is still alive is stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        stop_worker_process(process, timeout=30)
