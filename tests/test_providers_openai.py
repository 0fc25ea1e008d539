"""OpenAIProvider through the real `openai` SDK against the local fake server."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import openai
import pytest

from spine.activities.errors import (
    AuthenticationFailed,
    ContentRefused,
    ContextOverflow,
    DependencyUnavailable,
    ModelRequestRejected,
    RateLimited,
)
from spine.activities.providers import ModelProvider, OpenAIProvider, openai_provider_from_env
from spine.activities.providers.openai import TOOL_ERROR_PREFIX
from spine.payloads import ChatMessage, ProviderRequest, ToolCall, ToolSchema
from tests.fakes.llm_server import FAKE_OPENAI_KEY, FakeLLMServer, FakeToolCall

LOOKUP = ToolSchema(
    name="lookup_order",
    description="Find an order by id.",
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    },
)


def ask(text: str = "Where is order A1?", **fields: object) -> ProviderRequest:
    return ProviderRequest(
        model="gpt-test",
        messages=[
            ChatMessage(role="system", content="You are a support agent."),
            ChatMessage(role="user", content=text),
        ],
        **fields,
    )


@pytest.fixture
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
async def provider(llm: FakeLLMServer) -> AsyncIterator[OpenAIProvider]:
    client = openai.AsyncOpenAI(
        api_key=FAKE_OPENAI_KEY, base_url=llm.base_url_openai, max_retries=0
    )
    yield OpenAIProvider(client)
    await client.close()


async def test_text_reply_with_usage(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """A text reply becomes an assistant message with the reported token usage."""
    llm.enqueue_openai("Order A1 shipped yesterday.", input_tokens=42, output_tokens=7)

    response = await provider.complete(ask())

    assert isinstance(provider, ModelProvider)
    assert response.message == ChatMessage(role="assistant", content="Order A1 shipped yesterday.")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (42, 7)
    assert response.model == "gpt-test"
    assert response.finish_reason == "stop"


async def test_tool_call_is_parsed_with_args(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """A function tool call comes back with parsed args, raw text and finish reason tool_calls."""
    llm.enqueue_openai(tool_calls=[FakeToolCall("lookup_order", {"order_id": "A1"}, id="call_1")])

    response = await provider.complete(ask(tools=[LOOKUP]))

    assert response.message.tool_calls == [
        ToolCall(
            id="call_1", name="lookup_order", args={"order_id": "A1"}, raw_args='{"order_id": "A1"}'
        )
    ]
    assert response.finish_reason == "tool_calls"
    sent = llm.requests[0].body
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Find an order by id.",
                "parameters": LOOKUP.parameters,
            },
        }
    ]


@pytest.mark.parametrize("raw", ['{"order_id": "A1"', '["A1"]', "null"])
async def test_malformed_arguments_keep_raw_text(
    llm: FakeLLMServer, provider: OpenAIProvider, raw: str
) -> None:
    """Argument text that is not a JSON object gives args None and keeps the raw text."""
    llm.enqueue_openai(tool_calls=[FakeToolCall("lookup_order", raw_args=raw)])

    response = await provider.complete(ask(tools=[LOOKUP]))

    (call,) = response.message.tool_calls
    assert (call.args, call.raw_args) == (None, raw)


async def test_transcript_maps_to_chat_messages(
    llm: FakeLLMServer, provider: OpenAIProvider
) -> None:
    """System, user, assistant tool calls and tool results (errors marked) reach the wire."""
    llm.enqueue_openai("Refunded.")
    request = ProviderRequest(
        model="gpt-test",
        max_tokens=256,
        tools=[LOOKUP],
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Refund A1 and A2"),
            ChatMessage(
                role="assistant",
                content="Looking them up.",
                tool_calls=[
                    ToolCall(id="c1", name="lookup_order", args={"order_id": "A1"}),
                    ToolCall(id="c2", name="lookup_order", args=None, raw_args="{oops"),
                ],
            ),
            ChatMessage(role="tool", tool_call_id="c1", name="lookup_order", content='{"ok": 1}'),
            ChatMessage(
                role="tool", tool_call_id="c2", content="arguments are not JSON", is_error=True
            ),
        ],
    )

    await provider.complete(request)

    body = llm.requests[0].body
    assert body["model"] == "gpt-test"
    assert body["max_completion_tokens"] == 256
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Refund A1 and A2"},
        {
            "role": "assistant",
            "content": "Looking them up.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {
                        "name": "lookup_order",
                        "arguments": json.dumps({"order_id": "A1"}),
                    },
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": "{oops"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": 1}'},
        {
            "role": "tool",
            "tool_call_id": "c2",
            "content": TOOL_ERROR_PREFIX + "arguments are not JSON",
        },
    ]


def test_the_sdk_request_transform_would_not_change_the_body_spine_builds() -> None:
    """Spine sends its wire form untransformed (`wire_body`): that is only right while the
    SDK's transform is the identity on it. A transcript of every message shape, with a system
    name, tool calls with and without valid arguments, a tool error and a null content."""
    from openai._utils import maybe_transform
    from openai.types.chat import completion_create_params

    from spine.activities.providers.openai import wire_body

    request = ProviderRequest(
        model="gpt-test",
        tools=[LOOKUP],
        messages=[
            ChatMessage(role="system", content="Be brief.", name="policy"),
            ChatMessage(role="user", content="Refund A1", name="ann"),
            ChatMessage(
                role="assistant",
                tool_calls=[
                    ToolCall(id="c1", name="lookup_order", args={"order_id": "A1", "n": [1.5]}),
                    ToolCall(id="c2", name="lookup_order", args=None, raw_args="{oops"),
                ],
            ),
            ChatMessage(role="tool", tool_call_id="c1", content='{"ok": 1}'),
            ChatMessage(role="tool", tool_call_id="c2", content="not JSON", is_error=True),
            ChatMessage(role="assistant", content="Done."),
        ],
    )
    body = {"model": "gpt-test", **wire_body(request)}

    transformed = maybe_transform(body, completion_create_params.CompletionCreateParamsStreaming)

    assert transformed == body
    assert json.dumps(transformed, sort_keys=True) == json.dumps(body, sort_keys=True)


async def test_a_transcript_cannot_steer_the_request_it_is_sent_in(
    llm: FakeLLMServer, provider: OpenAIProvider
) -> None:
    """The body Spine builds is merged into the SDK's request: a tool output or a model's tool
    call that looks like request fields stays text inside its message, and the model, the
    output cap and the tools are the ones Spine asked for."""
    llm.enqueue_openai("ok")
    steer = {"model": "gpt-expensive", "max_completion_tokens": 10**9, "tools": [], "n": 64}
    request = ProviderRequest(
        model="gpt-test",
        max_tokens=64,
        tools=[LOOKUP],
        messages=[
            ChatMessage(role="user", content=json.dumps(steer)),
            ChatMessage(
                role="assistant",
                tool_calls=[ToolCall(id="c1", name="lookup_order", args=steer)],
            ),
            ChatMessage(role="tool", tool_call_id="c1", content=json.dumps(steer)),
        ],
    )

    await provider.complete(request)

    body = llm.requests[0].body
    assert set(body) == {"model", "messages", "tools", "max_completion_tokens"}
    assert (body["model"], body["max_completion_tokens"]) == ("gpt-test", 64)
    assert [t["function"]["name"] for t in body["tools"]] == ["lookup_order"]
    assert body["messages"][0]["content"] == json.dumps(steer)
    assert json.loads(body["messages"][1]["tool_calls"][0]["function"]["arguments"]) == steer
    assert body["messages"][2]["content"] == json.dumps(steer)


async def test_request_timeout_is_sent_per_call(
    llm: FakeLLMServer, provider: OpenAIProvider
) -> None:
    """The request's timeout_s is the SDK call's timeout."""
    llm.enqueue_openai("ok")

    await provider.complete(ask(timeout_s=12.5))

    assert llm.requests[0].headers["x-stainless-read-timeout"] == "12.5"


async def test_rate_limit_honours_retry_after(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """A 429 with Retry-After: 7 is a retryable RateLimited whose next retry waits 7 s."""
    llm.fail("openai", 429, headers={"retry-after": "7"})

    with pytest.raises(RateLimited) as caught:
        await provider.complete(ask())

    assert caught.value.retry_after == 7
    app_error = caught.value.to_application_error()
    assert app_error.type == "RateLimited"
    assert app_error.non_retryable is False
    assert app_error.next_retry_delay == timedelta(seconds=7)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error_is_dependency_unavailable(
    llm: FakeLLMServer, provider: OpenAIProvider, status: int
) -> None:
    """A 5xx is a retryable DependencyUnavailable."""
    llm.fail("openai", status)

    with pytest.raises(DependencyUnavailable) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is False


async def test_bad_key_is_non_retryable(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """A 401 is an AuthenticationFailed that Temporal must not retry."""
    llm.fail("openai", 401)

    with pytest.raises(AuthenticationFailed) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


@pytest.mark.parametrize(
    "message",
    [
        None,  # OpenAI's own body: code context_length_exceeded
        "This model's maximum context length is 8192 tokens. However, you requested 9000.",
        "Input has too many tokens for the model (vLLM).",
    ],
)
async def test_context_length_error_is_context_overflow(
    llm: FakeLLMServer, provider: OpenAIProvider, message: str | None
) -> None:
    """A 400 that says the prompt is too long is a non-retryable ContextOverflow."""
    if message is None:
        llm.fail_context_overflow("openai")
    else:
        llm.fail("openai", 400, message=message)

    with pytest.raises(ContextOverflow) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


async def test_other_bad_request_is_rejected(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """A 400 for a malformed transcript (unanswered tool call) is ModelRequestRejected."""
    request = ProviderRequest(
        model="gpt-test",
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", tool_calls=[ToolCall(id="c1", name="x", args={})]),
            ChatMessage(role="user", content="and?"),
        ],
    )

    with pytest.raises(ModelRequestRejected, match="c1"):
        await provider.complete(request)


async def test_slow_answer_times_out(llm: FakeLLMServer, provider: OpenAIProvider) -> None:
    """An answer slower than timeout_s is a retryable DependencyUnavailable, raised promptly."""
    llm.delay("openai", 5.0)
    started = time.monotonic()

    with pytest.raises(DependencyUnavailable, match="timed out"):
        await provider.complete(ask(timeout_s=0.3))

    assert time.monotonic() - started < 2.0


async def test_unreachable_server_is_dependency_unavailable() -> None:
    """A refused connection is a retryable DependencyUnavailable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = openai.AsyncOpenAI(
        api_key="k", base_url=f"http://127.0.0.1:{closed_port}/v1", max_retries=0
    )

    with pytest.raises(DependencyUnavailable, match="unreachable"):
        await OpenAIProvider(client).complete(ask())
    await client.close()


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ({"refusal": "I can't help with that."}, "refused"),
        ({"text": "", "finish_reason": "content_filter"}, "content filter"),
    ],
)
async def test_refusal_is_content_refused(
    llm: FakeLLMServer, provider: OpenAIProvider, reply: dict[str, str], reason: str
) -> None:
    """A refusal or a content_filter finish is a non-retryable ContentRefused."""
    llm.enqueue_openai(**reply)

    with pytest.raises(ContentRefused, match=reason) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


