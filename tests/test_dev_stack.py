"""`temporal-dev/up --with-postgres` and `temporal-dev/down`, on ports of the test's own.

The up script takes its ports, state dir and env file from ``SPINE_DEV_*`` overrides, so this
test runs a second stack beside anyone's on the fixed ports: Temporal, OpenBao, the demo service
and PostgreSQL start; ``.env`` names ``SPINE_DATABASE_URL``; ``spine demo`` (what ``make demo``
runs) completes in the shared-state mode, its transcript and audit log in PostgreSQL; a second
``up`` re-uses everything; ``down`` stops it all, PostgreSQL included.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spine.client.testing import REPO_ROOT, binary, free_port, postgres_bin
from spine.observability.audit import DatabaseAuditStore, verify
from spine.store import open_database
from tests.helpers import unavailable

pytestmark = pytest.mark.slow


def read_env(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            found[key] = value
    return found


@pytest.fixture
def stack_env() -> Iterator[dict[str, str]]:
    if postgres_bin() is None:
        unavailable("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="spine-devstack-"))
    root.chmod(0o711)  # PostgreSQL runs as `postgres` under root and must reach its data dir
    env = {
        **os.environ,
        "SPINE_DEV_DATA": str(root / "data"),
        "SPINE_DEV_ENV_FILE": str(root / ".env"),
        "SPINE_DEV_TEMPORAL_PORT": str(free_port()),
        "SPINE_DEV_UI_PORT": str(free_port()),
        "SPINE_DEV_VAULT_PORT": str(free_port()),
        "SPINE_DEV_SERVICE_PORT": str(free_port()),
        "SPINE_DEV_PG_PORT": str(free_port()),
        "SPINE_DEV_CONSOLE_PORT": str(free_port()),
        "SPINE_DEV_DEADLINE_S": "120",
    }
    try:
        yield env
    finally:
        subprocess.run(
            [str(REPO_ROOT / "temporal-dev" / "down")], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(root, ignore_errors=True)


def run(args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout


async def test_up_with_postgres_runs_the_demo_in_shared_state_mode(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    up = str(REPO_ROOT / "temporal-dev" / "up")
    first = await asyncio.to_thread(run, [up, "--with-postgres"], stack_env)
    assert "PostgreSQL    postgresql://spine@127.0.0.1:" in first and "(started;" in first
    dotenv = read_env(Path(stack_env["SPINE_DEV_ENV_FILE"]))
    url = dotenv["SPINE_DATABASE_URL"]
    assert url == f"postgresql://spine@127.0.0.1:{stack_env['SPINE_DEV_PG_PORT']}/spine"
    assert dotenv["TEMPORAL_ADDRESS"].endswith(f":{stack_env['SPINE_DEV_TEMPORAL_PORT']}")
    # The console is up too, and the demo links it.
    console = f"http://127.0.0.1:{stack_env['SPINE_DEV_CONSOLE_PORT']}"
    assert dotenv["SPINE_CONSOLE_URL"] == console and f"console       {console}" in first
    login = await asyncio.to_thread(httpx.get, f"{console}/login", timeout=30)
    assert login.status_code == 200 and "Sign in" in login.text

    demo_env = {**stack_env, **dotenv, "SPINE_STATE_DIR": str(tmp_path / "state")}
    shown = await asyncio.to_thread(run, [binary("spine"), "demo"], demo_env, tmp_path)
    assert "completed" in shown, shown
    assert f"Console: {console}/runs/" in shown, shown
    run_id = next(line.split()[1] for line in shown.splitlines() if line.startswith("run:"))
    assert not (tmp_path / "state" / "state.db").exists()  # nothing shared on local disk

    database = open_database(url, read_only=True)
    try:
        async with database.reading() as tx:
            stored = await tx.fetchone(
                "SELECT count(*) AS n FROM spine_transcript WHERE transcript_id LIKE ?",
                (f"{run_id}%",),
            )
        assert stored is not None and stored["n"] > 0
        chains = [r for r in await DatabaseAuditStore(database).run_ids() if r.startswith(run_id)]
        assert len(chains) == 1
        assert verify(await DatabaseAuditStore(database).entries(chains[0])).ok
    finally:
        await database.close()

    again = await asyncio.to_thread(run, [up, "--with-postgres"], stack_env)
    assert "already running" in again and "(already running;" in again
    down = await asyncio.to_thread(run, [str(REPO_ROOT / "temporal-dev" / "down")], stack_env)
    assert "postgres: stopped" in down and "temporal: stopped" in down
    assert "console: stopped" in down
