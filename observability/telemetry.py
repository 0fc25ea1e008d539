"""Tracing and metrics for Spine workers: GenAI spans that survive replay, Prometheus metrics.

A run is one trace, named after the OpenTelemetry GenAI semantic conventions::

    invoke_agent refund-agent        the run: one per workflow id, ended when the run closes
    ├── chat scripted                one per model activity attempt       (activity side)
    ├── execute_tool lookup_order    one per tool activity attempt        (activity side)
    ├── approval issue_refund        one per accepted approval decision   (workflow side)
    └── ...

Wiring (what ``worker.py`` does)::

    telemetry = telemetry_from_env(os.environ)         # first: sets the global tracer provider
    client = await connect(runtime=telemetry.runtime)  # Prometheus when SPINE_METRICS_ADDR is set
    plugins = [SpinePlugin(config), *telemetry.worker_plugins(policy.price_table())]
    worker = Worker(client, task_queue=config.task_queue, plugins=plugins)
    ...
    telemetry.shutdown()                               # flushes what is still buffered

Replay safety: workflow-side spans come from Temporal's replay-safe tracer provider
(``temporalio.contrib.opentelemetry.create_tracer_provider``). Their ids come from the workflow's
deterministic random and a span is not ended, so not exported, while history is replayed. After a
worker restart the new worker re-creates ``invoke_agent`` with the same ids and exports it once,
when the run closes; the children the old worker exported keep pointing at it. Activity-side spans
are never replayed, because activities are not re-run on replay.

Cost: a model activity does not see the price table the run pinned, so ``chat`` spans are priced
with the worker's policy price table (passed to :meth:`Telemetry.worker_plugins`); the
``invoke_agent`` span carries the workflow's own total (``AgentResult.usage.usd``), which is the
authoritative figure.

Message content (prompts, completions, tool arguments and results, approval reasons) is recorded
only with ``SPINE_TRACE_CONTENT=1``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import opentelemetry.context
import opentelemetry.trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import RawValue
from temporalio.contrib.opentelemetry import (
    OpenTelemetryInterceptor,
    ReplaySafeTracerProvider,
    TracingInterceptor,
    create_tracer_provider,
)
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError
from temporalio.plugin import SimplePlugin
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    ReplayerConfig,
    StartActivityInput,
    WorkerConfig,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
    WorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from spine.contract import ACTIVITY_MODEL_CALL, WORKFLOW_TYPE, ApprovalDecision, tool_of
from spine.guardrails.budget import price
from spine.guardrails.interceptor import decode, guards_of_current_run
from spine.observability import metrics
from spine.observability.propagation import TraceContextInterceptor, detach
from spine.observability.spans import DatabaseSpanExporter
from spine.payloads import ToolCallInput
from spine.store import open_database, redact_url, shared_database
from spine.workflows.state import AgentWorkflowInput

log = logging.getLogger("spine.telemetry")

# --- attribute names --------------------------------------------------------------------------

OPERATION = "gen_ai.operation.name"
AGENT_NAME = "gen_ai.agent.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
COST_AMOUNT = "gen_ai.usage.cost.amount"
COST_CURRENCY = "gen_ai.usage.cost.currency"
TOOL_NAME = "gen_ai.tool.name"
TOOL_CALL_ID = "gen_ai.tool.call.id"
CONVERSATION = "gen_ai.conversation.id"
RUN_ID = "spine.run.id"
"""The workflow id, on every Spine span: how `spine trace RUN` finds a run."""
STEP = "spine.step"
ATTEMPT = "spine.retry.attempt"
POLICY_DECISION = "spine.policy.decision"
ERROR_TYPE = "error.type"

#: Attributes that carry message content; recorded only with SPINE_TRACE_CONTENT=1.
CONTENT_ATTRIBUTES = frozenset(
    {
        "gen_ai.input.messages",
        "gen_ai.output.messages",
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
        "spine.approval.reason",
    }
)

_POLICY_HEADER = "spine-policy-decision"
_FAILED_STATUSES = frozenset({"failed", "compensated"})
_PAYLOADS = PayloadConverter.default


class TelemetryError(ValueError):
    """Tracing or metrics are configured wrongly; the message names the setting to fix."""


# --- the JSONL exporter -----------------------------------------------------------------------


def default_trace_file(env: Mapping[str, str]) -> Path:
    """`SPINE_TRACE_FILE`, else ``traces.jsonl`` in `SPINE_STATE_DIR` (default ``.spine``)."""
    if env.get("SPINE_TRACE_FILE"):
        return Path(env["SPINE_TRACE_FILE"])
    return Path(env.get("SPINE_STATE_DIR") or ".spine") / "traces.jsonl"


def span_record(span: ReadableSpan) -> dict[str, object]:
    """One finished span as the JSON object written on one line of the trace file."""
    context = span.get_span_context()
    record: dict[str, object] = {
        "trace_id": format(context.trace_id, "032x") if context else None,
        "span_id": format(context.span_id, "016x") if context else None,
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        },
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "service": span.resource.attributes.get("service.name"),
    }
    if span.events:
        record["events"] = [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ]
    return record


class JsonlSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line (see :func:`span_record`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(
            json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n" for s in spans
        )
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # One write per batch, in append mode: lines from several workers don't interleave.
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(text)
        except OSError as err:
            log.warning("cannot write spans to %s: %s", self.path, err)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


# --- the process-wide tracer provider ---------------------------------------------------------


class _FanOut(SpanProcessor):
    """The one processor on the global provider; each Telemetry adds and removes its own.

    The global tracer provider can be set once per process, while tests (and a worker that is
    rebuilt) create several Telemetry objects with their own exporters.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: tuple[SpanProcessor, ...] = ()

    def add(self, processor: SpanProcessor) -> None:
        with self._lock:
            self._targets = (*self._targets, processor)

    def remove(self, processor: SpanProcessor) -> None:
        with self._lock:
            self._targets = tuple(p for p in self._targets if p is not processor)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for target in self._targets:
            target.on_start(span, parent_context)  # type: ignore[arg-type]  # SDK passes its Span

    def on_end(self, span: ReadableSpan) -> None:
        for target in self._targets:
            target.on_end(span)

    def shutdown(self) -> None:
        for target in self._targets:
            target.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return all(target.force_flush(timeout_millis) for target in self._targets)