@pytest.mark.parametrize("status", [500, 429])
async def test_factory_client_never_retries(llm: FakeLLMServer, status: int) -> None:
    """The env-built client sends exactly one request per call, even for retryable statuses."""
    llm.fail("openai", status)
    llm.enqueue_openai("a retry would have succeeded")
    provider = openai_provider_from_env(llm.env())

    assert isinstance(provider, OpenAIProvider)
    with pytest.raises((DependencyUnavailable, RateLimited)):
        await provider.complete(ask())
    await provider.aclose()

    assert len(llm.requests_to("openai")) == 1
    assert llm.requests[0].headers["authorization"] == f"Bearer {FAKE_OPENAI_KEY}"


async def test_missing_key_fails_on_first_call(llm: FakeLLMServer) -> None:
    """Without OPENAI_API_KEY the provider builds, and its first call names the variable."""
    provider = openai_provider_from_env({"OPENAI_BASE_URL": llm.base_url_openai})

    with pytest.raises(AuthenticationFailed, match="'OPENAI_API_KEY'") as caught:
        await provider.complete(ask())

    assert provider.name == "openai"
    assert caught.value.to_application_error().non_retryable is True
    assert llm.requests == []


async def test_unscripted_request_fails_fast(provider: OpenAIProvider) -> None:
    """A request the fake server has no script for is a non-retryable ModelRequestRejected."""
    with pytest.raises(ModelRequestRejected, match="enqueue_openai"):
        await provider.complete(ask())


def test_fake_server_serves_sync_clients() -> None:
    """The fake server works from sync code: scripted items are served in order and recorded."""
    with FakeLLMServer() as server:
        server.fail("openai", 503)
        server.enqueue_openai("second")
        client = openai.OpenAI(api_key="k", base_url=server.base_url_openai, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "1"}])
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "2"}]
        )
        client.close()

        assert reply.choices[0].message.content == "second"
        assert [r.body["messages"] for r in server.wait_for_requests(2)] == [
            [{"role": "user", "content": "1"}],
            [{"role": "user", "content": "2"}],
        ]
        assert server.pending("openai") == 0
