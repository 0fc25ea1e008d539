"""The baselines of the compound-failure benchmark: a plain in-process agent loop.

Same scripted decisions, same HTTP calls to the demo business service, same injected model
failure rate as Spine, but no Temporal: the loop holds its state in memory. With ``tries=1`` it
is the naive loop (any failure ends the run); with ``tries=3`` it retries each call in place,
reusing the call's Idempotency-Key, so its own retries never duplicate anything. What it cannot
do is survive its process: a restart begins again from turn 1 with new keys.

Run as a process (what the benchmark SIGKILLs)::

    python -m bench.naive_agent --url URL --key KEY --order o-1001 --tries 3

It prints ``turn N`` as each model turn starts and ``RESULT {json}`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from collections.abc import Callable

import httpx

from bench.scripts import refund_script
from spine.contract import ScriptToolCall, ScriptTurn


class Transient(Exception):
    """A failure a retry may fix (injected model fault, 5xx, network)."""


class Fatal(Exception):
    """A failure no retry fixes (4xx)."""


def scripted_model(script: list[ScriptTurn], fail_rate: float, rng: random.Random):
    def answer(turn_index: int) -> ScriptTurn:
        if rng.random() < fail_rate:
            raise Transient(f"scripted model: injected transient failure at turn {turn_index}")
        return script[turn_index - 1]

    return answer


async def _request(
    http: httpx.AsyncClient, method: str, path: str, key: str | None, body: dict | None
) -> dict:
    headers = {"Idempotency-Key": key} if key else {}
    try:
        response = await http.request(method, path, json=body, headers=headers)
    except httpx.HTTPError as err:
        raise Transient(f"{method} {path}: {err!r}") from err
    if response.status_code >= 500 or response.status_code == 429:
        raise Transient(f"{method} {path}: {response.status_code}")
    if response.status_code >= 400:
        raise Fatal(f"{method} {path}: {response.status_code} {response.text[:200]}")
    return response.json()


async def run_tool(
    http: httpx.AsyncClient, call: ScriptToolCall, retry: Callable
) -> dict[str, object]:
    """One tool call, as the demo's tools make it; side effects get one key for all tries."""
    args = call.args
    key = str(uuid.uuid4())  # one per call; a restarted process draws new ones
    order = args["order_id"]
    if call.name == "lookup_order":
        return await retry(lambda: _request(http, "GET", f"/v1/orders/{order}", None, None))
    if call.name == "issue_refund":
        return await retry(lambda: _request(http, "POST", "/v1/refunds", key, dict(args)))
    if call.name == "update_ticket":
        return await retry(lambda: _request(http, "POST", "/v1/tickets", key, dict(args)))
    if call.name == "send_email":
        found = await retry(lambda: _request(http, "GET", f"/v1/orders/{order}", None, None))
        body = {
            "order_id": order,
            "to": found["customer_email"],
            "subject": args["subject"],
            "body": args["body"],
        }
        return await retry(lambda: _request(http, "POST", "/v1/emails", key, body))
    raise Fatal(f"unknown tool {call.name!r}")


def retrier(tries: int, backoff_s: float):
    async def retry(fn):
        for attempt in range(1, tries + 1):
            try:
                return await fn()
            except Transient:
                if attempt == tries:
                    raise
                await asyncio.sleep(backoff_s * 2 ** (attempt - 1))

    return retry


async def run_agent(
    url: str,
    api_key: str,
    order: str,
    *,
    tries: int,
    model_fail_rate: float,
    rng: random.Random,
    backoff_s: float = 0.5,
    on_turn: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """Play the refund script; returns status, turns reached and what failed."""
    script = refund_script(order)
    model = scripted_model(script, model_fail_rate, rng)
    retry = retrier(tries, backoff_s)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        for index in range(1, len(script) + 1):
            if on_turn:
                on_turn(index)
            try:
                decision = await retry(lambda i=index: _async(model, i))
                for tool_call in decision.tool_calls:
                    await run_tool(http, tool_call, retry)
            except (Transient, Fatal) as err:
                return {"status": "failed", "turn": index, "error": str(err)}
            if not decision.tool_calls:
                return {"status": "completed", "turn": index, "output": decision.text}
    return {"status": "failed", "turn": len(script), "error": "script ended without an answer"}


async def _async(fn: Callable[[int], ScriptTurn], index: int) -> ScriptTurn:
    return fn(index)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--order", required=True)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--model-fail-rate", type=float, default=0.15)
    p.add_argument("--backoff", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()

    def on_turn(index: int) -> None:
        print(f"turn {index}", flush=True)

    print("ready", flush=True)
    result = asyncio.run(
        run_agent(
            args.url,
            args.key,
            args.order,
            tries=args.tries,
            model_fail_rate=args.model_fail_rate,
            rng=random.Random(args.seed),
            backoff_s=args.backoff,
            on_turn=on_turn,
        )
    )
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
