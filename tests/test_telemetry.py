"""Tracing and metrics on the real dev server: GenAI spans, replay safety, `trace` and `slo`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, Interceptor, OutboundInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from spine.client.runs import RunHandle, decide, get_state, start_run, wait_result
from spine.client.slo_cli import collect_runs, slo
from spine.client.testing import free_port
from spine.client.trace_cli import load_spans, trace
from spine.contract import ApprovalDecision, ScriptTurn
from spine.guardrails.policy import load_policy
from spine.observability.propagation import HEADER
from spine.observability.telemetry import CONTENT_ATTRIBUTES, Telemetry, telemetry_from_env
from spine.plugin import PASSTHROUGH_MODULES, SpineConfig, build_worker
from spine.workflows.agent import AgentWorkflow
from tests.helpers import (
    approve_first_pending,
    call,
    eventually,
    policy_file,
    scripted_request,
    turn,
    wait_for_status,
)

Span = dict[str, object]


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return tmp_path / "traces.jsonl"


@pytest.fixture
def telemetry(trace_file: Path) -> Iterator[Telemetry]:
    t = telemetry_from_env({"SPINE_TRACE_FILE": str(trace_file)})
    yield t
    t.shutdown()


@asynccontextmanager
async def traced_worker(
    client: Client, config: SpineConfig, telemetry: Telemetry
) -> AsyncIterator[Worker]:
    """A worker built through `build_worker`, with the telemetry plugin added."""
    plugins = telemetry.worker_plugins(load_policy(config.policy_path).price_table())
    built = build_worker(client, config=config, plugins=plugins)
    async with built:
        yield built


def spans_of(trace_file: Path, telemetry: Telemetry, run: str) -> list[Span]:
    """Every span of `run`'s trace written so far."""
    assert telemetry.force_flush()
    spans = load_spans(trace_file) if trace_file.exists() else []
    trace_ids = {s["trace_id"] for s in spans if s["attributes"].get("spine.run.id") == run}
    return [s for s in spans if s["trace_id"] in trace_ids]


def by_operation(spans: list[Span], operation: str) -> list[Span]:
    return [s for s in spans if s["attributes"].get("gen_ai.operation.name") == operation]


def per_step(spans: list[Span]) -> Counter[tuple[str, int, str]]:
    """How many spans there are of each (kind, step, tool or model)."""
    counts: Counter[tuple[str, int, str]] = Counter()
    for s in spans:
        a = s["attributes"]
        if "spine.step" in a:
            kind = str(s["name"]).split()[0]
            counts[(kind, a["spine.step"], a.get("gen_ai.tool.name") or "scripted")] += 1
    return counts


def three_step_script(order: str) -> list[ScriptTurn]:
    return [
        turn(call("lookup_order", order_id=order)),
        turn(call("issue_refund", order_id=order, amount=40.0, reason="late"), confidence=0.95),
        turn(text="Refunded 40.00."),
    ]


async def run_to_end(client: Client, script: list[ScriptTurn], task_queue: str) -> RunHandle:
    handle = await start_run(client, scripted_request(script), task_queue=task_queue)
    result = await wait_result(handle)
    assert result.status in ("completed", "failed"), result.reason
    return handle


