"""A scriptable local HTTP server that speaks the OpenAI and Anthropic wire formats.

`FakeLLMServer` listens on a free port on 127.0.0.1 and answers the real SDKs
(`openai.AsyncOpenAI`, `anthropic.AsyncAnthropic`) with byte-faithful JSON, so adapters,
activities and whole workflows can be tested end to end without keys or network::

    POST /v1/chat/completions   OpenAI chat completions   (base_url_openai = <base>/v1)
    POST /v1/messages           Anthropic messages        (base_url_anthropic = <base>)

It runs in background threads, so it works the same from sync and async tests::

    with FakeLLMServer() as llm:                     # or: async with FakeLLMServer() as llm
        llm.enqueue_openai("Hello!", input_tokens=12, output_tokens=3)
        llm.enqueue_openai(tool_calls=[FakeToolCall("lookup_order", {"order_id": "A1"})])
        llm.fail("openai", 429, headers={"retry-after": "7"})
        llm.delay("anthropic", 5.0)                  # stall: the client should time out
        provider = openai_provider_from_env(llm.env())
        ...
        assert llm.requests[0].body["messages"][0]["role"] == "system"

Script semantics
    Each endpoint has one FIFO queue. Every request that reaches an endpoint is recorded,
    then takes the next item of that endpoint's queue: a reply (`enqueue_openai`,
    `enqueue_anthropic`, `enqueue_raw`), a fault (`fail`, `fail_context_overflow`), or a stall
    (`delay`). So "fail twice, then answer" is `fail(..., times=2)` followed by `enqueue_*`.
    A stall waits `seconds` and then answers 504; it exists to trip the client's timeout, and
    takes its own queue slot so the retry gets the next scripted item. For a reply that is
    slow but succeeds, pass `delay_s=` to `enqueue_*`.
    A request that finds the queue empty gets HTTP 418 with a body naming the method to call;
    the adapters map 418 to the non-retryable `ModelRequestRejected`, so a missing script
    fails fast instead of being retried.

Request checks (`validate=True`, the default)
    Like the real APIs, the server answers 400 `invalid_request_error` when a transcript is
    malformed: an OpenAI `tool` message that answers no preceding `tool_calls` id, or tool
    calls left unanswered; an Anthropic `tool_use` without a `tool_result` in the next
    message, a `tool_result` whose id is not in the previous assistant message, or an empty
    text block. This catches transcript-mapping bugs in end-to-end tests. A rejected request
    is recorded but consumes no scripted item. Pass `validate=False` to send anything.

Recording
    `requests` lists every request (`RecordedRequest`: endpoint, path, lower-cased headers,
    parsed JSON body, raw bytes) in arrival order, faults and stalls included.
    `wait_for_requests(n)` blocks until `n` have arrived; from async code call it through
    `asyncio.to_thread`.

Streaming
    A request with ``"stream": true`` gets the same scripted reply as server-sent events in the
    provider's streaming wire format (OpenAI chat completion chunks ending in ``[DONE]``, usage in
    the last chunk when ``stream_options.include_usage``; Anthropic's ``message_start`` ...
    ``message_stop`` events, usage in ``message_start`` and ``message_delta``). Pass
    ``stream=StreamShape(chunk_chars=..., delay_s=..., break_after=...)`` to ``enqueue_*`` to
    pace it, or to drop the connection mid-stream.

Malformed tool arguments
    `FakeToolCall(name, raw_args="{not json")` sends the text verbatim: as OpenAI's
    `function.arguments` string, or as Anthropic's `input` (a string where the API promises an
    object, which is what a non-conforming gateway does).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, Self

Endpoint = Literal["openai", "anthropic"]
JsonObject = dict[str, object]

_ROUTES: dict[str, Endpoint] = {
    "/v1/chat/completions": "openai",
    "/v1/messages": "anthropic",
}

FAKE_OPENAI_KEY = "sk-fake-openai-key"
FAKE_ANTHROPIC_KEY = "sk-ant-fake-anthropic-key"

OPENAI_CONTEXT_OVERFLOW_MESSAGE = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted "
    "in 131072 tokens. Please reduce the length of the messages."
)
ANTHROPIC_CONTEXT_OVERFLOW_MESSAGE = "prompt is too long: 210000 tokens > 200000 maximum"


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake model makes.

    Args:
        name: The tool's name.
        args: The arguments, sent as a JSON object.
        raw_args: Sent verbatim instead of `args` (for malformed-argument tests).
        id: The call id; generated (`call_fake_…` / `toolu_fake_…`) when omitted.
    """

    name: str
    args: JsonObject | None = None
    raw_args: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    endpoint: Endpoint | None
    path: str
    headers: dict[str, str]
    body: JsonObject
    raw: bytes


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None
    """Server-sent events, sent one by one (chunked) instead of `body`."""
    chunk_delay_s: float = 0.0
    break_after: int | None = None
    """Drop the connection after this many chunks, without ending the response."""


