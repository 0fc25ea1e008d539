"""What Spine costs per step over bare Temporal doing the same work on the same server.

A Spine step is a scripted model turn plus one order lookup against the demo service, with
everything on: tool allowlist interceptor, schema checks on input and output, approval rules,
transcript store, per-account budget ledger, a Vault secret read per tool call, the audit log,
search attributes and OpenTelemetry tracing (spans to a file). A bare step is two plain
activities (a stand-in model and the same HTTP lookup) with none of that.

The lookup runs three ways, each compared with the bare loop running it the same way:

* ``activity``: a regular activity on the run's own task queue (``lookup_order_open``);
* ``rate_limited``: on a task queue with a fleet-wide rate limit (``lookup_order``, in the
  policy's ``demo-service`` rate-limit group; the bare lookup gets a queue with the same limit);
* ``local``: a local activity (``lookup_order_local``).

Single runs alternate Spine and bare to share the machine's noise; then `--concurrent` runs of
each (regular activity path) start at once and the wall time to finish them all is compared,
in `--concurrent-rounds` rounds that alternate which arm goes first (the figure is the median:
on a shared two-core machine one round of either arm varies by 20%).

The concurrent arms run twice per round. First the Temporal server shares every core with
the workers, as on a laptop. Then the server has half of the cores to itself, and the workers
and the services they call (the demo service, OpenBao) have the other half. That is how a
platform team deploys: workers on their own hosts beside a Temporal cluster. On shared cores,
Spine's extra worker CPU (guards, audit, transcripts, tracing) takes CPU from the server, and
so lowers the server's throughput. On separate cores it only costs the workers' own hosts.

    python -m bench.overhead [--quick] [--steps 40] [--rounds 3] [--concurrent 200]
        [--concurrent-rounds 3] [--concurrent-steps 10] [--shared-cores-only] [--out F]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from bench.bare import BareInput, BareLoop, bare_chat, bare_lookup, bare_model
from bench.common import (
    CpuMeter,
    Stack,
    bench_policy,
    bench_stack,
    parser,
    separate_cores,
    server_pids,
    spine_request,
    write_results,
)
from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env
from spine.client.runs import start_run
from spine.client.testing import (
    PostgresServer,
    postgres_server,
    start_worker_process,
    stop_worker_process,
)
from spine.contract import ModelChoice
from spine.guardrails.policy import load_policy
from spine.guardrails.secrets import VaultSecrets
from spine.observability.telemetry import telemetry_from_env
from spine.plugin import SpineConfig, build_worker
from tests.fakes.llm_server import FakeLLMServer, FakeToolCall
from tests.helpers import call, turn

SPINE_QUEUE = "bench-spine"
PG3_QUEUE = "bench-spine-pg3"
BARE_QUEUE = "bench-bare"
#: Where the concurrent arms run: the server sharing every CPU with the workers, or on half of
#: them with the workers (and the services they call) on the other half, as on separate hosts.
TOPOLOGY = {
    "shared": "server and workers share every core",
    "separate": "server on its own cores, as on separate hosts",
}
#: The policy's `demo-service` rate limit, given to the bare loop's rate-limited queue too.
RATE = 50.0

SPINE_TOOL = {
    "activity": "lookup_order_open",
    "rate_limited": "lookup_order",
    "local": "lookup_order_local",
}
#: Single-run arms: (tool path, model provider). The provider arms send the model's every call
#: through the real SDK to the local wire-format server (tests/fakes/llm_server.py): Spine loads
#: the transcript from its store, the bare loop carries it in the workflow.
SINGLE = {
    "activity": ("activity", "scripted"),
    "rate_limited": ("rate_limited", "scripted"),
    "local": ("local", "scripted"),
    "openai": ("activity", "openai"),
    "anthropic": ("activity", "anthropic"),
}


class Arms:
    def __init__(
        self, client: Client, url: str, api_key: str, llm: FakeLLMServer | None = None
    ) -> None:
        self.client, self.url, self.api_key, self.llm = client, url, api_key, llm

    def _script_llm(self, provider: str, steps: int) -> None:
        """Queue the model's replies on the local wire-format server: `steps` lookups, then
        the answer (both arms hear the same conversation)."""
        assert self.llm is not None
        enqueue = self.llm.enqueue_openai if provider == "openai" else self.llm.enqueue_anthropic
        for i in range(steps):
            order = f"o-{1100 + i % 50}"
            enqueue(tool_calls=[FakeToolCall("lookup_order_open", {"order_id": order})])
        enqueue("done")

    async def spine(
        self, path: str, steps: int, provider: str = "scripted", queue: str = SPINE_QUEUE
    ) -> float:
        """One Spine run of `steps` lookups and a final answer; seconds."""
        tool = SPINE_TOOL[path]
        script = [turn(call(tool, order_id=f"o-{1100 + i % 50}")) for i in range(steps)]
        script.append(turn(text="done"))
        request = spine_request(script, agent="bench-agent", max_steps=steps + 2)
        if provider != "scripted":
            self._script_llm(provider, steps)
            name = "gpt-4.1" if provider == "openai" else "claude-sonnet-4-6"
            request.model = ModelChoice(provider=provider, name=name)  # type: ignore[arg-type]
        start = time.perf_counter()
        handle = await start_run(self.client, request, task_queue=queue)
        result = await handle.result()
        elapsed = time.perf_counter() - start
        if result.status != "completed":
            raise RuntimeError(f"spine run {handle.id} ended {result.status}: {result.reason}")
        return elapsed

    async def bare(self, path: str, steps: int, provider: str = "scripted") -> float:
        llm_url = ""
        if provider != "scripted":
            assert self.llm is not None
            self._script_llm(provider, steps)
            llm_url = (
                self.llm.base_url_openai if provider == "openai" else self.llm.base_url_anthropic
            )
        start = time.perf_counter()
        await self.client.execute_workflow(
            BareLoop.run,
            BareInput(
                steps=steps + 1,
                url=self.url,
                api_key=self.api_key,
                path=path,  # type: ignore[arg-type]
                rate_limited_queue=f"{BARE_QUEUE}--rl",
                provider="" if provider == "scripted" else provider,
                llm_base_url=llm_url,
            ),
            id=f"bare-{uuid.uuid4()}",
            task_queue=BARE_QUEUE,
        )
        return time.perf_counter() - start


async def concurrently(run: Callable[[], Awaitable[float]], count: int) -> tuple[float, float]:
    """(wall seconds to finish all `count` runs, median run seconds)."""
    start = time.perf_counter()
    durations = await asyncio.gather(*(run() for _ in range(count)))
    return time.perf_counter() - start, statistics.median(durations)


async def three_workers_on_postgres(
    stack: Stack, arms: Arms, policy: Path, concurrent: int, conc_steps: int, tmp: Path
) -> dict[str, float]:
    """The concurrent load over three `python worker.py` processes, each with its own state
    dir, sharing a PostgreSQL server (started here) through SPINE_DATABASE_URL."""
    total_steps = concurrent * (conc_steps + 1)
    with postgres_server() as pg:
        url = pg.database("bench")
        env = {**stack.worker_env(PG3_QUEUE, policy=policy), "SPINE_DATABASE_URL": url}
        started = []
        try:
            for i in range(3):
                worker_env = {**env, "SPINE_STATE_DIR": str(tmp / f"pg3-host-{i}")}
                log = tmp / f"pg3-worker-{i}.log"
                started.append(
                    await asyncio.to_thread(start_worker_process, worker_env, log_file=log)
                )
            await arms.spine("activity", 3, queue=PG3_QUEUE)  # warm up
            meter = CpuMeter(
                {
                    "worker": [p.pid for p in started],
                    "server": server_pids(stack.server.port),
                    "postgres": postgres_pids(pg),
                }
            )
            meter.start()
            wall, run_median = await concurrently(
                lambda: arms.spine("activity", conc_steps, queue=PG3_QUEUE), concurrent
            )
            used = meter.stop()
        finally:
            for process in started:
                stop_worker_process(process)
    found = {
        "wall_s": wall,
        "run_median_s": run_median,
        "worker_cpu_ms_per_step": used["worker"] * 1000 / total_steps,
        "server_cpu_ms_per_step": used["server"] * 1000 / total_steps,
        "postgres_cpu_ms_per_step": used["postgres"] * 1000 / total_steps,
    }
    print(
        f"{concurrent} concurrent spine runs over 3 worker processes sharing PostgreSQL: "
        f"{wall:.1f} s; CPU per step: workers {found['worker_cpu_ms_per_step']:.1f} ms, server "
        f"{found['server_cpu_ms_per_step']:.1f} ms, PostgreSQL "
        f"{found['postgres_cpu_ms_per_step']:.1f} ms",
        flush=True,
    )
    return found


def postgres_pids(server: PostgresServer) -> list[int]:
    """The PostgreSQL server's processes: its postmaster (by data dir) and the postmaster's
    children (backends, writers)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            stats[int(entry.name)] = (argv, ppid)
    masters = {pid for pid, (argv, _) in stats.items() if str(server.datadir).encode() in argv}
    return sorted(masters | {pid for pid, (_, ppid) in stats.items() if ppid in masters})


