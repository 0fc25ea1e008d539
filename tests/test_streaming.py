"""Live streaming: model tokens and step events reach clients as they happen, outside history;
late clients get what they missed, then the live tail; a broken stream is retried as a whole
call and charged once; the CLI and an SSE endpoint serve the same stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

from spine.activities.providers import anthropic_provider_from_env, openai_provider_from_env
from spine.client.runs import decide, get_state, start_run, wait_result
from spine.client.stream_server import create_app
from spine.client.testing import (
    DemoService,
    VaultDev,
    binary,
    free_port,
    script,
    start_scripted_run,
    start_worker_process,
    stop_worker_process,
)
from spine.contract import AgentRequest, ApprovalDecision, ModelChoice
from spine.observability.audit import SQLiteAuditStore
from spine.observability.streams import SQLiteStreamStore, StreamEvent, follow
from tests.fakes.llm_server import FakeLLMServer, FakeToolCall, StreamShape

ANSWER = "The order o-1390 was looked up: 250.00 paid, nothing refunded yet, all refundable."


def _request(provider: str, goal: str = "Look o-1390 up.") -> AgentRequest:
    return AgentRequest(
        agent="refund-agent",
        goal=goal,
        user="alice",
        role="support",
        account="acme",
        model=ModelChoice(provider=provider),  # type: ignore[arg-type]  # openai | anthropic
    )


def _enqueue(llm: FakeLLMServer, provider: str, *args: object, **kwargs: object) -> None:
    enqueue = llm.enqueue_openai if provider == "openai" else llm.enqueue_anthropic
    enqueue(*args, **kwargs)  # type: ignore[arg-type]


def _providers(llm: FakeLLMServer) -> dict[str, object]:
    return {
        "openai": openai_provider_from_env(llm.env()),
        "anthropic": anthropic_provider_from_env(llm.env()),
    }


async def _events(state_dir: Path, run_id: str) -> list[StreamEvent]:
    store = SQLiteStreamStore(state_dir / "streams.db")
    return [e async for e in follow(store, run_id, until=lambda: True, idle_s=0.5)]


def _at(event: StreamEvent) -> datetime:
    return datetime.fromisoformat(event.at)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tokens_stream_and_a_broken_stream_is_charged_once(
    client, make_worker, task_queue, worker_config, provider: str
):
    """Through each provider's SDK streaming API: the first answer breaks off mid-stream and is
    retried as a whole call; the run's usage counts the answer that arrived, once; the
    stream holds both attempts' tokens, the second complete, and the run's steps."""
    async with FakeLLMServer() as llm:
        # Attempt 1 of turn 1 breaks after a few chunks; attempt 2 answers (10 in / 3 out).
        _enqueue(
            llm,
            provider,
            "I will look that order up.",
            tool_calls=[FakeToolCall("lookup_order", {"order_id": "o-1390"})],
            input_tokens=999,
            output_tokens=999,
            stream=StreamShape(chunk_chars=3, break_after=4),
        )
        _enqueue(
            llm,
            provider,
            "I will look that order up.",
            tool_calls=[FakeToolCall("lookup_order", {"order_id": "o-1390"})],
            input_tokens=10,
            output_tokens=3,
        )
        _enqueue(llm, provider, ANSWER, input_tokens=40, output_tokens=20)
        async with make_worker(providers=_providers(llm)):
            handle = await start_run(client, _request(provider), task_queue=task_queue)
            result = await wait_result(handle)
        assert all(r.body.get("stream") for r in llm.requests)
    assert result.status == "completed", result.reason
    assert result.output == ANSWER
    assert (result.usage.input_tokens, result.usage.output_tokens) == (50, 23)
    assert result.retries == 1

    events = await _events(worker_config.state_dir, handle.id)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    started = [e.data for e in events if e.kind == "model_started"]
    assert [(d["step"], d["attempt"]) for d in started] == [(1, 1), (1, 2), (2, 1)]
    tokens = {}
    for e in events:
        if e.kind == "token":
            key = (e.data["step"], e.data["attempt"])
            tokens[key] = tokens.get(key, "") + str(e.data["text"])
    assert tokens[(1, 2)] == "I will look that order up."
    assert "I will look that order up.".startswith(tokens[(1, 1)]) and tokens[(1, 1)]
    assert tokens[(2, 1)] == ANSWER
    steps = [e.data["kind"] for e in events if e.kind == "step"]
    assert steps[0] == "run_started" and "tool_call" in steps
    turns = [e.data["data"] for e in events if e.kind == "step" and e.data["kind"] == "model_turn"]
    assert turns[0]["attempt"] == 2 and turns[0]["input_tokens"] == 10  # attempt 2 only
    # Tokens of a turn come before the turn's own step event: they were live.
    turn_event = next(
        i for i, e in enumerate(events) if e.kind == "step" and e.data["kind"] == "model_turn"
    )
    assert kinds.index("token") < turn_event


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_first_token_arrives_long_before_the_answer_ends(
    client, make_worker, task_queue, worker_config, provider: str
):
    """A slow answer (40 pieces, 50 ms apart): its first token is in the stream within a small
    part of the model call's duration."""
    async with FakeLLMServer() as llm:
        _enqueue(
            llm,
            provider,
            ANSWER,
            input_tokens=30,
            output_tokens=25,
            stream=StreamShape(chunk_chars=2, delay_s=0.05),
        )
        async with make_worker(providers=_providers(llm)):
            handle = await start_run(client, _request(provider), task_queue=task_queue)
            assert (await wait_result(handle)).status == "completed"
    events = await _events(worker_config.state_dir, handle.id)
    [started] = [e for e in events if e.kind == "model_started"]
    tokens = [e for e in events if e.kind == "token"]
    [turn] = [e for e in events if e.kind == "step" and e.data["kind"] == "model_turn"]
    first = (_at(tokens[0]) - _at(started)).total_seconds()
    whole = (_at(tokens[-1]) - _at(started)).total_seconds()
    print(
        f"\n[{provider}] first token {first * 1000:.0f} ms after the call began; the answer "
        f"took {whole * 1000:.0f} ms ({first / whole:.0%}); {len(tokens)} token events"
    )
    assert whole >= 1.0 and first < whole / 4
    assert "".join(str(t.data["text"]) for t in tokens) == ANSWER
    assert _at(tokens[-1]) <= _at(turn)


