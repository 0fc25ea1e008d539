"""Trace-context headers without a server: the same header Temporal's OpenTelemetry interceptor
writes and reads, and hostile headers ignored rather than raised."""

from __future__ import annotations

import json

import opentelemetry.baggage
import opentelemetry.trace as otel_trace
import pytest
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from temporalio.api.common.v1 import Payload
from temporalio.contrib.opentelemetry import _otel_interceptor as temporal_otel

from spine.observability.propagation import HEADER, MAX_HEADER_BYTES, decode, encode

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


def _context(*, baggage: dict[str, str] | None = None) -> Context:
    span = NonRecordingSpan(
        SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    )
    context = otel_trace.set_span_in_context(span)
    for key, value in (baggage or {}).items():
        context = opentelemetry.baggage.set_baggage(key, value, context)
    return context


def _span_context(context: Context | None) -> SpanContext:
    assert context is not None
    return otel_trace.get_current_span(context).get_span_context()


def test_the_header_is_the_one_temporal_interceptor_writes_and_reads() -> None:
    context = _context(baggage={"tenant": "acme"})
    ours = encode(context)
    assert ours is not None
    token = opentelemetry.context.attach(context)
    try:
        theirs = temporal_otel._context_to_headers({})[HEADER]
    finally:
        opentelemetry.context.detach(token)
    assert ours == theirs  # byte for byte: workers of either kind read each other's headers
    back = decode({HEADER: theirs})
    assert (_span_context(back).trace_id, _span_context(back).span_id) == (TRACE_ID, SPAN_ID)
    assert opentelemetry.baggage.get_baggage("tenant", back) == "acme"
    read_by_temporal = temporal_otel._headers_to_context({HEADER: ours})
    assert _span_context(read_by_temporal).span_id == SPAN_ID


def test_no_context_no_header_and_no_header_no_context() -> None:
    assert encode(Context()) is None
    assert decode({}) is None


def _payload(data: bytes, encoding: bytes = b"json/plain") -> Payload:
    return Payload(metadata={"encoding": encoding}, data=data)


@pytest.mark.parametrize(
    "header",
    [
        _payload(b"{not json"),
        _payload(b'["traceparent"]'),
        _payload(b'{"traceparent": 7}'),
        _payload(b'{"traceparent": ["00-a-b-01"]}'),
        _payload(b'{"traceparent": "00-zz-yy-01"}'),
        _payload(b'"just a string"'),
        _payload(b"\x00\xff", encoding=b"binary/plain"),
        _payload(b"{}", encoding=b"no/such-encoding"),
        _payload(
            json.dumps(
                {
                    "traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01",
                    "x": "y" * MAX_HEADER_BYTES,
                }
            ).encode()
        ),
    ],
    ids=[
        "not-json",
        "a-list",
        "a-number",
        "a-list-value",
        "bad-traceparent",
        "a-string",
        "binary",
        "unknown-encoding",
        "too-big",
    ],
)
def test_a_hostile_header_is_ignored_never_raised(header: Payload) -> None:
    """A starter or signaller sends the header: what does not parse carries no context (a raise
    would fail the workflow task of the run it was sent to, again and again)."""
    context = decode({HEADER: header})
    if context is not None:  # parsed as a carrier, but no valid span in it
        assert not _span_context(context).is_valid


def test_a_header_is_decoded_once() -> None:
    header = encode(_context())
    assert header is not None
    assert decode({HEADER: header}) is decode({HEADER: header})
