"""The trace context across Temporal calls, so a run's activities and sub-agents join its trace.

This is what Temporal's ``OpenTelemetryInterceptor`` does without spans of its own
(``add_temporal_spans=False``, as Spine used it), at a fraction of the cost. The context travels
in the same header, ``_tracer-data`` (a JSON object of W3C trace-context and baggage fields), so
Spine workers interoperate with clients and workers that use Temporal's interceptor.

Why not Temporal's: it builds a new tracer for every call a workflow makes, even when it makes no
span, and encodes the header anew each time; in a busy worker that was 14% of the workflow
threads' time, about 1 ms of CPU per agent step. Here a run encodes a header once per distinct
context (a run's calls are made under its one ``invoke_agent`` span), and a worker decodes each
distinct header once (a run's activities all carry the same one).

Contexts are immutable, so sharing a decoded one between activities is safe; the cache of
encoded headers is per workflow run, the cache of decoded ones per process (bounded).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any, NoReturn

import opentelemetry.context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadConverter
from temporalio.worker import (
    ActivityInboundInterceptor,
    ContinueAsNewInput,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    HandleQueryInput,
    HandleSignalInput,
    HandleUpdateInput,
    Interceptor,
    SignalChildWorkflowInput,
    SignalExternalWorkflowInput,
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
    StartNexusOperationInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

HEADER = "_tracer-data"
"""The header Temporal's OpenTelemetry interceptors use; Spine uses the same."""

#: W3C trace context and baggage, as Temporal's interceptors propagate them.
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

_CONVERTER = PayloadConverter.default

#: The largest trace header taken (W3C traceparent + tracestate + baggage fit well within it).
MAX_HEADER_BYTES = 16 * 1024


def encode(context: Context | None = None) -> Payload | None:
    """The header for `context` (default: the current one), or None when it carries nothing."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context)
    return _CONVERTER.to_payloads([carrier])[0] if carrier else None


def decode(headers: Mapping[str, Payload]) -> Context | None:
    """The context a call's headers carry; None when they carry none or one that does not parse.

    Headers come from whoever made the call (a starter, a signaller): one that is too big or is
    not a JSON object of strings is ignored, never raised, so it cannot fail the workflow task
    of a run it was sent to (which would stall that run).
    """
    header = headers.get(HEADER)
    if header is None:
        return None
    data = header.SerializeToString(deterministic=True)
    return _decoded(data) if len(data) <= MAX_HEADER_BYTES else None


@functools.lru_cache(maxsize=1024)
def _decoded(header: bytes) -> Context | None:
    try:
        carrier = _CONVERTER.from_payloads([Payload.FromString(header)])[0]
    except Exception:  # noqa: BLE001  # not a payload, not JSON: no context
        return None
    if not isinstance(carrier, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in carrier.items()
    ):
        return None
    try:
        return PROPAGATOR.extract(carrier)
    except Exception:  # noqa: BLE001  # the propagators ignore what they cannot parse; in case
        return None


@contextmanager
def attached(context: Context | None) -> Iterator[None]:
    """`context` attached for the block (nothing when None); detached quietly (see
    :func:`detach`)."""
    if context is None:
        yield
        return
    token = opentelemetry.context.attach(context)
    try:
        yield
    finally:
        detach(context, token)


def detach(context: Context, token: Token[Context]) -> None:
    """Undo an attach, if `context` is still current and `token` belongs here: a workflow that
    is evicted may finish its coroutine in another ``contextvars`` context, where there is
    nothing to undo (and OpenTelemetry's ``detach`` would log an error)."""
    if opentelemetry.context.get_current() is not context:
        return
    try:
        token.var.reset(token)
    except ValueError:
        pass  # the token belongs to another contextvars.Context


class TraceContextInterceptor(Interceptor):
    """Worker interceptor: takes the context from the headers of what a worker runs, and puts
    the current context in the headers of what its workflows start, signal or continue as."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        return _WorkflowInbound


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        with attached(decode(input.headers)):
            return await self.next.execute_activity(input)


class _WorkflowInbound(WorkflowInboundInterceptor):
    """Runs inside the workflow sandbox (defined outside it); attaching a context is not a
    command and changes no workflow state, so replay is unaffected."""

    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_WorkflowOutbound(outbound))

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        with attached(decode(input.headers)):
            return await self.next.execute_workflow(input)

    async def handle_signal(self, input: HandleSignalInput) -> None:
        with attached(decode(input.headers)):
            return await self.next.handle_signal(input)

    async def handle_query(self, input: HandleQueryInput) -> Any:
        with attached(decode(input.headers)):
            return await self.next.handle_query(input)

    def handle_update_validator(self, input: HandleUpdateInput) -> None:
        with attached(decode(input.headers)):
            self.next.handle_update_validator(input)

    async def handle_update_handler(self, input: HandleUpdateInput) -> Any:
        with attached(decode(input.headers)):
            return await self.next.handle_update_handler(input)


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor) -> None:
        super().__init__(next)
        # The last context encoded and its header: the same object means the same content.
        self._last: tuple[Context, Payload | None] | None = None

    def _headers(self, headers: Mapping[str, Payload]) -> Mapping[str, Payload]:
        context = opentelemetry.context.get_current()
        last = self._last
        if last is None or last[0] is not context:
            last = self._last = (context, encode(context))
        return {**headers, HEADER: last[1]} if last[1] is not None else headers

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._headers(input.headers)
        return self.next.start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = self._headers(input.headers)
        return self.next.start_local_activity(input)

    async def start_child_workflow(
        self, input: StartChildWorkflowInput
    ) -> workflow.ChildWorkflowHandle[Any, Any]:
        input.headers = self._headers(input.headers)
        return await self.next.start_child_workflow(input)

    def continue_as_new(self, input: ContinueAsNewInput) -> NoReturn:
        input.headers = self._headers(input.headers)
        self.next.continue_as_new(input)

    async def signal_child_workflow(self, input: SignalChildWorkflowInput) -> None:
        input.headers = self._headers(input.headers)
        await self.next.signal_child_workflow(input)

    async def signal_external_workflow(self, input: SignalExternalWorkflowInput) -> None:
        input.headers = self._headers(input.headers)
        await self.next.signal_external_workflow(input)

    async def start_nexus_operation(
        self, input: StartNexusOperationInput[Any, Any]
    ) -> workflow.NexusOperationHandle[Any]:
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        input.headers = {**(input.headers or {}), **carrier}
        return await self.next.start_nexus_operation(input)
