"""Per-step latency of a Spine step vs a bare Temporal step doing the same work, same server.

A Spine step here is a scripted model turn plus a `lookup_order` tool call with every guard on
(schema validation, transcript store, policy, a Vault secret read, search attributes). The bare
step is two plain activities doing the same HTTP lookup. Arms alternate to share the noise.

    python -m bench.overhead [--steps 50] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from temporalio.worker import Worker

from bench.bare import BareInput, BareLoop, bare_lookup, bare_model
from client.runs import start_run
from client.testing import demo_stack, temporal_dev_server
from guardrails.secrets import VaultSecrets
from tests.helpers import call, scripted_request, turn
from worker import WorkerConfig, build_worker


async def spine_run(client, queue: str, steps: int) -> float:
    script = [turn(call("lookup_order", order_id=f"o-{1100 + i % 50}")) for i in range(steps)]
    script.append(turn(text="done"))
    request = scripted_request(script)
    request.limits = None
    start = time.perf_counter()
    handle = await start_run(client, request, task_queue=queue)
    result = await handle.result()
    elapsed = time.perf_counter() - start
    assert result.status == "completed", result.reason
    return elapsed / (steps + 1)


async def bare_run(client, queue: str, steps: int, url: str, api_key: str) -> float:
    start = time.perf_counter()
    await client.execute_workflow(
        BareLoop.run,
        BareInput(steps=steps + 1, url=url, api_key=api_key),
        id=f"bare-{uuid.uuid4()}",
        task_queue=queue,
    )
    return (time.perf_counter() - start) / (steps + 1)


async def main(steps: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="spine-bench-"))
    policy = tmp / "policy.toml"
    from guardrails.policy import DEFAULT_POLICY_PATH

    policy.write_text(
        DEFAULT_POLICY_PATH.read_text().replace(
            "[agents.refund-agent]\nmax_steps = 20",
            f"[agents.refund-agent]\nmax_steps = {steps + 5}",
        )
    )
    with demo_stack(tmp) as (vault, service):
        async with temporal_dev_server() as env:
            client = env.client
            config = WorkerConfig(
                task_queue="bench-spine",
                state_dir=tmp / "state",
                policy_path=policy,
                settings={"SPINE_DEMO_URL": service.url},
                secrets=VaultSecrets(vault.url, token=vault.token),
                providers={},
            )
            bare_worker = Worker(
                client,
                task_queue="bench-bare",
                workflows=[BareLoop],
                activities=[bare_model, bare_lookup],
            )
            async with build_worker(client, config=config), bare_worker:
                await spine_run(client, "bench-spine", 3)  # warm both paths up
                await bare_run(client, "bench-bare", 3, service.url, service.api_key)
                spine, bare = [], []
                for _ in range(rounds):
                    spine.append(await spine_run(client, "bench-spine", steps))
                    bare.append(
                        await bare_run(client, "bench-bare", steps, service.url, service.api_key)
                    )
    s, b = statistics.median(spine), statistics.median(bare)
    print(f"steps per run: {steps + 1}, rounds: {rounds}")
    for label, median, samples in (("spine", s, spine), ("bare ", b, bare)):
        rounds_ms = ", ".join(f"{x * 1000:.1f}" for x in samples)
        print(f"{label} step: median {median * 1000:.1f} ms  (rounds: {rounds_ms})")
    print(f"ratio spine/bare: {s / b:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 steps, 2 rounds")
    args = parser.parse_args()
    asyncio.run(main(20 if args.quick else args.steps, 2 if args.quick else args.rounds))
