"""CPU per model call on the OpenAI path: Spine's provider against the SDK's typed call.

Both send the same transcript and tools to the local wire-format server through the same
`openai` client: Spine's `OpenAIProvider` puts the body it built in ``extra_body`` (see
`spine.activities.providers.openai.wire_body`); the typed call (what Spine did before, and what
the bare loop in `bench.overhead` does) passes them as arguments, which the SDK walks through its
request transform. Transcripts of 10, 40 and 160 tool turns; the CPU is the calling thread's
(the server answers on threads of its own), medians over rounds that alternate the order.

    python -m bench.provider_cpu [--quick] [--calls 40] [--rounds 5] [--out F]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

import openai

from bench.common import parser, write_results
from spine.activities.providers.openai import (
    OpenAIProvider,
    to_openai_messages,
    to_openai_tools,
)
from spine.payloads import ChatMessage, ProviderRequest, ToolCall, ToolSchema
from tests.fakes.llm_server import FAKE_OPENAI_KEY, FakeLLMServer, FakeToolCall

LOOKUP = ToolSchema(
    name="lookup_order",
    description="Look up an order: its total and what can still be refunded.",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^o-[0-9]+$"}},
        "required": ["order_id"],
    },
)


def transcript(turns: int) -> list[ChatMessage]:
    """A system prompt, a goal and `turns` tool calls with their results."""
    messages = [
        ChatMessage(role="system", content="You are a support agent. Use the tools."),
        ChatMessage(role="user", content="Check the customer's recent orders."),
    ]
    for i in range(turns):
        order = f"o-{1100 + i}"
        call = ToolCall(id=f"call_{i}", name="lookup_order", args={"order_id": order})
        result = {"order_id": order, "status": "shipped", "total": "25.00", "refundable": "25.00"}
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        messages.append(ChatMessage(role="tool", tool_call_id=call.id, content=json.dumps(result)))
    return messages


async def cpu_per_call(call: Callable[[], Awaitable[object]], calls: int) -> float:
    """Milliseconds of this thread's CPU per call."""
    started = time.thread_time()
    for _ in range(calls):
        await call()
    return (time.thread_time() - started) * 1000 / calls


async def arms(
    llm: FakeLLMServer,
    client: openai.AsyncOpenAI,
    request: ProviderRequest,
    calls: int,
    rounds: int,
) -> dict[str, list[float]]:
    """CPU per call of each arm, per round, for one transcript."""
    provider = OpenAIProvider(client)
    answer = [FakeToolCall("lookup_order", {"order_id": "o-1"})]

    async def spine() -> object:
        llm.enqueue_openai(tool_calls=answer)
        return await provider.complete(request)

    async def typed() -> object:
        llm.enqueue_openai(tool_calls=answer)
        return await client.chat.completions.create(
            model=request.model,
            messages=to_openai_messages(request.messages),
            tools=to_openai_tools(request.tools),
            max_completion_tokens=request.max_tokens,
        )

    calls_by_arm = {"spine": spine, "typed": typed}
    for call in calls_by_arm.values():  # warm up: connections, the SDK's caches
        await cpu_per_call(call, 3)
    measured: dict[str, list[float]] = {name: [] for name in calls_by_arm}
    for r in range(rounds):
        for name in ("spine", "typed") if r % 2 == 0 else ("typed", "spine"):
            measured[name].append(await cpu_per_call(calls_by_arm[name], calls))
    return measured


async def measure(turns_list: list[int], calls: int, rounds: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with FakeLLMServer() as llm:
        client = openai.AsyncOpenAI(
            api_key=FAKE_OPENAI_KEY, base_url=llm.base_url_openai, max_retries=0
        )
        for turns in turns_list:
            request = ProviderRequest(model="gpt-4.1", messages=transcript(turns), tools=[LOOKUP])
            measured = await arms(llm, client, request, calls, rounds)
            spine_ms, typed_ms = (statistics.median(measured[n]) for n in ("spine", "typed"))
            rows.append(
                {
                    "turns": turns,
                    "messages": len(request.messages),
                    "spine_ms": round(spine_ms, 2),
                    "typed_ms": round(typed_ms, 2),
                    "ratio": round(spine_ms / typed_ms, 3),
                    "rounds": {n: [round(x, 2) for x in v] for n, v in measured.items()},
                }
            )
            print(
                f"{len(request.messages):4d} messages: Spine {spine_ms:6.2f} ms, SDK typed call "
                f"{typed_ms:6.2f} ms of CPU per call, ratio {spine_ms / typed_ms:.2f}",
                flush=True,
            )
        await client.close()
    return rows


def main() -> None:
    p = parser(__doc__, "10 and 40 turns, 10 calls, 3 rounds")
    p.add_argument("--calls", type=int, default=None, help="calls per arm per round")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    turns = [10, 40] if args.quick else [10, 40, 160]
    calls = args.calls or (10 if args.quick else 40)
    rounds = args.rounds or (3 if args.quick else 5)
    rows = asyncio.run(measure(turns, calls, rounds))
    write_results(args.out, "provider_cpu", {"calls": calls, "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