async def main(
    steps: int,
    rounds: int,
    concurrent: int,
    conc_steps: int,
    out: Path | None,
    skip_single: bool = False,
    pg3: bool = True,
    no_tracing: bool = False,
    conc_rounds: int = 1,
    separate: bool = True,
    production_config: bool = True,
):
    tmp = Path(tempfile.mkdtemp(prefix="spine-bench-overhead-"))
    policy = bench_policy(tmp, bench_agent={"max_steps": max(steps, conc_steps) + 5})
    assert load_policy(policy).rate_limits.get("demo-service") == RATE, "policy rate changed"
    telemetry = telemetry_from_env(
        {
            "SPINE_TRACE_FILE": str(tmp / "traces.jsonl"),
            **({"OTEL_SDK_DISABLED": "true"} if no_tracing else {}),
        }
    )
    llm = FakeLLMServer().start()
    async with bench_stack(tmp, production_config=production_config) as stack:
        server_config = stack.server.dynamic_config
        client = stack.server.client
        config = SpineConfig(
            task_queue=SPINE_QUEUE,
            state_dir=tmp / "state",
            policy_path=policy,
            agent_modules=("spine.demo.agent", "bench.agents"),
            settings={"SPINE_DEMO_URL": stack.service.url},
            secrets=VaultSecrets(stack.vault.url, token=stack.vault.token),
            providers={
                "openai": openai_provider_from_env(llm.env()),
                "anthropic": anthropic_provider_from_env(llm.env()),
            },
        )
        spine_worker = build_worker(
            client,
            config=config,
            plugins=telemetry.worker_plugins(load_policy(policy).price_table()),
        )
        bare_worker = Worker(
            client,
            task_queue=BARE_QUEUE,
            workflows=[BareLoop],
            activities=[bare_model, bare_lookup, bare_chat],
            max_concurrent_activities=config.max_concurrent_activities,
        )
        bare_rl_worker = Worker(
            client,
            task_queue=f"{BARE_QUEUE}--rl",
            activities=[bare_lookup],
            max_task_queue_activities_per_second=RATE,
            max_concurrent_activities=config.max_concurrent_activities,
        )
        arms = Arms(client, stack.service.url, stack.service.api_key, llm)
        paths = list(SINGLE)
        single: dict[str, dict[str, list[float]]] = {p: {"spine": [], "bare": []} for p in paths}
        async with spine_worker, bare_worker, bare_rl_worker:
            for path in paths:  # warm every path up
                tool_path, provider = SINGLE[path]
                await arms.spine(tool_path, 3, provider)
                await arms.bare(tool_path, 3, provider)
            for r in range(rounds if not skip_single else 0):
                for path in paths:
                    # Alternate which arm goes first, so neither always follows the other.
                    order = ("spine", "bare") if r % 2 == 0 else ("bare", "spine")
                    for arm in order:
                        tool_path, provider = SINGLE[path]
                        seconds = await getattr(arms, arm)(tool_path, steps, provider)
                        single[path][arm].append(seconds / (steps + 1))
                last = [
                    f"{p} {single[p]['spine'][-1] * 1000:.0f}/{single[p]['bare'][-1] * 1000:.0f}"
                    for p in paths
                ]
                print(f"round {r + 1}/{rounds} (spine/bare ms): {', '.join(last)}", flush=True)
            meter = CpuMeter({"worker": [os.getpid()], "server": server_pids(stack.server.port)})
            total_steps = concurrent * (conc_steps + 1)
            topologies = ("shared", "separate") if separate else ("shared",)
            rounds_of: dict[str, dict[str, list[dict[str, float]]]] = {
                t: {"spine": [], "bare": []} for t in topologies
            }
            for r in range(conc_rounds):
                for topology in topologies:
                    pinned = (
                        separate_cores(
                            server_pids(stack.server.port),
                            [os.getpid(), stack.service.process.pid, stack.vault.process.pid],
                        )
                        if topology == "separate"
                        else contextlib.nullcontext()
                    )
                    with pinned:
                        # Alternate which arm goes first; the figures are medians over rounds.
                        for arm in ("spine", "bare") if r % 2 == 0 else ("bare", "spine"):
                            meter.start()
                            wall, run_median = await concurrently(
                                lambda arm=arm: getattr(arms, arm)("activity", conc_steps),
                                concurrent,
                            )
                            used = meter.stop()
                            found = {
                                "wall_s": wall,
                                "run_median_s": run_median,
                                "worker_cpu_ms_per_step": used["worker"] * 1000 / total_steps,
                                "server_cpu_ms_per_step": used["server"] * 1000 / total_steps,
                            }
                            rounds_of[topology][arm].append(found)
                            print(
                                f"round {r + 1}/{conc_rounds} ({topology} cores): {concurrent} "
                                f"concurrent {arm} runs: {wall:.1f} s; CPU per step: worker "
                                f"{found['worker_cpu_ms_per_step']:.1f} ms, server "
                                f"{found['server_cpu_ms_per_step']:.1f} ms",
                                flush=True,
                            )
            conc = {
                topology: {
                    arm: {k: statistics.median(f[k] for f in found) for k in found[0]}
                    for arm, found in by_arm.items()
                }
                for topology, by_arm in rounds_of.items()
            }
            ratios = {
                topology: [
                    s["wall_s"] / b["wall_s"]
                    for s, b in zip(by_arm["spine"], by_arm["bare"], strict=True)
                ]
                for topology, by_arm in rounds_of.items()
            }
            pg3_found = None
            if pg3:
                pg3_found = await three_workers_on_postgres(
                    stack, arms, policy, concurrent, conc_steps, tmp
                )
    telemetry.shutdown()
    llm.stop()

    results: dict[str, object] = {"server_dynamic_config": server_config}
    if not skip_single:  # the single-run rows, only when they ran
        print(f"\nper-step latency, single run ({steps + 1} steps per run, median of {rounds})")
        results.update({"steps_per_run": steps + 1, "rounds": rounds, "single": {}})
    for path in paths if not skip_single else []:
        s = statistics.median(single[path]["spine"])
        b = statistics.median(single[path]["bare"])
        # Each round's arms ran back to back: their ratio is what the machine's drift over the
        # whole run (both arms slower in a late round) moves least.
        paired = [x / y for x, y in zip(single[path]["spine"], single[path]["bare"], strict=True)]
        results["single"][path] = {  # type: ignore[index]
            "spine_step_ms": round(s * 1000, 1),
            "bare_step_ms": round(b * 1000, 1),
            "ratio": round(s / b, 3),
            "round_ratios": [round(r, 3) for r in paired],
            "median_round_ratio": round(statistics.median(paired), 3),
            "spine_rounds_ms": [round(x * 1000, 1) for x in single[path]["spine"]],
            "bare_rounds_ms": [round(x * 1000, 1) for x in single[path]["bare"]],
        }
        print(
            f"  {path:<13} spine {s * 1000:6.1f} ms   bare {b * 1000:6.1f} ms   ratio {s / b:.2f}"
            f"   (each round: {', '.join(f'{r:.2f}' for r in paired)})"
        )
    total = concurrent * (conc_steps + 1)
    print(
        f"{concurrent} concurrent runs of {conc_steps + 1} steps (regular activity path), "
        f"median of {conc_rounds} rounds"
    )
    for topology, key in (("shared", "concurrent"), ("separate", "concurrent_separate_cores")):
        if topology not in conc:
            continue
        spine, bare = conc[topology]["spine"], conc[topology]["bare"]
        s_wall, b_wall = spine["wall_s"], bare["wall_s"]
        print(
            f"  {TOPOLOGY[topology]}: spine {s_wall:.1f} s ({total / s_wall:.1f} steps/s)   "
            f"bare {b_wall:.1f} s ({total / b_wall:.1f} steps/s)   ratio {s_wall / b_wall:.2f}"
            f"   (each round: {', '.join(f'{r:.2f}' for r in ratios[topology])})"
        )
        results[key] = {
            "topology": TOPOLOGY[topology],
            "runs": concurrent,
            "steps_per_run": conc_steps + 1,
            "spine_wall_s": round(s_wall, 2),
            "bare_wall_s": round(b_wall, 2),
            "spine_steps_per_s": round(total / s_wall, 1),
            "bare_steps_per_s": round(total / b_wall, 1),
            "spine_run_median_s": round(spine["run_median_s"], 2),
            "bare_run_median_s": round(bare["run_median_s"], 2),
            "ratio": round(s_wall / b_wall, 3),
            "rounds": conc_rounds,
            "round_ratios": [round(r, 3) for r in ratios[topology]],
            "cpu_ms_per_step": {
                arm: {
                    "worker": round(conc[topology][arm]["worker_cpu_ms_per_step"], 2),
                    "server": round(conc[topology][arm]["server_cpu_ms_per_step"], 2),
                }
                for arm in ("spine", "bare")
            },
        }
    b_wall = conc["shared"]["bare"]["wall_s"]
    if pg3_found is not None:
        pg = pg3_found
        print(
            f"  spine over 3 worker processes sharing PostgreSQL {pg['wall_s']:.1f} s "
            f"({total / pg['wall_s']:.1f} steps/s)   ratio to bare {pg['wall_s'] / b_wall:.2f}"
        )
        results["concurrent_pg3"] = {
            "runs": concurrent,
            "steps_per_run": conc_steps + 1,
            "wall_s": round(pg["wall_s"], 2),
            "steps_per_s": round(total / pg["wall_s"], 1),
            "run_median_s": round(pg["run_median_s"], 2),
            "ratio_to_bare": round(pg["wall_s"] / b_wall, 3),
            "cpu_ms_per_step": {
                "workers": round(pg["worker_cpu_ms_per_step"], 2),
                "server": round(pg["server_cpu_ms_per_step"], 2),
                "postgres": round(pg["postgres_cpu_ms_per_step"], 2),
            },
        }
    write_results(out, "overhead", results)