async def test_run_has_one_root_span_and_genai_children(
    client, worker_config, task_queue, telemetry, trace_file
):
    """A 3-step run is one trace: invoke_agent, a chat span per step, an execute_tool per call."""
    async with traced_worker(client, worker_config, telemetry):
        handle = await run_to_end(client, three_step_script("o-1211"), task_queue)
    result = await wait_result(handle)
    spans = spans_of(trace_file, telemetry, handle.id)
    [root] = [s for s in spans if s["parent_id"] is None]
    assert root["name"] == "invoke_agent refund-agent"
    attrs = root["attributes"]
    assert attrs["gen_ai.operation.name"] == "invoke_agent"
    assert attrs["gen_ai.agent.name"] == "refund-agent"
    assert attrs["spine.run.status"] == "completed" and attrs["spine.steps"] == 3
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (300, 60)
    assert attrs["gen_ai.usage.cost.amount"] == pytest.approx(result.usage.usd)
    assert attrs["gen_ai.usage.cost.currency"] == "USD"
    assert {s["parent_id"] for s in spans if s is not root} == {root["span_id"]}
    assert len({s["trace_id"] for s in spans}) == 1

    chats = by_operation(spans, "chat")
    assert [c["attributes"]["spine.step"] for c in chats] == [1, 2, 3]
    for chat in chats:
        a = chat["attributes"]
        assert chat["name"] == "chat scripted"
        assert a["gen_ai.provider.name"] == "scripted"
        assert a["gen_ai.request.model"] == "scripted"
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (100, 20)
        assert a["gen_ai.usage.cost.amount"] == pytest.approx((100 * 1.0 + 20 * 4.0) / 1e6)
        assert a["gen_ai.usage.cost.currency"] == "USD"
        assert a["spine.retry.attempt"] == 1
    tools = by_operation(spans, "execute_tool")
    assert [(t["name"], t["attributes"]["spine.step"]) for t in tools] == [
        ("execute_tool lookup_order", 1),
        ("execute_tool issue_refund", 2),
    ]
    assert [t["attributes"]["gen_ai.tool.call.id"] for t in tools] == ["call_1_0", "call_2_0"]
    assert {t["attributes"]["spine.policy.decision"] for t in tools} == {"allow"}
    assert len(spans) == 1 + 3 + 2
    assert not any(CONTENT_ATTRIBUTES & s["attributes"].keys() for s in spans)


async def test_content_is_recorded_only_when_asked(client, worker_config, task_queue, trace_file):
    """With SPINE_TRACE_CONTENT=1 spans carry the goal, messages, tool arguments and results."""
    env = {"SPINE_TRACE_FILE": str(trace_file), "SPINE_TRACE_CONTENT": "1"}
    telemetry = telemetry_from_env(env)
    try:
        script = [turn(call("lookup_order", order_id="o-1212")), turn(text="It is o-1212.")]
        request = scripted_request(script, goal="Where is o-1212?")
        async with traced_worker(client, worker_config, telemetry):
            handle = await start_run(client, request, task_queue=task_queue)
            await wait_result(handle)
        spans = spans_of(trace_file, telemetry, handle.id)
    finally:
        telemetry.shutdown()
    [root] = by_operation(spans, "invoke_agent")
    assert "Where is o-1212?" in root["attributes"]["gen_ai.input.messages"]
    assert "It is o-1212." in root["attributes"]["gen_ai.output.messages"]
    first_chat = by_operation(spans, "chat")[0]["attributes"]
    assert "Where is o-1212?" in first_chat["gen_ai.input.messages"]
    assert "lookup_order" in first_chat["gen_ai.output.messages"]
    [tool] = by_operation(spans, "execute_tool")
    assert json.loads(tool["attributes"]["gen_ai.tool.call.arguments"]) == {"order_id": "o-1212"}
    assert json.loads(tool["attributes"]["gen_ai.tool.call.result"])["order_id"] == "o-1212"


def ten_step_script(order: str) -> list[ScriptTurn]:
    """Ten model turns, nine tool calls; the refund at step 5 waits for approval."""
    return [
        turn(call("lookup_order", order_id=order)),
        turn(call("lookup_order", order_id=order)),
        turn(call("update_ticket", order_id=order, status="pending", note="checking")),
        turn(call("lookup_order", order_id=order)),
        turn(call("issue_refund", order_id=order, amount=180.0, reason="broken"), confidence=0.9),
        turn(call("send_email", order_id=order, subject="Refund", body="Refunded 180.00.")),
        turn(call("update_ticket", order_id=order, status="resolved")),
        turn(call("lookup_order", order_id=order)),
        turn(call("lookup_order", order_id=order)),
        turn(text="Refunded and told the customer."),
    ]


def expected_spans(script: list[ScriptTurn], up_to_step: int) -> Counter[tuple[str, int, str]]:
    """One chat per step and one execute_tool per call, for steps 1..up_to_step."""
    expected: Counter[tuple[str, int, str]] = Counter()
    for step, t in enumerate(script[:up_to_step], start=1):
        expected[("chat", step, "scripted")] = 1
        for c in t.tool_calls:
            expected[("execute_tool", step, c.name)] += 1
    return expected


