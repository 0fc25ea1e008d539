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


@activity.defn(name="bare.model")
async def bare_model(step: int) -> dict[str, object]:
    return {"tool": "lookup_order", "order_id": f"o-{1100 + step % 50}"}


_http: httpx.AsyncClient | None = None


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