if __name__ == "__main__":
    p = parser(__doc__, "40 steps x 2 rounds single, 50 concurrent runs of 10 steps")
    p.add_argument("--steps", type=int, default=None, help="tool steps per single run")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--concurrent", type=int, default=None, help="concurrent runs")
    p.add_argument(
        "--concurrent-rounds", type=int, default=None, help="rounds of the concurrent arms"
    )
    p.add_argument(
        "--concurrent-steps",
        type=int,
        default=10,
        help="tool steps per concurrent run (a run pays fixed costs once: start, sandbox, "
        "ledger, audit; longer runs spread them)",
    )
    p.add_argument("--skip-single", action="store_true", help="only the concurrent arm")
    p.add_argument(
        "--no-pg3", action="store_true", help="skip the arm over three workers sharing PostgreSQL"
    )
    p.add_argument(
        "--shared-cores-only",
        action="store_true",
        help="skip the concurrent arms with the server on its own cores",
    )
    p.add_argument(
        "--no-tracing", action="store_true", help="diagnostic: what tracing costs (not a figure)"
    )
    p.add_argument(
        "--dev-sa-refresh",
        action="store_true",
        help="keep the dev server's test-only search-attribute refresh (see bench.common)",
    )
    args = p.parse_args()
    if not 0 <= args.concurrent_steps <= 500:
        p.error(f"--concurrent-steps must be between 0 and 500 (got {args.concurrent_steps})")
    asyncio.run(
        main(
            args.steps or (40 if args.quick else 60),
            args.rounds or (2 if args.quick else 4),
            args.concurrent or (50 if args.quick else 200),
            args.concurrent_steps,
            args.out,
            args.skip_single,
            not args.no_pg3,
            args.no_tracing,
            args.concurrent_rounds or (1 if args.quick else 3),
            not args.shared_cores_only and len(os.sched_getaffinity(0)) >= 2,
            not args.dev_sa_refresh,
        )
    )
