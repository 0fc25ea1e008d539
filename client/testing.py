"""Test kit: real servers for your own pytest suites, the way Spine's own tests use them.

Everything starts from the installed binaries (``temporal``, ``temporal-test-server``, ``bao``)
on free loopback ports; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hvac
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

SEARCH_ATTRIBUTES = (
    SearchAttributeKey.for_keyword("SpineAgent"),
    SearchAttributeKey.for_keyword("SpineAccount"),
    SearchAttributeKey.for_keyword("SpineStatus"),
    SearchAttributeKey.for_float("SpineCostUSD"),
    SearchAttributeKey.for_int("SpineSteps"),
)


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
async def temporal_dev_server(*, db_file: Path | None = None) -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server with Spine's search attributes registered."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_database_filename=str(db_file) if db_file else None,
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

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.url, token=self.token)

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
    """Start the demo business service (``python -m demo``) on a free port."""
    port = free_port()
    api_key = api_key or secrets.token_hex(16)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "demo",
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


@contextlib.contextmanager
def demo_stack(tmp: Path) -> Iterator[tuple[VaultDev, DemoService]]:
    """OpenBao seeded with the demo's secret, plus the demo business service."""
    service = start_demo_service(tmp / "demo-service.db")
    vault = None
    try:
        vault = start_vault_dev()
        vault.put_secret("spine/acme", {"api_key": service.api_key})
        yield vault, service
    finally:
        service.stop()
        if vault:
            vault.stop()
