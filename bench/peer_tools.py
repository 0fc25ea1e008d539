"""The same scripted agent on the two peer integrations, for :mod:`bench.peers`.

* Temporal's OpenAI Agents integration (``temporalio.contrib.openai_agents``, shipped as
  ``temporalio-openai-agents`` with ``openai-agents``): tools are activities
  (``activity_as_tool``), the model runs in the integration's model activity.
* Pydantic AI's Temporal integration (``pydantic_ai.durable_exec.temporal``): the
  ``TemporalDurability`` capability runs model requests and tool calls as activities.

Each gets its own scripted model that plays exactly what Spine's scripted model plays: the
decision for turn N is a function of the prompt and of how many tool results the conversation
holds, so retries and replays agree. The prompt names the script: ``SCRIPT refund o-1234`` (the
10-turn refund conversation of :func:`bench.scripts.refund_script`) or ``SCRIPT docs 100``
(99 ``read_doc`` calls of ~20 KB each, then an answer: the sdk-python#1890 scenario).

Tools call the demo business service over HTTP (``BENCH_DEMO_URL``, ``BENCH_DEMO_KEY``, read on
the worker) with an ``Idempotency-Key`` derived from the workflow and activity ids.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from temporalio import activity

from bench.agents import document
from bench.scripts import refund_script

TOOL_TIMEOUT = timedelta(seconds=15)
INSTRUCTIONS = "You are a support agent. Use the tools, then answer."


@dataclass
class PeerInput:
    prompt: str
    max_turns: int


def decision(prompt: str, tool_results: int) -> tuple[str, dict[str, Any]] | str:
    """The scripted model: (tool, args) for the next call, or the final text."""
    _, kind, arg = prompt.split()[:3]
    turn = tool_results + 1
    if kind == "refund":
        script = refund_script(arg)
        step = script[min(turn, len(script)) - 1]
        if step.tool_calls:
            return step.tool_calls[0].name, dict(step.tool_calls[0].args)
        return step.text or ""
    if kind == "docs":
        if turn < int(arg):
            return "read_doc", {"doc_id": turn}
        return f"Read {turn - 1} documents."
    raise ValueError(f"unknown script {kind!r} in prompt {prompt!r}")


# ---------------------------------------------------------------------------------- tools


async def _call(method: str, path: str, body: dict[str, Any] | None = None) -> str:
    info = activity.info()
    headers = {"Authorization": f"Bearer {os.environ['BENCH_DEMO_KEY']}"}
    if method == "POST":
        headers["Idempotency-Key"] = f"{info.workflow_id}/{info.activity_id}"
    async with httpx.AsyncClient(base_url=os.environ["BENCH_DEMO_URL"], timeout=30) as http:
        response = await http.request(method, path, json=body, headers=headers)
    response.raise_for_status()
    return response.text


async def lookup_order(order_id: str) -> str:
    """Look up an order."""
    return await _call("GET", f"/v1/orders/{order_id}")


async def issue_refund(order_id: str, amount: float, reason: str = "") -> str:
    """Refund part of an order."""
    return await _call(
        "POST", "/v1/refunds", {"order_id": order_id, "amount": amount, "reason": reason}
    )


async def send_email(order_id: str, subject: str, body: str) -> str:
    """Email the customer of an order."""
    order = json.loads(await _call("GET", f"/v1/orders/{order_id}"))
    return await _call(
        "POST",
        "/v1/emails",
        {"order_id": order_id, "to": order["customer_email"], "subject": subject, "body": body},
    )


async def update_ticket(order_id: str, status: str, note: str = "") -> str:
    """Update the support ticket of an order."""
    return await _call(
        "POST", "/v1/tickets", {"order_id": order_id, "status": status, "note": note}
    )


async def read_doc(doc_id: int) -> str:
    """Read a (large) document."""
    return json.dumps({"doc_id": doc_id, "text": document(doc_id)})


PLAIN_TOOLS = (lookup_order, issue_refund, send_email, update_ticket, read_doc)


def _as_activity(fn):
    """The tool as a Temporal activity of its own name, for OpenAI's ``activity_as_tool``.

    A wrapper, so the plain function Pydantic AI registers stays undecorated; defined here,
    outside the workflow module, so the sandbox's re-import does not define it twice.
    """

    @functools.wraps(fn)
    async def tool(*args: Any, **kwargs: Any) -> str:
        return await fn(*args, **kwargs)

    return activity.defn(name=f"peer_oai.{fn.__name__}")(tool)


OAI_ACTIVITIES = [_as_activity(fn) for fn in PLAIN_TOOLS]