_PROVIDER_LOCK = threading.Lock()
_FANOUT: _FanOut | None = None


def _install_provider(env: Mapping[str, str]) -> _FanOut:
    """Make the global tracer provider replay-safe (once per process); return its fan-out."""
    global _FANOUT
    with _PROVIDER_LOCK:
        if _FANOUT is not None:
            return _FANOUT
        fanout = _FanOut()
        current = otel_trace.get_tracer_provider()
        if isinstance(current, ReplaySafeTracerProvider):
            current.add_span_processor(fanout)
        elif isinstance(current, otel_trace.ProxyTracerProvider):
            service = env.get("OTEL_SERVICE_NAME") or "spine-worker"
            provider = create_tracer_provider(resource=Resource.create({"service.name": service}))
            provider.add_span_processor(fanout)
            otel_trace.set_tracer_provider(provider)
        if not isinstance(otel_trace.get_tracer_provider(), ReplaySafeTracerProvider):
            raise TelemetryError(
                f"this process already has a global OpenTelemetry tracer provider "
                f"({type(current).__name__}) that is not replay-safe; call telemetry_from_env() "
                "before anything else sets one, or install "
                "temporalio.contrib.opentelemetry.create_tracer_provider() yourself"
            )
        _FANOUT = fanout
        return fanout


@functools.cache
def _tracer() -> otel_trace.Tracer:
    """Spine's tracer, made once: a tracer holds no state of its own (replay safety is decided
    per span), and the SDK builds a new one on every ``get_tracer`` call."""
    return otel_trace.get_tracer("spine")


# --- helpers ----------------------------------------------------------------------------------


