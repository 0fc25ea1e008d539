"""Each capability end to end through each real provider SDK (openai, anthropic) against the
local wire-format server: parallel tool calls, a sub-agent, reconcile-before-retry, streaming
and usage. (Streaming's own per-provider runs are in test_streaming.py.)"""

from __future__ import annotations

import pytest

from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env
from spine.client.runs import start_run, wait_result
from spine.client.testing import DemoService, child_runs, turn_timings
from spine.contract import AgentRequest, ModelChoice
from tests.fakes.llm_server import FakeLLMServer, FakeToolCall
from tests.test_streaming import _events
from tests.test_worker_process import rows

PROVIDERS = ["openai", "anthropic"]


def _enqueue(llm: FakeLLMServer, provider: str, *args: object, **kwargs: object) -> None:
    enqueue = llm.enqueue_openai if provider == "openai" else llm.enqueue_anthropic
    enqueue(*args, **kwargs)  # type: ignore[arg-type]


def _request(provider: str, goal: str) -> AgentRequest:
    return AgentRequest(
        agent="refund-agent",
        goal=goal,
        user="alice",
        role="support",
        account="acme",
        model=ModelChoice(provider=provider),  # type: ignore[arg-type]
    )


def _providers(llm: FakeLLMServer) -> dict[str, object]:
    return {
        "openai": openai_provider_from_env(llm.env()),
        "anthropic": anthropic_provider_from_env(llm.env()),
    }


def _tool_results(provider: str, body: dict) -> list[tuple[str, str]]:
    """(call id, content) of each tool result the model is sent, in the order it reads them."""
    found = []
    for message in body["messages"]:
        if provider == "openai" and message["role"] == "tool":
            found.append((message["tool_call_id"], message["content"]))
        elif provider == "anthropic" and isinstance(message["content"], list):
            for block in message["content"]:
                if block.get("type") == "tool_result":
                    found.append((block["tool_use_id"], block.get("content", "")))
    return found


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_parallel_calls_come_back_in_the_models_order(
    client, make_worker, task_queue, service: DemoService, worker_config, provider: str
):
    """The model asks for a slow lookup and a fast document fetch in one turn: they run at
    once, the fetch ends first, and the model reads the results in the order it asked."""
    order = "o-1396"
    document = service.post("/v1/documents", {"order_id": order, "text": "Box crushed."})
    service.post("/v1/chaos", {"latency_ms": 800})  # order lookups only; documents are fast
    try:
        async with FakeLLMServer() as llm:
            _enqueue(
                llm,
                provider,
                tool_calls=[
                    FakeToolCall("lookup_order", {"order_id": order}, id="call_lookup"),
                    FakeToolCall(
                        "fetch_document", {"document_id": document["document_id"]}, id="call_doc"
                    ),
                ],
                input_tokens=120,
                output_tokens=30,
            )
            _enqueue(llm, provider, "The box was crushed; nothing refunded yet.", input_tokens=300,
                     output_tokens=12)  # fmt: skip
            async with make_worker(providers=_providers(llm)):
                request = _request(provider, "Check it.")
                handle = await start_run(client, request, task_queue=task_queue)
                result = await wait_result(handle)
            second = llm.requests_to(provider)[1].body
    finally:
        service.post("/v1/chaos", {})
    assert result.status == "completed", result.reason
    assert (result.usage.input_tokens, result.usage.output_tokens) == (420, 42)
    timing = (await turn_timings(handle))[1]
    assert timing.max_concurrent == 2
    ends = {c.tool: c.closed for c in timing.calls}
    assert ends["fetch_document"] < ends["lookup_order"]  # the fetch ended first...
    results = _tool_results(provider, second)
    assert [call_id for call_id, _ in results] == ["call_lookup", "call_doc"]  # ...read second
    assert order in results[0][1] and "Box crushed." in results[1][1]
    events = await _events(worker_config.state_dir, handle.id)
    assert "".join(str(e.data["text"]) for e in events if e.kind == "token") == (
        "The box was crushed; nothing refunded yet."
    )


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_sub_agent_runs_on_the_same_provider(
    client, make_worker, task_queue, service: DemoService, provider: str
):
    """The refund agent hands the case to the inspection agent: the child's two turns go to
    the same provider, its report is filed once, and its tokens are the parent's spend."""
    order = {"openai": "o-1397", "anthropic": "o-1399"}[provider]
    async with FakeLLMServer() as llm:
        task = f"Inspect {order}: the screen is cracked."
        _enqueue(llm, provider, tool_calls=[FakeToolCall("inspect_damage", {"task": task})],
                 input_tokens=100, output_tokens=10)  # fmt: skip
        _enqueue(
            llm,
            provider,
            tool_calls=[
                FakeToolCall(
                    "file_inspection",
                    {"order_id": order, "finding": "cracked screen", "claim_amount": 25},
                )
            ],
            input_tokens=50,
            output_tokens=5,
        )
        _enqueue(llm, provider, "Cracked screen; claimed 25.00.", input_tokens=60, output_tokens=6)
        _enqueue(llm, provider, "Inspected and claimed.", input_tokens=200, output_tokens=8)
        async with make_worker(providers=_providers(llm)):
            handle = await start_run(client, _request(provider, "Broken."), task_queue=task_queue)
            result = await wait_result(handle)
        child_first = llm.requests_to(provider)[1].body
    assert result.status == "completed", result.reason
    [child] = await child_runs(handle)
    child_result = await child.result()
    assert child_result.status == "completed" and child_result.usage.input_tokens == 110
    assert (result.usage.input_tokens, result.usage.output_tokens) == (410, 29)
    assert [e.tool for e in result.side_effects] == ["file_inspection"]
    assert len(await rows(service, "inspections", order)) == 1
    # The child ran with its own instructions and its own tools.
    sent = str(child_first)
    assert "You inspect damaged-goods cases" in sent and task in sent
    tools = [
        t["function"]["name"] if provider == "openai" else t["name"] for t in child_first["tools"]
    ]
    assert sorted(tools) == ["fetch_document", "file_inspection", "lookup_order"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_reconcile_finds_a_credit_whose_answer_was_lost(
    client, make_worker, task_queue, service: DemoService, worker_config, provider: str
):
    """The legacy API commits the store credit and never answers: the retry finds it by the
    call's reference and records it; the model hears of one credit, the service holds one."""
    order = "o-1398"
    async with FakeLLMServer() as llm:
        _enqueue(
            llm,
            provider,
            tool_calls=[FakeToolCall("issue_store_credit", {"order_id": order, "amount": 15})],
        )
        _enqueue(llm, provider, "Gave 15.00 store credit.")
        settings = {**worker_config.settings, "SPINE_LEGACY_TIMEOUT_S": "2"}
        service.post("/v1/chaos", {"commit_then_timeout_rate": 1.0})
        try:
            async with make_worker(providers=_providers(llm), settings=settings):
                request = _request(provider, "Credit.")
                handle = await start_run(client, request, task_queue=task_queue)
                result = await wait_result(handle)
        finally:
            service.post("/v1/chaos", {})
        told = _tool_results(provider, llm.requests_to(provider)[1].body)
    assert result.status == "completed", result.reason
    [effect] = result.side_effects
    credits = service.get(f"/v1/legacy/credits?reference={effect.idempotency_key}")
    assert len(credits) == 1 and effect.output["credit_id"] == credits[0]["credit_id"]
    assert any("had already happened" in p for p in result.path)
    assert credits[0]["credit_id"] in told[0][1]