async def test_worker_restart_does_not_duplicate_spans(
    client, worker_config, task_queue, telemetry, trace_file
):
    """A 10-step run that outlives its worker while awaiting approval has one span per step."""
    script = ten_step_script("o-1213")
    async with traced_worker(client, worker_config, telemetry):
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
    before = spans_of(trace_file, telemetry, handle.id)
    waiting = expected_spans(script, 5)
    del waiting[("execute_tool", 5, "issue_refund")]
    assert per_step(before) == waiting and len(before) == 9
    assert not by_operation(before, "invoke_agent")  # written when the run closes

    async with traced_worker(client, worker_config, telemetry):  # a fresh worker replays the run
        [pending] = state.pending_approvals
        approve = ApprovalDecision(
            approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
        )
        await decide(handle, approve)
        result = await wait_result(handle)
        # A query on the closed run replays its whole history once more.
        assert (await get_state(handle)).status == "completed"
    assert result.status == "completed", result.reason
    after = spans_of(trace_file, telemetry, handle.id)
    assert per_step(after) == expected_spans(script, 10) + Counter(
        {("approval", 5, "issue_refund"): 1}
    )
    [root] = [s for s in after if s["parent_id"] is None]
    assert root["attributes"]["gen_ai.operation.name"] == "invoke_agent"
    assert {s["parent_id"] for s in after if s is not root} == {root["span_id"]}
    assert len(after) == 1 + 10 + 9 + 1
    [approval] = [s for s in after if s["name"] == "approval issue_refund"]
    assert approval["attributes"]["spine.policy.decision"] == "approve"
    refund = [s for s in after if s["name"] == "execute_tool issue_refund"]
    assert [s["attributes"]["spine.policy.decision"] for s in refund] == ["approve"]


async def test_continue_as_new_keeps_one_root_span(
    client, worker_config, task_queue, telemetry, trace_file, tmp_path
):
    """Each continued run nests under the previous one, so the whole run has a single root."""
    script = [turn(call("lookup_order", order_id=f"o-{1210 + i}")) for i in range(15)]
    script.append(turn(text="Looked them all up."))
    policy = policy_file(tmp_path, runtime={"continue_as_new_after_events": 100})
    config = dataclasses.replace(worker_config, policy_path=policy)
    async with traced_worker(client, config, telemetry):
        handle = await run_to_end(client, script, task_queue)
    spans = spans_of(trace_file, telemetry, handle.id)
    segments = sorted(by_operation(spans, "invoke_agent"), key=lambda s: s["start_ns"])
    assert len(segments) >= 2, "the run should have continued as new"
    assert [s["parent_id"] for s in segments] == [None] + [s["span_id"] for s in segments[:-1]]
    assert all(s["attributes"].get("spine.continued_as_new") for s in segments[:-1])
    assert segments[-1]["attributes"]["spine.run.status"] == "completed"
    assert per_step(spans) == expected_spans(script, 16)
    ids = {s["span_id"] for s in segments}
    assert all(s["parent_id"] in ids for s in spans if s not in segments)


async def test_replaying_a_history_emits_no_spans(
    client, worker_config, task_queue, telemetry, trace_file
):
    """Replaying a finished run's history with the plugin writes no span."""
    async with traced_worker(client, worker_config, telemetry):
        handle = await run_to_end(client, three_step_script("o-1214"), task_queue)
    written = len(spans_of(trace_file, telemetry, handle.id))
    replayer = Replayer(
        workflows=[AgentWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
        ),
        plugins=telemetry.worker_plugins(),
    )
    await replayer.replay_workflow(await handle.fetch_history())
    assert len(spans_of(trace_file, telemetry, handle.id)) == written == 6