def _clean(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {k: v for k, v in attributes.items() if v is not None}


def _error_type(err: BaseException) -> str:
    if isinstance(err, ApplicationError):
        return err.type or "ApplicationError"
    return type(err).__name__


def _mark_error(span: Span, err: BaseException) -> None:
    kind = _error_type(err)
    message = err.message if isinstance(err, ApplicationError) else str(err)
    span.set_attribute(ERROR_TYPE, kind)
    span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"[:300]))


def _cost(
    prices: Mapping[str, tuple[float, float]], input_tokens: int, output_tokens: int, *models: str
) -> float | None:
    """USD for the tokens, priced as the workflow prices them (:func:`price`)."""
    usd = price(prices, input_tokens, output_tokens, *models)
    return None if usd is None else round(usd, 8)


def _messages_json(messages: Sequence[object]) -> str:
    """Chat messages in the GenAI conventions' shape (role + parts), as a JSON string."""
    out = []
    for m in messages:
        role = getattr(m, "role", "user")
        parts: list[dict[str, object]] = []
        content = getattr(m, "content", None)
        if content is not None and role == "tool":
            call_id = getattr(m, "tool_call_id", None)
            parts.append({"type": "tool_call_response", "id": call_id, "response": content})
        elif content is not None:
            parts.append({"type": "text", "content": content})
        for call in getattr(m, "tool_calls", None) or []:
            args = call.args if call.args is not None else call.raw_args
            parts.append({"type": "tool_call", "id": call.id, "name": call.name, "arguments": args})
        out.append({"role": role, "parts": parts})
    return json.dumps(out, default=str)


def _attach(span: Span) -> tuple[Context, Token[Context]]:
    context = otel_trace.set_span_in_context(span)
    return context, opentelemetry.context.attach(context)


def _detach(attached: tuple[Context, Token[Context]] | None) -> None:
    """Detach quietly: on eviction the coroutine may finish in another contextvars context."""
    if attached is not None:
        detach(*attached)


def _live() -> bool:
    """True unless the workflow is replaying history (or being evicted, which counts as replay)."""
    return not workflow.unsafe.is_replaying_history_events()


# --- interceptors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    tracing: bool
    content: bool
    prices: Mapping[str, tuple[float, float]]


class _ActivityInbound(ActivityInboundInterceptor):
    """`chat` and `execute_tool` spans and metrics around each activity attempt."""

    def __init__(self, next: ActivityInboundInterceptor, settings: _Settings) -> None:
        super().__init__(next)
        self._settings = settings

    async def execute_activity(self, input: ExecuteActivityInput) -> object:
        info = activity.info()
        if info.activity_type == ACTIVITY_MODEL_CALL:
            return await self._model_call(input, info)
        if tool_of(info.activity_type) is not None:
            return await self._tool_call(input, info)
        return await self.next.execute_activity(input)

    @contextmanager
    def _span(
        self, name: str, kind: SpanKind, attributes: Mapping[str, AttributeValue | None]
    ) -> Iterator[Span]:
        if not self._settings.tracing:
            yield otel_trace.INVALID_SPAN
            return
        # The parent is the context the propagation interceptor (outer) took from headers.
        span = _tracer().start_span(name, kind=kind, attributes=_clean(attributes))
        try:
            with otel_trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield span
        except BaseException as err:
            _mark_error(span, err)
            raise
        finally:
            span.end()

    async def _model_call(self, input: ExecuteActivityInput, info: activity.Info) -> object:
        call = input.args[0] if input.args else None
        provider = str(getattr(call, "provider", None) or "unknown")
        model = str(getattr(call, "model", None) or "unknown")
        attributes: dict[str, AttributeValue | None] = {
            OPERATION: "chat",
            PROVIDER: provider,
            REQUEST_MODEL: model,
            "gen_ai.request.max_tokens": getattr(call, "max_tokens", None),
            CONVERSATION: info.workflow_id,
            RUN_ID: info.workflow_id,
            STEP: getattr(call, "step", None),
            ATTEMPT: info.attempt,
            "spine.model.fallback_index": getattr(call, "fallback_index", None) or None,
        }
        if self._settings.content:
            attributes["gen_ai.input.messages"] = _messages_json(
                getattr(call, "new_messages", None) or []
            )
        with self._span(f"chat {model}", SpanKind.CLIENT, attributes) as span:
            try:
                result = await self.next.execute_activity(input)
            except BaseException:
                metrics.record_model_call(provider, model, ok=False, attempt=info.attempt)
                raise
            usage = getattr(result, "usage", None)
            input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
            output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
            response_model = str(getattr(result, "model", None) or model)
            usd = _cost(self._settings.prices, input_tokens, output_tokens, response_model, model)
            finish = getattr(result, "finish_reason", None)
            span.set_attributes(
                _clean(
                    {
                        RESPONSE_MODEL: response_model,
                        INPUT_TOKENS: input_tokens,
                        OUTPUT_TOKENS: output_tokens,
                        COST_AMOUNT: usd,
                        COST_CURRENCY: "USD" if usd is not None else None,
                        "gen_ai.response.finish_reasons": [finish] if finish else None,
                        "spine.model.confidence": getattr(result, "confidence", None),
                    }
                )
            )
            message = getattr(result, "message", None)
            if self._settings.content and message is not None:
                span.set_attribute("gen_ai.output.messages", _messages_json([message]))
            metrics.record_model_call(
                provider,
                model,
                ok=True,
                attempt=info.attempt,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                usd=usd,
            )
            return result

    async def _tool_call(self, input: ExecuteActivityInput, info: activity.Info) -> object:
        call = input.args[0] if input.args else None
        tool = str(getattr(call, "tool", None) or tool_of(info.activity_type))
        decision = None
        header = input.headers.get(_POLICY_HEADER)
        if header is not None:
            decision = str(_PAYLOADS.from_payloads([header])[0])
        attributes: dict[str, AttributeValue | None] = {
            OPERATION: "execute_tool",
            TOOL_NAME: tool,
            TOOL_CALL_ID: getattr(call, "call_id", None),
            "gen_ai.tool.type": "function",
            CONVERSATION: info.workflow_id,
            RUN_ID: info.workflow_id,
            STEP: getattr(call, "step", None),
            ATTEMPT: info.attempt,
            POLICY_DECISION: decision,
            "spine.tool.version": getattr(call, "version", None),
        }
        if self._settings.content:
            attributes["gen_ai.tool.call.arguments"] = json.dumps(
                getattr(call, "args", None), default=str
            )
        with self._span(f"execute_tool {tool}", SpanKind.INTERNAL, attributes) as span:
            try:
                result = await self.next.execute_activity(input)
            except BaseException as err:
                metrics.record_tool_call(
                    tool, ok=False, attempt=info.attempt, error_type=_error_type(err)
                )
                raise
            if self._settings.content:
                span.set_attribute(
                    "gen_ai.tool.call.result",
                    json.dumps(getattr(result, "output", None), default=str),
                )
            metrics.record_tool_call(tool, ok=True, attempt=info.attempt)
            return result


class _WorkflowInbound(WorkflowInboundInterceptor):
    """The `invoke_agent` span, approval spans, and run-level metrics, from outside the workflow.

    Runs inside the workflow sandbox but is defined (and imports) outside it. Everything it does
    is deterministic or replay-aware: spans and metrics are dropped while history is replayed.
    """

    settings: ClassVar[_Settings]

    def __init__(self, next: WorkflowInboundInterceptor) -> None:
        super().__init__(next)
        self._agent = ""
        self._root_context: Context | None = None
        self._decided: dict[tuple[int, str], str] = {}

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound, self))

    def is_agent_run(self) -> bool:
        # Other workflows on the worker (budget ledgers, extra workflows) are left alone.
        return workflow.info().workflow_type == WORKFLOW_TYPE

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> object:
        if not self.is_agent_run():
            return await self.next.execute_workflow(input)
        request = _request(input.args[0]) if input.args else None
        self._agent = str(getattr(request, "agent", None) or "")
        span = self._start_run_span(request) if self.settings.tracing else None
        attached = _attach(span) if span is not None else None
        if attached is not None:
            self._root_context = attached[0]
        try:
            result = await self.next.execute_workflow(input)
        except workflow.ContinueAsNewError:
            # The next run of this workflow id is a child of this span (the context travels in
            # the continue-as-new headers), so the trace keeps exactly one root.
            if span is not None:
                span.set_attribute("spine.continued_as_new", True)
                span.end()
            raise
        except BaseException as err:
            # A workflow failure closes the run; anything else (eviction, a task failure that
            # will be retried) must leave the span open for the worker that finishes the run.
            if _is_workflow_failure(err):
                if span is not None:
                    _mark_error(span, err)
                    span.end()
                if _live():
                    metrics.record_run_outcome(self._agent, "error", 0, 0.0)
            raise
        finally:
            _detach(attached)
        status = str(getattr(result, "status", "unknown"))
        usage = getattr(result, "usage", None)
        steps = int(getattr(result, "steps", 0) or 0)
        usd = float(getattr(usage, "usd", 0.0) or 0.0)
        retries = int(getattr(result, "retries", 0) or 0)
        if span is not None:
            self._end_run_span(span, result, status, steps, usd, retries)
        if _live():
            metrics.record_run_outcome(self._agent, status, steps, usd, retries)
        return result

    def _start_run_span(self, request: object) -> Span:
        info = workflow.info()
        model = getattr(request, "model", None)
        carry = getattr(request, "carry", None)
        attributes: dict[str, AttributeValue | None] = {
            OPERATION: "invoke_agent",
            AGENT_NAME: self._agent,
            CONVERSATION: info.workflow_id,
            RUN_ID: info.workflow_id,
            "spine.workflow.run_id": info.run_id,
            "spine.account": getattr(request, "account", None),
            "spine.task_queue": info.task_queue,
            PROVIDER: getattr(model, "provider", None),
            REQUEST_MODEL: getattr(model, "name", None),
            "spine.continued_from_run_id": info.continued_run_id if carry is not None else None,
            "spine.continued_from_step": getattr(carry, "step", None),
            # A sub-agent: the run that started it (its span is this span's parent, by headers).
            "spine.parent.run_id": info.parent.workflow_id if info.parent else None,
        }
        if self.settings.content:
            goal = getattr(request, "goal", "")
            attributes["gen_ai.input.messages"] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": goal}]}]
            )
        name = f"invoke_agent {self._agent}" if self._agent else "invoke_agent"
        return _tracer().start_span(name, kind=SpanKind.INTERNAL, attributes=_clean(attributes))

    def _end_run_span(
        self, span: Span, result: object, status: str, steps: int, usd: float, retries: int
    ) -> None:
        usage = getattr(result, "usage", None)
        span.set_attributes(
            _clean(
                {
                    "spine.run.status": status,
                    "spine.steps": steps,
                    "spine.retries": retries,
                    INPUT_TOKENS: getattr(usage, "input_tokens", None),
                    OUTPUT_TOKENS: getattr(usage, "output_tokens", None),
                    COST_AMOUNT: usd,
                    COST_CURRENCY: "USD",
                }
            )
        )
        if status in _FAILED_STATUSES:
            span.set_attribute(ERROR_TYPE, status)
            span.set_status(Status(StatusCode.ERROR, str(getattr(result, "reason", ""))[:300]))
        output = getattr(result, "output", None)
        if self.settings.content and output is not None:
            span.set_attribute(
                "gen_ai.output.messages",
                json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": output}]}]),
            )
        span.end()

    # -- approvals: the `decide` update (validated) and the `approval` signal (checked inside)

    async def handle_update_handler(self, input: HandleUpdateInput) -> object:
        if input.update != "decide" or not self.is_agent_run():
            return await self.next.handle_update_handler(input)
        before = self._pending()
        result = await self.next.handle_update_handler(input)
        decision = _decision(input.args)
        approval_id = getattr(decision, "approval_id", None)
        if approval_id in before:  # the validator let it through, so the run took it
            self._on_decision(decision, *before[approval_id])
        return result

    async def handle_signal(self, input: HandleSignalInput) -> None:
        if input.signal != "approval" or not self.is_agent_run():
            return await self.next.handle_signal(input)
        before = self._pending()
        await self.next.handle_signal(input)
        decision = _decision(input.args)
        approval_id = getattr(decision, "approval_id", None)
        # The run refuses a bad signal itself; it took this one if the approval is no longer open.
        if approval_id in before and approval_id not in self._pending():
            self._on_decision(decision, *before[approval_id])

    def _pending(self) -> dict[str, tuple[str, int]]:
        """Open approvals as {approval_id: (tool, step)}, from the run's approval desk."""
        guards = guards_of_current_run()
        if guards is None:
            return {}
        step = guards.approvals.state.step
        return {p.approval_id: (p.tool, step) for p in guards.approvals.pending()}

    def _on_decision(self, decision: object, tool: str, step: int) -> None:
        verdict = str(getattr(decision, "decision", ""))
        self._decided[(step, tool)] = verdict
        if _live():
            metrics.record_approval_decided(self._agent, tool, verdict)
        if not self.settings.tracing or self._root_context is None:
            return
        info = workflow.info()
        attributes: dict[str, AttributeValue | None] = {
            POLICY_DECISION: verdict,
            TOOL_NAME: tool,
            STEP: step,
            RUN_ID: info.workflow_id,
            CONVERSATION: info.workflow_id,
            "spine.approval.id": getattr(decision, "approval_id", None),
            "spine.approval.by": getattr(decision, "by", None),
            "spine.approval.role": getattr(decision, "role", None),
        }
        if self.settings.content:
            attributes["spine.approval.reason"] = getattr(decision, "reason", None) or None
        # Parented explicitly: handlers run with the caller's (usually empty) trace context.
        span = _tracer().start_span(
            f"approval {tool}", context=self._root_context, attributes=_clean(attributes)
        )
        span.end()

    def tool_decision(self, call: ToolCallInput) -> str:
        """What the policy said about a tool call the run is about to execute."""
        if call.purpose == "compensation":
            return "compensate"  # saga compensation: not a model proposal, no policy check
        verdict = self._decided.get((call.step, call.tool))
        return verdict if verdict is not None else "allow"


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    """Tells each tool activity, in a header, what the policy decided for its call."""

    def __init__(self, next: WorkflowOutboundInterceptor, inbound: _WorkflowInbound) -> None:
        super().__init__(next)
        self._inbound = inbound

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[object]:
        if (
            self._inbound.settings.tracing
            and self._inbound.is_agent_run()
            and tool_of(input.activity) is not None
            and input.args
            and isinstance(input.args[0], ToolCallInput)
        ):
            decision = self._inbound.tool_decision(input.args[0])
            header: Payload = _PAYLOADS.to_payloads([decision])[0]
            input.headers = {**input.headers, _POLICY_HEADER: header}
        return self.next.start_activity(input)