@dataclass(frozen=True)
class StreamShape:
    """How a streamed reply is sent: text in pieces of `chunk_chars`, `delay_s` apart; with
    `break_after`, the connection drops after that many events (a stream broken mid-way)."""

    chunk_chars: int = 4
    delay_s: float = 0.0
    break_after: int | None = None


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), max(size, 1))] or [""]


def _sse(data: JsonObject | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()


# A queued item: how long to wait, then how to answer a given request body.
_Responder = Callable[[JsonObject], _Answer]


@dataclass(frozen=True)
class _Step:
    delay_s: float
    respond: _Responder


class FakeLLMServer:
    """A scriptable OpenAI + Anthropic server on 127.0.0.1 (see the module docstring).

    Args:
        port: Port to bind; 0 picks a free one.
        validate: Reject malformed transcripts with 400, as the real APIs do.
    """

    def __init__(self, *, port: int = 0, validate: bool = True) -> None:
        self._validate = validate
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._queues: dict[Endpoint, deque[_Step]] = {"openai": deque(), "anthropic": deque()}
        self._requests: list[RecordedRequest] = []
        self._ids = 0
        self._connections: set[socket.socket] = set()
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler, self)
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving (the port is already bound, so requests can be sent at once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.01},
                name=f"fake-llm-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled handlers and close every open connection."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # shutdown() waits for the serve loop's next poll; keep the event loop free meanwhile.
        await asyncio.to_thread(self.stop)

    # -- addresses ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url_openai(self) -> str:
        """What to pass as `AsyncOpenAI(base_url=...)` / `OPENAI_BASE_URL`."""
        return f"{self.base_url}/v1"

    @property
    def base_url_anthropic(self) -> str:
        """What to pass as `AsyncAnthropic(base_url=...)` / `ANTHROPIC_BASE_URL`."""
        return self.base_url

    def env(self) -> dict[str, str]:
        """Environment for `openai_provider_from_env` / `anthropic_provider_from_env`."""
        return {
            "OPENAI_API_KEY": FAKE_OPENAI_KEY,
            "OPENAI_BASE_URL": self.base_url_openai,
            "ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY,
            "ANTHROPIC_BASE_URL": self.base_url_anthropic,
        }

    # -- scripting ------------------------------------------------------------------------

    def enqueue_openai(
        self,
        text: str | None = None,
        *,
        tool_calls: Sequence[FakeToolCall] = (),
        input_tokens: int = 10,
        output_tokens: int = 5,
        finish_reason: str | None = None,
        refusal: str | None = None,
        model: str | None = None,
        delay_s: float = 0.0,
        stream: StreamShape | None = None,
    ) -> None:
        """Queue a chat completion reply (as server-sent chunks when the request streams).

        Args:
            text: The assistant's `content`.
            tool_calls: Function tool calls in `message.tool_calls`.
            input_tokens: `usage.prompt_tokens`.
            output_tokens: `usage.completion_tokens`.
            finish_reason: Defaults to `tool_calls` when there are tool calls, else `stop`.
            refusal: Sets `message.refusal` (the model declined).
            model: The `model` field; defaults to the requested model.
            delay_s: Wait this long before answering.
            stream: How to send it when the request has ``stream: true``.
        """
        calls = [(c, c.id or f"call_fake_{self._next_id()}") for c in tool_calls]
        shape = stream or StreamShape()

        def respond(request: JsonObject) -> _Answer:
            if request.get("stream"):
                return self._openai_stream(
                    request, text, calls, input_tokens, output_tokens, finish_reason, model, shape
                )
            message: JsonObject = {
                "role": "assistant",
                "content": text,
                "refusal": refusal,
                "annotations": [],
            }
            if calls:
                message["tool_calls"] = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": _openai_arguments(call)},
                    }
                    for call, call_id in calls
                ]
            body = {
                "id": f"chatcmpl-fake{self._next_id()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model or request.get("model") or "gpt-fake",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish_reason or ("tool_calls" if calls else "stop"),
                    }
                ],
                "usage": {
                    "prompt_tokens": input_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },
                },
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            return _json_answer(200, body, self._headers("openai"))

        self._push("openai", _Step(delay_s, respond))

    def enqueue_anthropic(
        self,
        text: str | None = None,
        *,
        tool_calls: Sequence[FakeToolCall] = (),
        input_tokens: int = 10,
        output_tokens: int = 5,
        stop_reason: str | None = None,
        model: str | None = None,
        delay_s: float = 0.0,
        stream: StreamShape | None = None,
    ) -> None:
        """Queue a messages reply: a `text` block, then one `tool_use` block per call (as
        server-sent events when the request streams).

        Args:
            text: The text block (omitted when None).
            tool_calls: `tool_use` blocks.
            input_tokens: `usage.input_tokens`.
            output_tokens: `usage.output_tokens`.
            stop_reason: Defaults to `tool_use` when there are tool calls, else `end_turn`;
                `refusal` simulates a declined request.
            model: The `model` field; defaults to the requested model.
            delay_s: Wait this long before answering.
            stream: How to send it when the request has ``stream: true``.
        """
        calls = [(c, c.id or f"toolu_fake_{self._next_id()}") for c in tool_calls]
        shape = stream or StreamShape()

        def respond(request: JsonObject) -> _Answer:
            if request.get("stream"):
                return self._anthropic_stream(
                    request, text, calls, input_tokens, output_tokens, stop_reason, model, shape
                )
            content: list[JsonObject] = []
            if text is not None:
                content.append({"type": "text", "text": text})
            for call, call_id in calls:
                content.append(
                    {
                        "type": "tool_use",
                        "id": call_id,
                        "name": call.name,
                        "input": call.raw_args if call.raw_args is not None else call.args or {},
                    }
                )
            body = {
                "id": f"msg_fake{self._next_id()}",
                "type": "message",
                "role": "assistant",
                "model": model or request.get("model") or "claude-fake",
                "content": content,
                "stop_reason": stop_reason or ("tool_use" if calls else "end_turn"),
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": output_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "service_tier": "standard",
                },
            }
            return _json_answer(200, body, self._headers("anthropic"))

        self._push("anthropic", _Step(delay_s, respond))

    def enqueue_raw(
        self,
        endpoint: Endpoint,
        body: JsonObject | str | bytes,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Queue an arbitrary answer (a dict is sent as JSON, text and bytes verbatim)."""
        if isinstance(body, dict):
            payload = json.dumps(body).encode()
        else:
            payload = body.encode() if isinstance(body, str) else body
        answer = _Answer(status, payload, {**self._headers(endpoint), **(headers or {})})
        self._push(endpoint, _Step(delay_s, lambda _request: answer))

    def fail(
        self,
        endpoint: Endpoint,
        status: int,
        *,
        headers: Mapping[str, str] | None = None,
        message: str | None = None,
        times: int = 1,
    ) -> None:
        """Queue `times` error answers with the provider's error body for `status`.

        Args:
            endpoint: Which API fails.
            status: HTTP status (429, 500, 401, 400, 529, ...).
            headers: Extra response headers, e.g. `{"retry-after": "7"}`.
            message: The error message; a realistic one for `status` when omitted.
            times: How many consecutive requests get this answer.
        """
        for _ in range(times):
            self._push(endpoint, _Step(0.0, self._error(endpoint, status, message, headers)))

    def fail_context_overflow(self, endpoint: Endpoint, *, times: int = 1) -> None:
        """Queue the 400 each provider sends when the prompt exceeds the context window."""
        if endpoint == "openai":
            responder = self._error(
                "openai", 400, OPENAI_CONTEXT_OVERFLOW_MESSAGE, code="context_length_exceeded"
            )
        else:
            responder = self._error("anthropic", 400, ANTHROPIC_CONTEXT_OVERFLOW_MESSAGE)
        for _ in range(times):
            self._push(endpoint, _Step(0.0, responder))

    def delay(self, endpoint: Endpoint, seconds: float, *, times: int = 1) -> None:
        """Queue `times` stalls: wait `seconds`, then answer 504 (to trip client timeouts)."""
        message = f"FakeLLMServer stalled for {seconds}s"
        for _ in range(times):
            self._push(endpoint, _Step(seconds, self._error(endpoint, 504, message)))

    def pending(self, endpoint: Endpoint) -> int:
        """How many scripted items of `endpoint` have not been consumed yet."""
        with self._lock:
            return len(self._queues[endpoint])

    def reset(self) -> None:
        """Drop every scripted item and recorded request."""
        with self._lock:
            for queue in self._queues.values():
                queue.clear()
            self._requests.clear()

    # -- recording ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, endpoint: Endpoint) -> list[RecordedRequest]:
        """The requests that reached `endpoint`, oldest first."""
        return [r for r in self.requests if r.endpoint == endpoint]

    def wait_for_requests(
        self, count: int, *, endpoint: Endpoint | None = None, timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Block until `count` requests (to `endpoint`, if given) have arrived; return them."""

        def matching() -> list[RecordedRequest]:
            return [r for r in self._requests if endpoint is None or r.endpoint == endpoint]

        with self._arrived:
            if not self._arrived.wait_for(lambda: len(matching()) >= count, timeout=timeout):
                raise TimeoutError(
                    f"FakeLLMServer got {len(matching())} of {count} expected requests"
                    f"{f' to {endpoint!r}' if endpoint else ''} within {timeout}s"
                )
            return matching()

    # -- streamed replies -------------------------------------------------------------------

    def _openai_stream(
        self,
        request: JsonObject,
        text: str | None,
        calls: list[tuple[FakeToolCall, str]],
        input_tokens: int,
        output_tokens: int,
        finish_reason: str | None,
        model: str | None,
        shape: StreamShape,
    ) -> _Answer:
        """Chat completion chunks as `stream=True` sends them, usage in the last one."""
        base = {
            "id": f"chatcmpl-fake{self._next_id()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model or request.get("model") or "gpt-fake",
            "system_fingerprint": "fp_fake",
        }

        def chunk(delta: JsonObject, finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], "usage": None})

        chunks = [chunk({"role": "assistant", "content": ""})]
        if text:
            chunks += [chunk({"content": piece}) for piece in _pieces(text, shape.chunk_chars)]
        for index, (call, call_id) in enumerate(calls):
            head = {"index": index, "id": call_id, "type": "function"}
            chunks.append(
                chunk({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
            )
            for piece in _pieces(_openai_arguments(call), shape.chunk_chars * 4):
                chunks.append(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                )
        chunks.append(chunk({}, finish_reason or ("tool_calls" if calls else "stop")))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            }
            chunks.append(_sse({**base, "choices": [], "usage": usage}))
        chunks.append(_sse("[DONE]"))
        return self._stream_answer("openai", chunks, shape)

    def _anthropic_stream(
        self,
        request: JsonObject,
        text: str | None,
        calls: list[tuple[FakeToolCall, str]],
        input_tokens: int,
        output_tokens: int,
        stop_reason: str | None,
        model: str | None,
        shape: StreamShape,
    ) -> _Answer:
        """Messages stream events: message_start (input usage), blocks, message_delta (output
        usage), message_stop."""
        message = {
            "id": f"msg_fake{self._next_id()}",
            "type": "message",
            "role": "assistant",
            "model": model or request.get("model") or "claude-fake",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        chunks = [_sse({"type": "message_start", "message": message}, "message_start")]
        index = 0

        def block(start: JsonObject, deltas: list[JsonObject]) -> None:
            nonlocal index
            chunks.append(
                _sse(
                    {"type": "content_block_start", "index": index, "content_block": start},
                    "content_block_start",
                )
            )
            for delta in deltas:
                chunks.append(
                    _sse(
                        {"type": "content_block_delta", "index": index, "delta": delta},
                        "content_block_delta",
                    )
                )
            chunks.append(
                _sse({"type": "content_block_stop", "index": index}, "content_block_stop")
            )
            index += 1

        if text is not None:
            pieces = _pieces(text, shape.chunk_chars)
            block(
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": piece} for piece in pieces],
            )
        for call, call_id in calls:
            arguments = json.dumps(call.args or {})
            block(
                {"type": "tool_use", "id": call_id, "name": call.name, "input": {}},
                [
                    {"type": "input_json_delta", "partial_json": piece}
                    for piece in _pieces(arguments, shape.chunk_chars * 4)
                ],
            )
        chunks.append(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": stop_reason or ("tool_use" if calls else "end_turn"),
                        "stop_sequence": None,
                    },
                    "usage": {"output_tokens": output_tokens},
                },
                "message_delta",
            )
        )
        chunks.append(_sse({"type": "message_stop"}, "message_stop"))
        return self._stream_answer("anthropic", chunks, shape)

    def _stream_answer(
        self, endpoint: Endpoint, chunks: list[bytes], shape: StreamShape
    ) -> _Answer:
        headers = {**self._headers(endpoint), "content-type": "text/event-stream"}
        return _Answer(
            200,
            b"",
            headers,
            chunks=chunks,
            chunk_delay_s=shape.delay_s,
            break_after=shape.break_after,
        )

    # -- internals ------------------------------------------------------------------------

    def _push(self, endpoint: Endpoint, step: _Step) -> None:
        with self._lock:
            self._queues[endpoint].append(step)

    def _next_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"{self._ids:06d}"

    def _headers(self, endpoint: Endpoint) -> dict[str, str]:
        request_id = f"req_fake{self._next_id()}"
        if endpoint == "openai":
            return {"x-request-id": request_id, "openai-processing-ms": "1"}
        return {"request-id": request_id, "anthropic-organization-id": "org-fake"}

    def _error(
        self,
        endpoint: Endpoint,
        status: int,
        message: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        code: str | None = None,
    ) -> _Responder:
        def respond(_request: JsonObject) -> _Answer:
            all_headers = {**self._headers(endpoint), **(headers or {})}
            if endpoint == "openai":
                kind, default_code, default_message = _OPENAI_ERRORS.get(
                    status, _openai_error_default(status)
                )
                body: JsonObject = {
                    "error": {
                        "message": message or default_message,
                        "type": kind,
                        "param": None,
                        "code": code or default_code,
                    }
                }
            else:
                kind, default_message = _ANTHROPIC_ERRORS.get(
                    status, ("api_error" if status >= 500 else "invalid_request_error", "Error")
                )
                body = {
                    "type": "error",
                    "error": {"type": kind, "message": message or default_message},
                    "request_id": all_headers["request-id"],
                }
            return _json_answer(status, body, all_headers)

        return respond

    def _handle(self, handler: _Handler) -> None:
        path = handler.path.split("?", 1)[0]
        endpoint = _ROUTES.get(path) if handler.command == "POST" else None
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        body: JsonObject = parsed if isinstance(parsed, dict) else {}
        record = RecordedRequest(
            endpoint=endpoint,
            path=path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            raw=raw,
        )
        problem = _transcript_problem(endpoint, body) if endpoint and self._validate else None
        with self._arrived:
            self._requests.append(record)
            self._arrived.notify_all()
            # A rejected request consumes nothing, so the script stays aligned with the test.
            queue = self._queues[endpoint] if endpoint and problem is None else None
            step = queue.popleft() if queue else None

        if endpoint is None:
            answer = _json_answer(404, {"error": {"message": f"no route for {path!r}"}}, {})
        elif problem is not None:
            answer = self._error(endpoint, 400, problem)(body)
        elif step is None:
            method = "enqueue_openai" if endpoint == "openai" else "enqueue_anthropic"
            answer = self._error(
                endpoint,
                418,
                f"FakeLLMServer has no scripted answer for {endpoint!r}: "
                f"call {method}() or fail() before the request",
            )(body)
        else:
            # Waiting on the stop event (not sleeping) lets stop() end a stall at once.
            if step.delay_s and self._stopping.wait(step.delay_s):
                handler.close_connection = True
                return
            answer = step.respond(body)
        handler.send(answer)

    def _track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], fake: FakeLLMServer
    ) -> None:
        self.fake = fake
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, open_=True)

    def finish(self) -> None:
        self.server.fake._track(self.connection, open_=False)
        try:
            super().finish()
        except OSError:
            pass  # the client went away mid-answer (e.g. after its timeout)

    def do_POST(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.server.fake._handle(self)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self.server.fake._handle(self)

    def send(self, answer: _Answer) -> None:
        if answer.chunks is not None:
            self.send_stream(answer)
            return
        try:
            self.send_response(answer.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer.body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client timed out and closed the socket

    def send_stream(self, answer: _Answer) -> None:
        """Server-sent events in HTTP/1.1 chunked encoding; broken off if asked to."""
        assert answer.chunks is not None
        stopping = self.server.fake._stopping
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for sent, chunk in enumerate(answer.chunks):
                if answer.break_after is not None and sent >= answer.break_after:
                    # Gone mid-answer: no terminating chunk, the socket just closes.
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
                if answer.chunk_delay_s and stopping.wait(answer.chunk_delay_s):
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # keep pytest output clean; `requests` records everything


def _json_answer(status: int, body: JsonObject, headers: dict[str, str]) -> _Answer:
    return _Answer(status, json.dumps(body).encode(), headers)


def _openai_arguments(call: FakeToolCall) -> str:
    return call.raw_args if call.raw_args is not None else json.dumps(call.args or {})


# status -> (error.type, error.code, message), as api.openai.com answers.
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", None, "You are not allowed to sample from this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. "
        "Please try again in 7s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def _openai_error_default(status: int) -> tuple[str, str | None, str]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return kind, None, f"HTTP {status}"


# status -> (error.type, message), as api.anthropic.com answers.
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "model: not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per minute.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


def _transcript_problem(endpoint: Endpoint, body: JsonObject) -> str | None:
    """The real API's complaint about a malformed request body, or None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required and must be a non-empty list"
    if endpoint == "openai":
        return _openai_transcript_problem(messages)
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    return _anthropic_transcript_problem(messages)


def _openai_transcript_problem(messages: list[object]) -> str | None:
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}]: expected an object"
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                return (
                    f"Invalid parameter: messages[{index}] with role 'tool' must be a response "
                    f"to a preceeding message with 'tool_calls' (tool_call_id {call_id!r})."
                )
            open_calls.discard(call_id)
            continue
        if open_calls:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(sorted(open_calls))}"
            )
        if role == "assistant":
            calls = message.get("tool_calls") or []
            open_calls = {c.get("id") for c in calls if isinstance(c, dict)}
    if open_calls:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(sorted(open_calls))}"
        )
    return None


def _anthropic_transcript_problem(messages: list[object]) -> str | None:
    previous_tool_uses: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{index}: expected an object"
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        results = {
            b.get("tool_use_id")
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "tool_result"
        }
        if unexpected := results - previous_tool_uses:
            return (
                f"messages.{index}.content: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {', '.join(sorted(map(str, unexpected)))}. Each `tool_result` block "
                "must have a corresponding `tool_use` block in the previous message."
            )
        if missing := previous_tool_uses - results:
            return (
                f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(sorted(missing))}. Each `tool_use` block must "
                "have a corresponding `tool_result` block in the next message."
            )
        if any(
            isinstance(b, dict) and b.get("type") == "text" and not b.get("text") for b in blocks
        ):
            return f"messages.{index}: text content blocks must be non-empty"
        previous_tool_uses = {
            str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"
        }
    return None