async def test_streaming_adds_nothing_to_history(client, make_worker, task_queue, worker_config):
    """The same scripted run with streams on and off has the same history, event for event."""
    turns = script().tool("lookup_order", order_id="o-1391").text("Looked it up, all is well.")
    sizes = []
    for streams in (True, False):
        async with make_worker(streams=streams):
            handle = await start_scripted_run(
                client, task_queue, "refund-agent", "look", turns, role="support"
            )
            assert (await wait_result(handle)).status == "completed"
        history = await handle.fetch_history()
        sizes.append(([e.WhichOneof("attributes") for e in history.events], len(history.events)))
        if streams:
            events = await _events(worker_config.state_dir, handle.id)
            tokens = "".join(str(e.data["text"]) for e in events if e.kind == "token")
            assert tokens == "Looked it up, all is well."
    assert sizes[0] == sizes[1]


async def test_a_late_client_gets_what_it_missed_then_the_live_tail(
    client, make_worker, task_queue, worker_config, service: DemoService
):
    """A reader that starts while the run waits for approval sees every earlier event, then
    the rest live; a reader after the end sees the same events."""
    turns = (
        script()
        .tool("lookup_order", order_id="o-1392")
        .tool("issue_refund", order_id="o-1392", amount=150.0)
        .confidence(0.95)
        .text("Refunded 150.00.")
    )
    store = SQLiteStreamStore(worker_config.state_dir / "streams.db")
    async with make_worker():
        handle = await start_scripted_run(
            client, task_queue, "refund-agent", "refund", turns, role="support"
        )

        async def waiting() -> bool:
            return any(
                e.kind == "step" and e.data["data"].get("decision") == "needs_approval"
                for e in await store.read(handle.id)
            )

        await asyncio.wait_for(_poll(waiting), 60)
        live: list[StreamEvent] = []

        async def read_live() -> None:
            async for event in follow(store, handle.id):
                live.append(event)

        reader = asyncio.create_task(read_live())
        await asyncio.sleep(0.5)
        missed = len(live)
        assert missed > 0 and not reader.done()  # caught up, waiting for the tail
        [pending] = (await get_state(handle)).pending_approvals
        await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
            ),
        )
        await asyncio.wait_for(reader, 60)
        assert (await wait_result(handle)).status == "completed"
    assert live[-1].kind == "end" and len(live) > missed
    assert [e.seq for e in live] == sorted(e.seq for e in live)
    after = await _events(worker_config.state_dir, handle.id)
    assert [e.seq for e in after] == [e.seq for e in live]
    # Every audit entry of the run is a step event, in order, once.
    audit = SQLiteAuditStore(worker_config.state_dir / "audit.db")
    try:
        [chain] = [r for r in await audit.run_ids() if r.startswith(f"{handle.id}:")]
        entries = await audit.entries(chain)
    finally:
        await audit.close()
    steps = [e.data["seq"] for e in live if e.kind in ("step", "end")]
    assert steps == [e.seq for e in entries]