def _request(arg: object) -> object:
    """The run's request, decoded from the raw input the workflow takes (None if it is not
    one: the workflow refuses such input itself)."""
    if not isinstance(arg, RawValue):
        return arg
    try:
        return AgentWorkflowInput.model_validate(
            workflow.payload_converter().from_payload(arg.payload)
        )
    except Exception:  # noqa: BLE001  # not a request: the span has no agent name
        return None


def _is_workflow_failure(err: BaseException) -> bool:
    try:
        return workflow.is_failure_exception(err)
    except Exception:  # noqa: BLE001  # torn down outside the workflow's context: not a failure
        return False


class SpineTracingInterceptor(Interceptor):
    """Worker interceptor adding Spine's GenAI spans and metrics (use it via the plugin)."""

    def __init__(self, settings: _Settings) -> None:
        self._settings = settings

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next, self._settings)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        settings = self._settings

        class _Configured(_WorkflowInbound):
            pass

        _Configured.settings = settings
        return _Configured


def _with_opentelemetry_passthrough(runner: WorkflowRunner | None) -> WorkflowRunner:
    if runner is None:
        raise TelemetryError("the Spine telemetry plugin needs the worker's workflow runner")
    if isinstance(runner, SandboxedWorkflowRunner):
        return dataclasses.replace(
            runner,
            restrictions=runner.restrictions.with_passthrough_modules(
                "opentelemetry"  # one tracer provider and context inside and outside the sandbox
            ),
        )
    return runner