async def test_trace_command_renders_the_tree(
    client, worker_config, task_queue, telemetry, trace_file
):
    """`spine trace RUN` shows the span tree with durations, tokens, cost and totals."""
    async with traced_worker(client, worker_config, telemetry):
        handle = await run_to_end(client, three_step_script("o-1215"), task_queue)
    spans_of(trace_file, telemetry, handle.id)  # flushed
    runner = CliRunner()
    shown = runner.invoke(trace, [handle.id, "--file", str(trace_file)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[2].startswith("invoke_agent refund-agent")
    assert "300/60" in lines[2] and "$0.000540" in lines[2] and "completed" in lines[2]
    assert [line.split("  ")[0].rstrip() for line in lines[3:8]] == [
        "├── chat scripted",
        "├── execute_tool lookup_order",
        "├── chat scripted",
        "├── execute_tool issue_refund",
        "└── chat scripted",
    ]
    assert "100/20" in lines[3] and "$0.000180" in lines[3] and "step 1" in lines[3]
    assert "3 model calls (300 in / 60 out tokens, $0.000540), 2 tool calls" in shown.output
    as_json = json.loads(
        runner.invoke(trace, [handle.id, "--file", str(trace_file), "--json"]).output
    )
    assert as_json["totals"]["model_calls"] == 3 and len(as_json["spans"][0]["children"]) == 5
    missing = runner.invoke(trace, ["no-such-run", "--file", str(trace_file)])
    assert missing.exit_code == 1 and "no spans for run 'no-such-run'" in missing.output


async def test_slo_reports_success_rate_from_visibility(client, worker_config, task_queue):
    """`spine slo` computes success, per-step, latency, cost and budget over the runs started."""
    started = datetime.now(UTC) - timedelta(seconds=5)
    failing = [ScriptTurn(error="terminal")]
    async with build_worker(client, config=worker_config):
        for script in (three_step_script("o-1216"), three_step_script("o-1217"), failing):
            await run_to_end(client, script, task_queue)

    async def all_closed() -> bool:
        runs = await collect_runs(client, since=started, task_queue=task_queue)
        return len([r for r in runs if r.closed]) == 3

    await eventually(all_closed, what="three closed runs in visibility")
    env = {
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": client.namespace,
        "TEMPORAL_CONFIG_FILE": "/nonexistent/temporal.toml",
        "TEMPORAL_PROFILE": None,
    }
    args = ["--since", "10m", "--task-queue", task_queue, "--target", "0.5"]
    invoke = functools.partial(CliRunner().invoke, slo, env=env, catch_exceptions=False)
    report = json.loads((await asyncio.to_thread(invoke, [*args, "--json"])).output)
    assert (report["closed"], report["completed"], report["open"]) == (3, 2, 0)
    assert report["outcomes"] == {"completed": 2, "failed": 1}
    assert report["success_rate"] == pytest.approx(2 / 3)
    assert report["per_step"]["steps"] == 7 and report["per_step"]["failed_steps"] == 1
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"] < 60
    assert report["cost_per_success_usd"] == pytest.approx(2 * 0.00054 / 2)
    assert report["budget_allowed_failures"] == pytest.approx(1.5)
    assert report["budget_remaining"] == pytest.approx(1 / 3)
    text = (await asyncio.to_thread(invoke, args)).output
    assert "success     66.67%  (2 of 3 closed runs completed)" in text
    assert "33.33% left" in text


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An in-process OTLP/HTTP trace receiver; yields its base URL and what it received."""
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            received.append(request)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_spans_go_to_otlp_when_an_endpoint_is_set(
    client, worker_config, task_queue, tmp_path
):
    """With OTEL_EXPORTER_OTLP_ENDPOINT spans go out over OTLP/HTTP and no file is written."""
    with otlp_receiver() as (url, received):
        telemetry = telemetry_from_env(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "SPINE_STATE_DIR": str(tmp_path)}
        )
        try:
            assert telemetry.trace_file is None and telemetry.otlp_endpoint == f"{url}/v1/traces"
            script = [turn(call("lookup_order", order_id="o-1218")), turn(text="Found it.")]
            async with traced_worker(client, worker_config, telemetry):
                handle = await run_to_end(client, script, task_queue)
            assert telemetry.force_flush()
        finally:
            telemetry.shutdown()
    spans = [
        span
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        if any(
            a.key == "spine.run.id" and a.value.string_value == handle.id for a in span.attributes
        )
    ]
    assert sorted(s.name for s in spans) == [
        "chat scripted",
        "chat scripted",
        "execute_tool lookup_order",
        "invoke_agent refund-agent",
    ]
    assert not (tmp_path / "traces.jsonl").exists()


async def test_prometheus_metrics_from_the_worker(client, worker_config, task_queue, tmp_path):
    """With SPINE_METRICS_ADDR the worker serves Temporal's and Spine's metrics for Prometheus."""
    port = free_port()
    telemetry = telemetry_from_env(
        {"SPINE_METRICS_ADDR": f"127.0.0.1:{port}", "OTEL_SDK_DISABLED": "true"}
    )
    metrics_client = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        runtime=telemetry.runtime,
        data_converter=pydantic_data_converter,
        interceptors=client.config()["interceptors"],  # signs as the session's client does
    )
    script = [
        turn(call("lookup_order", order_id="o-1219")),
        turn(call("issue_refund", order_id="o-1219", amount=30.0), confidence=0.95),
        turn(text="Refunded."),
    ]
    async with traced_worker(metrics_client, worker_config, telemetry):
        await run_to_end(metrics_client, script, task_queue)

        def lines(name: str) -> list[str]:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return [
                line
                for line in text.splitlines()
                # tool calls run on the group's rate-limited queue, named after this one
                if line.startswith(name) and f'task_queue="{task_queue}' in line
            ]

        async def scraped() -> bool:
            return bool(lines("spine_runs{"))

        await eventually(scraped, what="spine_runs on the Prometheus endpoint")
        [runs] = lines("spine_runs{")
        assert 'agent="refund-agent"' in runs and 'status="completed"' in runs
        assert runs.endswith(" 1")
        tokens = {line for line in lines("spine_model_tokens{") if 'type="input"' in line}
        assert [line.rsplit(" ", 1)[1] for line in tokens] == ["300"]
        assert len(lines("spine_tool_calls{")) == 2  # lookup_order and issue_refund, outcome ok
        assert lines("spine_run_cost_usd_sum{")
        assert lines("temporal_workflow_completed{")
    assert telemetry.trace_file is None and telemetry.otlp_endpoint is None


def _with_trace_header(client: Client, header: Payload) -> Client:
    """`client`, also sending `header` as the trace context of every start and signal (first:
    the session client's signing sees it, as any caller's would be)."""

    class _Out(OutboundInterceptor):
        async def start_workflow(self, input):  # type: ignore[no-untyped-def]
            input.headers = {**input.headers, HEADER: header}
            return await self.next.start_workflow(input)

        async def signal_workflow(self, input):  # type: ignore[no-untyped-def]
            input.headers = {**input.headers, HEADER: header}
            await self.next.signal_workflow(input)

    class _Hostile(Interceptor):
        def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
            return _Out(next)

    config = client.config()
    return Client(**{**config, "interceptors": [_Hostile(), *config["interceptors"]]})


async def test_a_hostile_trace_header_on_a_start_or_a_signal_does_not_stall_the_run(
    client, worker_config, task_queue, telemetry, trace_file
):
    """The trace header comes from whoever starts or signals a run: one that does not parse is
    ignored. (Temporal's own interceptor raised on it, failing the run's workflow task again and
    again: a signal from anyone could stall someone else's run.)"""
    hostile = _with_trace_header(
        client, Payload(metadata={"encoding": b"json/plain"}, data=b'{"traceparent": 7')
    )
    script = ten_step_script("o-1219")
    async with traced_worker(client, worker_config, telemetry):
        handle = await start_run(hostile, scripted_request(script), task_queue=task_queue)
        state = await wait_for_status(handle, "awaiting_approval")
        await hostile.get_workflow_handle(handle.id).signal("approval", {"not": "a decision"})
        await approve_first_pending(handle, state)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    spans = spans_of(trace_file, telemetry, handle.id)
    [root] = [s for s in spans if s["parent_id"] is None]  # the header gave it no parent
    assert root["attributes"]["spine.run.status"] == "completed"
    assert {s["parent_id"] for s in spans if s is not root} == {root["span_id"]}
