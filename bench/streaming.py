"""Live streaming: how soon a client sees a model's first token, against the call's duration.

Runs of the refund agent answer through each provider's SDK (openai, anthropic) from the local
wire-format server, which streams each answer in small pieces ``--piece-ms`` apart. A reader
follows each run's stream in the store, as ``spine run --wait`` does, and notes when the first
token and the last reach it; the call's start is its ``model_started`` event. Prints medians per
provider and the first token's share of the call.

    python -m bench.streaming [--quick] [--runs 10] [--piece-ms 40] [--out F]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from bench.common import bench_stack, parser, write_results
from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env
from spine.client.runs import start_run
from spine.contract import AgentRequest, ModelChoice
from spine.guardrails.secrets import VaultSecrets
from spine.observability.streams import SQLiteStreamStore, follow
from spine.plugin import SpineConfig, build_worker
from tests.fakes.llm_server import FakeLLMServer, StreamShape

ANSWER = (
    "Order o-1001 was delivered on the 3rd; the customer reports a cracked screen, so a full "
    "refund of 250.00 is due under the policy, and the ticket can be resolved after that."
)


async def _run(client, queue: str, store, provider: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    request = AgentRequest(
        agent="refund-agent",
        goal="Summarise o-1001.",
        user="bench",
        role="support",
        account="acme",
        model=ModelChoice(provider=provider),  # type: ignore[arg-type]
    )
    handle = await start_run(client, request, task_queue=queue)
    started = first = last = None
    seen_first = seen_last = 0.0
    async for event in follow(store, handle.id):
        if event.kind == "model_started":
            started = datetime.fromisoformat(event.at)
        elif event.kind == "token":
            last = datetime.fromisoformat(event.at)
            seen_last = time.time()
            if first is None:
                first, seen_first = last, time.time()
    result = await handle.result()
    if result.status != "completed" or started is None or first is None or last is None:
        raise RuntimeError(f"run {handle.id} ended {result.status}: {result.reason}")
    begin = started.timestamp()
    return {
        "first_token_s": first.timestamp() - begin,
        "answer_s": last.timestamp() - begin,
        "first_token_seen_s": seen_first - begin,
        "answer_seen_s": seen_last - begin,
    }


async def main() -> None:
    p = parser(__doc__, "3 runs per provider")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--piece-ms", type=int, default=40, help="time between streamed pieces")
    args = p.parse_args()
    runs = 3 if args.quick else args.runs
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spine-bench-streaming-") as tmp_name:
        tmp = Path(tmp_name)
        async with bench_stack(tmp) as stack, FakeLLMServer() as llm:
            client = stack.server.client
            config = SpineConfig(
                task_queue=f"bench-streaming-{uuid.uuid4().hex[:6]}",
                state_dir=tmp / "state",
                settings={"SPINE_DEMO_URL": stack.service.url},
                secrets=VaultSecrets(stack.vault.url, token=stack.vault.token),
                providers={
                    "openai": openai_provider_from_env(llm.env()),
                    "anthropic": anthropic_provider_from_env(llm.env()),
                },
            )
            store = SQLiteStreamStore(config.state_dir / "streams.db")
            shape = StreamShape(chunk_chars=4, delay_s=args.piece_ms / 1000)
            async with build_worker(client, config=config) as worker:
                for provider in ("openai", "anthropic"):
                    samples = []
                    for _ in range(runs):
                        enqueue = (
                            llm.enqueue_openai if provider == "openai" else llm.enqueue_anthropic
                        )
                        enqueue(ANSWER, input_tokens=400, output_tokens=45, stream=shape)
                        samples.append(await _run(client, worker.task_queue, store, provider))
                    results[provider] = {
                        key: round(statistics.median(s[key] for s in samples), 3)
                        for key in samples[0]
                    }
    print(f"\nstreamed answers ({len(ANSWER)} characters in pieces {args.piece_ms} ms apart), "
          f"median of {runs} runs; times from the model call's start")  # fmt: skip
    print(f"{'provider':>9}  {'first token':>11}  {'answer done':>11}  {'share':>6}  "
          f"{'seen by a reader: first / done':>31}")  # fmt: skip
    for provider, r in results.items():
        share = r["first_token_s"] / r["answer_s"]
        seen = f"{r['first_token_seen_s']:.3f}s / {r['answer_seen_s']:.3f}s"
        print(f"{provider:>9}  {r['first_token_s']:>10.3f}s  {r['answer_s']:>10.3f}s  "
              f"{share:>6.1%}  {seen:>31}")  # fmt: skip
    write_results(
        args.out,
        "streaming",
        {
            "runs": runs,
            "piece_ms": args.piece_ms,
            "answer_chars": len(ANSWER),
            "providers": results,
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