class SpineTelemetryPlugin(SimplePlugin):
    """Worker (and Replayer) plugin: trace-context propagation, then Spine's spans.

    The order matters: the propagation interceptor (:mod:`spine.observability.propagation`, the
    header Temporal's OpenTelemetry interceptor uses, cheaper) attaches the trace context carried
    in headers, and Spine's, inside it, starts `invoke_agent` under that context, so activities
    started by the workflow carry `invoke_agent` as their parent. When the client already has
    Temporal's interceptor, that one propagates instead.
    """

    def __init__(self, settings: _Settings) -> None:
        self._spine = SpineTracingInterceptor(settings)
        self._tracing = settings.tracing
        super().__init__(
            "spine.telemetry",
            workflow_runner=_with_opentelemetry_passthrough if settings.tracing else None,
        )

    def _interceptors(self, client_interceptors: Sequence[object]) -> list[Interceptor]:
        if not self._tracing:
            return [self._spine]
        tracing_types = (OpenTelemetryInterceptor, TracingInterceptor)
        if any(isinstance(i, tracing_types) for i in client_interceptors):
            return [self._spine]  # the client's own tracing interceptor already propagates context
        return [TraceContextInterceptor(), self._spine]

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        config = super().configure_worker(config)
        client_interceptors = config["client"].config(active_config=True).get("interceptors", [])
        config["interceptors"] = [
            *(config.get("interceptors") or []),
            *self._interceptors(client_interceptors),
        ]
        return config

    def configure_replayer(self, config: ReplayerConfig) -> ReplayerConfig:
        config = super().configure_replayer(config)
        config["interceptors"] = [*(config.get("interceptors") or []), *self._interceptors([])]
        return config