async def _poll(check) -> None:  # type: ignore[no-untyped-def]
    for _ in range(10_000):
        if await check():
            return
        await asyncio.sleep(0.05)


async def test_the_sse_endpoint_serves_the_stream_and_resumes_after_last_event_id(
    client, make_worker, task_queue, worker_config
):
    """GET /v1/runs/RUN/events: the whole stream, then (Last-Event-ID) only what follows it;
    with a token, no token is a 401."""
    turns = script().tool("lookup_order", order_id="o-1393").text("Done looking it up.")
    async with make_worker():
        handle = await start_scripted_run(
            client, task_queue, "refund-agent", "look", turns, role="support"
        )
        assert (await wait_result(handle)).status == "completed"
    store = SQLiteStreamStore(worker_config.state_dir / "streams.db")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(store, token="s3cret"), port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            await asyncio.wait_for(_poll(lambda: _healthy(http)), 30)
            url = f"/v1/runs/{handle.id}/events"
            denied = await http.get(url)
            assert denied.status_code == 401
            auth = {"Authorization": "Bearer s3cret"}
            events = await _sse(http, url, auth)
            assert events[-1][1] == "end" and events[0][1] == "step"
            middle = events[len(events) // 2][0]
            rest = await _sse(http, url, {**auth, "Last-Event-ID": str(middle)})
            assert [e[0] for e in rest] == [e[0] for e in events if e[0] > middle]
            bad = await http.get(url, headers={**auth, "Last-Event-ID": "x"})
            assert bad.status_code == 400 and "integer" in bad.json()["error"]
    finally:
        server.should_exit = True
        await serving


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _sse(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> list:
    """(id, event, data) of each event, until the server ends the stream."""
    events, current = [], {}
    async with http.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line.strip():
                if "data" in current:
                    events.append(
                        (int(current["id"]), current["event"], json.loads(current["data"]))
                    )
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value.lstrip()
    return events


@pytest.mark.parametrize("verb", ["run", "status"])
async def test_the_cli_prints_tokens_and_steps_as_they_happen(
    client, vault: VaultDev, service: DemoService, tmp_path, task_queue, verb: str
):
    """`spine run --wait` / `spine status RUN --follow` against a worker process sharing the
    state directory: the answer's tokens and the steps are printed before the result."""
    state = tmp_path / "state"
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": client.namespace,
        "SPINE_TASK_QUEUE": task_queue,
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
        "SPINE_DEMO_URL": service.url,
        "SPINE_STATE_DIR": str(state),
        # The CLI signs as alice (her OpenBao token); the worker verifies it.
        "SPINE_VAULT_TOKEN": vault.tokens["alice"],
        "SPINE_PRINCIPAL": "alice",
    }
    script_file = tmp_path / "script.json"
    script_file.write_text(
        json.dumps(
            [
                t.model_dump(mode="json")
                for t in script()
                .tool("lookup_order", order_id="o-1394")
                .text("Order o-1394 is fully refundable.")
            ]
        )
    )
    worker = await asyncio.to_thread(start_worker_process, env, log_file=tmp_path / "w.log")
    try:
        spine = [binary("spine")]
        run_args = ["run", "refund-agent", "look", "--user", "alice", "--role", "support",
                    "--account", "acme", "--script", str(script_file)]  # fmt: skip
        if verb == "run":
            out = await _spine(spine, [*run_args, "--wait"], env)
        else:
            started = await _spine(spine, run_args, env)
            run_id = started.split()[1]
            out = await _spine(spine, ["status", run_id, "--follow"], env)
    finally:
        await asyncio.to_thread(stop_worker_process, worker)
    print(f"\n$ spine {verb} ...\n{out}")
    lines = out.splitlines()
    answer = next(i for i, line in enumerate(lines) if "Order o-1394 is fully refundable." in line)
    assert "model  step 2" in lines[answer]
    assert any("tool_call" in line and "lookup_order" in line for line in lines[:answer])
    outcome = next(i for i, line in enumerate(lines) if "run_outcome" in line)
    status = next(i for i, line in enumerate(lines) if line.startswith("status    completed"))
    assert answer < outcome < status


async def _spine(spine: list[str], args: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *spine, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, (out.decode(), err.decode())
    return out.decode()
