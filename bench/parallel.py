"""A parallel turn vs the same calls one after another, side by side.

The refund agent's model proposes N order lookups in one turn (the demo service takes
``--latency-ms`` per lookup). The same scripted run goes to two workers of one process: one whose
policy lets a turn's calls run at once (``max_parallel_tool_calls = N``), one whose policy runs
them one by one (``max_parallel_tool_calls = 1``). Arms alternate to share the machine's noise;
each turn's duration is read from the run's history (first call scheduled to last call closed),
as well as each run's wall time. Prints a table and the speed-up ratio per N.

    python -m bench.parallel [--quick] [--sizes 2,5,8] [--rounds 5] [--latency-ms 300] [--out F]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import bench_policy, bench_stack, parser, write_results
from spine.client.runs import start_run
from spine.client.testing import script, scripted_model, turn_timings
from spine.contract import AgentRequest
from spine.guardrails.secrets import VaultSecrets
from spine.plugin import SpineConfig, build_worker


async def _one(client, queue: str, size: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """One run of a turn of `size` lookups; (turn seconds from history, run wall seconds)."""
    turns = script().parallel(
        *[("lookup_order", {"order_id": f"o-{1100 + i}"}) for i in range(size)]
    )
    request = AgentRequest(
        agent="refund-agent",
        goal="Look the orders up.",
        user="bench",
        role="support",
        account="acme",
        model=scripted_model(turns.text("done")),
    )
    began = time.perf_counter()
    handle = await start_run(client, request, task_queue=queue)
    result = await handle.result()
    wall = time.perf_counter() - began
    if result.status != "completed":
        raise RuntimeError(f"run {handle.id} ended {result.status}: {result.reason}")
    return (await turn_timings(handle))[1].duration, wall


async def main() -> None:
    p = parser(__doc__, "3 rounds of N = 5")
    p.add_argument("--sizes", default="2,5,8", help="calls per turn, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-ms", type=int, default=300, help="the service's time per lookup")
    args = p.parse_args()
    sizes = [5] if args.quick else [int(s) for s in args.sizes.split(",")]
    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="spine-bench-parallel-") as tmp_name:
        tmp = Path(tmp_name)
        async with bench_stack(tmp) as stack:
            client = stack.server.client
            stack.chaos(latency_ms=args.latency_ms)
            workers = {}
            for arm, cap in (("parallel", max(sizes)), ("sequential", 1)):
                policy = bench_policy(
                    tmp, refund_agent={"max_parallel_tool_calls": cap}, name=f"{arm}.toml"
                )
                config = SpineConfig(
                    task_queue=f"bench-{arm}-{uuid.uuid4().hex[:6]}",
                    policy_path=policy,
                    state_dir=tmp / f"state-{arm}",
                    settings={"SPINE_DEMO_URL": stack.service.url},
                    secrets=VaultSecrets(stack.vault.url, token=stack.vault.token),
                    providers={},
                    ledger=arm == "parallel",  # one budget-ledger worker per process
                )
                workers[arm] = build_worker(client, config=config)
            rows = []
            async with workers["parallel"], workers["sequential"]:
                for size in sizes:
                    samples: dict[str, list[tuple[float, float]]] = {
                        "parallel": [],
                        "sequential": [],
                    }
                    for _ in range(rounds):
                        for arm in ("parallel", "sequential"):
                            samples[arm].append(await _one(client, workers[arm].task_queue, size))
                    par = statistics.median(t for t, _ in samples["parallel"])
                    seq = statistics.median(t for t, _ in samples["sequential"])
                    rows.append(
                        {
                            "calls": size,
                            "parallel_turn_s": round(par, 3),
                            "sequential_turn_s": round(seq, 3),
                            "speedup": round(seq / par, 2),
                            "parallel_run_s": round(
                                statistics.median(w for _, w in samples["parallel"]), 3
                            ),
                            "sequential_run_s": round(
                                statistics.median(w for _, w in samples["sequential"]), 3
                            ),
                        }
                    )
            stack.chaos()
    print(f"\nparallel turn vs the same calls one by one ({args.latency_ms} ms per lookup, "
          f"median of {rounds} rounds)")  # fmt: skip
    print(f"{'calls':>5}  {'parallel turn':>13}  {'one by one':>10}  {'speed-up':>8}  "
          f"{'run (par / seq)':>16}")  # fmt: skip
    for row in rows:
        par, seq = row["parallel_turn_s"], row["sequential_turn_s"]
        runs = f"{row['parallel_run_s']:.2f}s / {row['sequential_run_s']:.2f}s"
        print(
            f"{row['calls']:>5}  {par:>12.2f}s  {seq:>9.2f}s  {row['speedup']:>7.2f}x  {runs:>16}"
        )
    write_results(
        args.out,
        "parallel",
        {"latency_ms": args.latency_ms, "rounds": rounds, "rows": rows},
    )


if __name__ == "__main__":
    asyncio.run(main())