# --- the public entry point -------------------------------------------------------------------


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Telemetry:
    """What a worker adds for tracing and metrics. Build it with :func:`telemetry_from_env`."""

    tracing: bool
    content: bool
    trace_file: Path | None
    otlp_endpoint: str | None
    metrics_address: str | None
    trace_database: str | None = None
    """The shared database spans go to (``SPINE_DATABASE_URL``, password hidden), or None."""
    runtime: Runtime | None = None
    """Pass to ``Client.connect(runtime=...)`` for Prometheus metrics; None when they are off."""
    _processors: list[SpanProcessor] = field(default_factory=list, repr=False)

    def worker_plugins(
        self, prices: Mapping[str, tuple[float, float]] | None = None
    ) -> list[SimplePlugin]:
        """Plugins for ``Worker(plugins=...)`` (or ``Replayer``); `prices` price `chat` spans.

        `prices` is the policy's table, USD per 1M tokens (input, output) by model name
        (``policy.price_table()``); without it `chat` spans carry tokens but no cost.
        """
        settings = _Settings(tracing=self.tracing, content=self.content, prices=dict(prices or {}))
        return [SpineTelemetryPlugin(settings)]

    @property
    def summary(self) -> str:
        """One line for the worker's log: where traces and metrics go."""
        if not self.tracing:
            where = "tracing off (OTEL_SDK_DISABLED)"
        else:
            sinks = [f"OTLP {self.otlp_endpoint}"] if self.otlp_endpoint else []
            sinks += [f"file {self.trace_file}"] if self.trace_file else []
            sinks += [f"database {self.trace_database}"] if self.trace_database else []
            where = f"traces to {' and '.join(sinks)}, content {'on' if self.content else 'off'}"
        metrics_at = (
            f"Prometheus metrics on http://{self.metrics_address}/metrics"
            if self.metrics_address
            else "metrics off (set SPINE_METRICS_ADDR)"
        )
        return f"{where}; {metrics_at}"

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export every finished span now; True if all exporters finished in time."""
        return all(p.force_flush(int(timeout_s * 1000)) for p in self._processors)

    def shutdown(self) -> None:
        """Flush and detach this telemetry's exporters. The tracer provider itself stays."""
        fanout = _FANOUT
        for processor in self._processors:
            if fanout is not None:
                fanout.remove(processor)
            processor.shutdown()
        self._processors.clear()


