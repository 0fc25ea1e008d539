"""The baseline: a bare Temporal loop doing the same work as a Spine step, with no guards.

Per step: one activity standing in for the model (returns the next scripted turn) and one
activity doing the same HTTP lookup against the demo service. No validation, transcript store,
policy, secrets or search attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import httpx


@dataclass
class BareInput:
    steps: int
    url: str
    api_key: str


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
        for step in range(inp.steps):
            decision = await workflow.execute_activity(
                bare_model, step, start_to_close_timeout=timedelta(seconds=30)
            )
            await workflow.execute_activity(
                bare_lookup,
                {"url": inp.url, "api_key": inp.api_key, "order_id": str(decision["order_id"])},
                start_to_close_timeout=timedelta(seconds=30),
            )
        return inp.steps
