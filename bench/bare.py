"""The baseline: a bare Temporal loop doing the same work as a Spine step, with no guards.

Per step: one activity standing in for the model (returns the next scripted turn) and one
activity doing the same HTTP lookup against the demo service. No validation, transcript store,
policy, audit, secrets store or search attributes.

The lookup runs one of three ways, matching the three ways a Spine tool can run:
``activity`` (on the workflow's own task queue), ``rate_limited`` (on a second task queue whose
workers carry a fleet-wide rate limit, as Spine's rate-limit groups do) or ``local`` (a local
activity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import httpx

Path = Literal["activity", "rate_limited", "local"]


@dataclass
class BareInput:
    steps: int
    url: str
    api_key: str
    path: Path = "activity"
    rate_limited_queue: str = ""
    provider: str = ""
    """``openai`` or ``anthropic``: the model is a real SDK call to `llm_base_url` with the
    whole transcript (carried in the workflow, as a bare integration does); empty: a stand-in."""
    llm_base_url: str = ""


@activity.defn(name="bare.model")
async def bare_model(step: int) -> dict[str, object]:
    return {"tool": "lookup_order", "order_id": f"o-{1100 + step % 50}"}


_http: httpx.AsyncClient | None = None
_sdk: dict[str, object] = {}

LOOKUP_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}},
    "required": ["order_id"],
}


@activity.defn(name="bare.chat")
async def bare_chat(args: dict[str, object]) -> dict[str, object]:
    """One model turn through the provider's SDK (retries off): the transcript goes in, the tool
    call (or the answer) and its raw assistant message come out."""
    provider, base_url = str(args["provider"]), str(args["base_url"])
    messages: list[dict[str, object]] = args["messages"]  # type: ignore[assignment]
    if provider == "openai":
        import openai

        client = _sdk.get(base_url)
        if client is None:
            client = _sdk[base_url] = openai.AsyncOpenAI(
                api_key="sk-bench", base_url=base_url, max_retries=0
            )
        reply = await client.chat.completions.create(  # type: ignore[attr-defined]
            model="gpt-4.1",
            messages=messages,
            max_tokens=1024,
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "lookup_order_open",
                        "description": "Look up an order.",
                        "parameters": LOOKUP_SCHEMA,
                    },
                }
            ],
        )
        message = reply.choices[0].message
        calls = message.tool_calls or []
        assistant = message.model_dump(exclude_none=True)
        if not calls:
            return {"done": True, "assistant": assistant}
        return {
            "done": False,
            "assistant": assistant,
            "call_id": calls[0].id,
            "args": calls[0].function.arguments,
        }
    import anthropic

    client = _sdk.get(base_url)
    if client is None:
        client = _sdk[base_url] = anthropic.AsyncAnthropic(
            api_key="sk-ant-bench", base_url=base_url, max_retries=0
        )
    system = str(messages[0]["content"])
    reply = await client.messages.create(  # type: ignore[attr-defined]
        model="claude-sonnet-4-6",
        system=system,
        messages=messages[1:],
        max_tokens=1024,
        tools=[
            {
                "name": "lookup_order_open",
                "description": "Look up an order.",
                "input_schema": LOOKUP_SCHEMA,
            }
        ],
    )
    content = [block.model_dump(exclude_none=True) for block in reply.content]
    uses = [b for b in reply.content if b.type == "tool_use"]
    assistant = {"role": "assistant", "content": content}
    if not uses:
        return {"done": True, "assistant": assistant}
    return {
        "done": False,
        "assistant": assistant,
        "call_id": uses[0].id,
        "args": json.dumps(uses[0].input),
    }


@activity.defn(name="bare.lookup")
async def bare_lookup(args: dict[str, str]) -> dict[str, object]:
    global _http
    if _http is None:
        _http = httpx.AsyncClient(timeout=30)
    response = await _http.get(
        f"{args['url']}/v1/orders/{args['order_id']}",
        headers={"Authorization": f"Bearer {args['api_key']}"},
    )
    response.raise_for_status()
    return response.json()


@workflow.defn(name="BareLoop")
class BareLoop:
    @workflow.run
    async def run(self, inp: BareInput) -> int:
        if inp.provider:
            return await self.chat_loop(inp)
        timeout = timedelta(seconds=30)
        for step in range(inp.steps):
            decision = await workflow.execute_activity(
                bare_model, step, start_to_close_timeout=timeout
            )
            args = {"url": inp.url, "api_key": inp.api_key, "order_id": str(decision["order_id"])}
            if inp.path == "local":
                await workflow.execute_local_activity(
                    bare_lookup, args, start_to_close_timeout=timeout
                )
            else:
                await workflow.execute_activity(
                    bare_lookup,
                    args,
                    start_to_close_timeout=timeout,
                    task_queue=inp.rate_limited_queue if inp.path == "rate_limited" else None,
                )
        return inp.steps

    async def chat_loop(self, inp: BareInput) -> int:
        """The same loop with a real provider: the transcript grows in the workflow and every
        model call sends all of it."""
        timeout = timedelta(seconds=30)
        messages: list[dict[str, object]] = [
            {"role": "system", "content": "Benchmark agent: read what you are asked to read."},
            {"role": "user", "content": "Look the orders up."},
        ]
        steps = 0
        while True:
            steps += 1
            turn = await workflow.execute_activity(
                bare_chat,
                {"provider": inp.provider, "base_url": inp.llm_base_url, "messages": messages},
                start_to_close_timeout=timeout,
            )
            messages.append(turn["assistant"])
            if turn["done"]:
                return steps
            order = json.loads(str(turn["args"]))["order_id"]
            found = await workflow.execute_activity(
                bare_lookup,
                {"url": inp.url, "api_key": inp.api_key, "order_id": order},
                start_to_close_timeout=timeout,
            )
            result = json.dumps(found, sort_keys=True)
            if inp.provider == "openai":
                messages.append(
                    {"role": "tool", "tool_call_id": turn["call_id"], "content": result}
                )
            else:
                messages.append(
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": turn["call_id"],
                                "content": result,
                            }
                        ],
                    }
                )