def otlp_endpoint(env: Mapping[str, str]) -> str | None:
    """Where the workers export spans over OTLP/HTTP, or None when OTLP is not configured."""
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return f"{base.rstrip('/')}/v1/traces" if base else None


def telemetry_from_env(env: Mapping[str, str] | None = None) -> Telemetry:
    """Tracing and metrics as the environment asks for them.

    Call it once per process before connecting the worker's client: it installs the global,
    replay-safe tracer provider and, with `SPINE_METRICS_ADDR`, starts the Prometheus endpoint.

    Environment:
        OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: export spans over
            OTLP/HTTP (protobuf); the other ``OTEL_EXPORTER_OTLP_*`` settings (headers,
            timeout, certificates) are read by the exporter from the process environment.
        SPINE_TRACE_FILE: also (or, without OTLP, instead) append spans to this JSONL file;
            default without OTLP: ``$SPINE_STATE_DIR/traces.jsonl`` (``.spine/traces.jsonl``).
        SPINE_DATABASE_URL: with neither of the two above, spans go to the shared database
            (table ``spine_span``), where ``spine trace`` reads them.
        SPINE_TRACE_CONTENT=1: record prompts, completions, tool arguments and results.
        OTEL_SDK_DISABLED=true: no spans (metrics still work).
        OTEL_SERVICE_NAME: the service name on spans (default ``spine-worker``).
        SPINE_METRICS_ADDR: host:port for Temporal's Prometheus endpoint, e.g. 127.0.0.1:9464.

    Raises:
        TelemetryError: an unsupported OTLP protocol, a busy metrics address, or a global tracer
            provider that is not replay-safe.
    """
    env = os.environ if env is None else env
    tracing = not _flag(env.get("OTEL_SDK_DISABLED"))
    endpoint = otlp_endpoint(env)
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if endpoint and protocol and protocol != "http/protobuf":
        raise TelemetryError(
            f"OTLP protocol {protocol!r} is not supported; Spine exports traces over "
            "http/protobuf: unset OTEL_EXPORTER_OTLP_PROTOCOL or set it to 'http/protobuf' "
            "(and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port, usually 4318)"
        )
    to_database = shared_database(env) and not endpoint and not env.get("SPINE_TRACE_FILE")
    trace_file = (
        default_trace_file(env)
        if (env.get("SPINE_TRACE_FILE") or not (endpoint or to_database))
        else None
    )
    address = env.get("SPINE_METRICS_ADDR") or None
    runtime = None
    if address:
        try:
            runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(address)))
        except Exception as err:  # the core raises plain exceptions for bad or busy addresses
            raise TelemetryError(
                f"cannot serve Prometheus metrics on SPINE_METRICS_ADDR={address!r}: {err}; "
                "set it to a free host:port such as 127.0.0.1:9464"
            ) from err
    telemetry = Telemetry(
        tracing=tracing,
        content=_flag(env.get("SPINE_TRACE_CONTENT")),
        trace_file=trace_file if tracing else None,
        otlp_endpoint=endpoint if tracing else None,
        metrics_address=address,
        runtime=runtime,
        trace_database=redact_url(env["SPINE_DATABASE_URL"].strip())
        if to_database and tracing
        else None,
    )
    if not tracing:
        return telemetry
    fanout = _install_provider(env)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        telemetry._processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if trace_file:
        # A short delay: `spine trace` is usually run right after a run closes.
        telemetry._processors.append(
            BatchSpanProcessor(JsonlSpanExporter(trace_file), schedule_delay_millis=1000)
        )
    if telemetry.trace_database:
        url = env["SPINE_DATABASE_URL"]
        exporter = DatabaseSpanExporter(lambda: open_database(url))
        telemetry._processors.append(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    for processor in telemetry._processors:
        fanout.add(processor)
    return telemetry


def _decision(args: Sequence[object]) -> ApprovalDecision | None:
    """The decision a `decide` update or `approval` signal carried (they take it raw)."""
    arg = args[0] if args else None
    if isinstance(arg, RawValue):
        return decode(arg, ApprovalDecision)[0]
    return arg if isinstance(arg, ApprovalDecision) else None
