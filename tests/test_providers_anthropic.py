"""AnthropicProvider through the real `anthropic` SDK against the local fake server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import anthropic
import pytest

from spine.activities.errors import (
    AuthenticationFailed,
    ContentRefused,
    ContextOverflow,
    DependencyUnavailable,
    ModelRequestRejected,
    RateLimited,
)
from spine.activities.providers import AnthropicProvider, ModelProvider, anthropic_provider_from_env
from spine.payloads import ChatMessage, ProviderRequest, ToolCall, ToolSchema
from tests.fakes.llm_server import FAKE_ANTHROPIC_KEY, FakeLLMServer, FakeToolCall

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
        model="claude-test",
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
async def provider(llm: FakeLLMServer) -> AsyncIterator[AnthropicProvider]:
    client = anthropic.AsyncAnthropic(
        api_key=FAKE_ANTHROPIC_KEY, base_url=llm.base_url_anthropic, max_retries=0
    )
    yield AnthropicProvider(client)
    await client.close()


async def test_text_reply_with_usage(llm: FakeLLMServer, provider: AnthropicProvider) -> None:
    """A text block becomes an assistant message with the reported token usage."""
    llm.enqueue_anthropic("Order A1 shipped yesterday.", input_tokens=42, output_tokens=7)

    response = await provider.complete(ask())

    assert isinstance(provider, ModelProvider)
    assert response.message == ChatMessage(role="assistant", content="Order A1 shipped yesterday.")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (42, 7)
    assert response.model == "claude-test"
    assert response.finish_reason == "stop"


async def test_cached_prompt_tokens_count_as_input(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """Cache-write and cache-read tokens are added to input tokens."""
    llm.enqueue_raw(
        "anthropic",
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 5,
                "output_tokens": 3,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
            },
        },
    )

    response = await provider.complete(ask())

    assert (response.usage.input_tokens, response.usage.output_tokens) == (1105, 3)
    assert response.finish_reason == "length"


async def test_tool_use_is_parsed_with_args(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """A tool_use block comes back as a tool call with args and finish reason tool_calls."""
    llm.enqueue_anthropic(
        "Let me look.",
        tool_calls=[FakeToolCall("lookup_order", {"order_id": "A1"}, id="toolu_1")],
    )

    response = await provider.complete(ask(tools=[LOOKUP]))

    assert response.message.content == "Let me look."
    assert response.message.tool_calls == [
        ToolCall(
            id="toolu_1",
            name="lookup_order",
            args={"order_id": "A1"},
            raw_args='{"order_id": "A1"}',
        )
    ]
    assert response.finish_reason == "tool_calls"
    assert llm.requests[0].body["tools"] == [
        {
            "name": "lookup_order",
            "description": "Find an order by id.",
            "input_schema": LOOKUP.parameters,
        }
    ]


async def test_malformed_input_keeps_raw_text(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """A tool_use input that is not a JSON object gives args None and keeps the raw text."""
    llm.enqueue_anthropic(tool_calls=[FakeToolCall("lookup_order", raw_args='{"order_id": ')])

    response = await provider.complete(ask(tools=[LOOKUP]))

    (call,) = response.message.tool_calls
    assert (call.args, call.raw_args) == (None, '{"order_id": ')


async def test_transcript_maps_to_messages_and_blocks(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """System goes to system=, tool results merge into one user message, errors are flagged."""
    llm.enqueue_anthropic("Refunded.")
    request = ProviderRequest(
        model="claude-test",
        max_tokens=256,
        tools=[LOOKUP],
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Refund A1 and A2"),
            ChatMessage(
                role="assistant",
                content="Looking them up.",
                tool_calls=[
                    ToolCall(id="t1", name="lookup_order", args={"order_id": "A1"}),
                    ToolCall(id="t2", name="lookup_order", args=None, raw_args="{oops"),
                ],
            ),
            ChatMessage(role="tool", tool_call_id="t1", content='{"ok": 1}'),
            ChatMessage(role="tool", tool_call_id="t2", content="not JSON", is_error=True),
            ChatMessage(role="system", content="Policy: refunds need a reason."),
        ],
    )

    await provider.complete(request)

    body = llm.requests[0].body
    assert body["model"] == "claude-test"
    assert body["max_tokens"] == 256
    assert body["system"] == "Be brief.\n\nPolicy: refunds need a reason."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Refund A1 and A2"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking them up."},
                {
                    "type": "tool_use",
                    "id": "t1",
                    "name": "lookup_order",
                    "input": {"order_id": "A1"},
                },
                {"type": "tool_use", "id": "t2", "name": "lookup_order", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": '{"ok": 1}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "t2",
                    "content": "not JSON",
                    "is_error": True,
                },
            ],
        },
    ]


async def test_request_timeout_is_sent_per_call(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """The request's timeout_s is the SDK call's timeout."""
    llm.enqueue_anthropic("ok")

    await provider.complete(ask(timeout_s=12.5))

    assert llm.requests[0].headers["x-stainless-read-timeout"] == "12.5"


async def test_rate_limit_honours_retry_after(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """A 429 with Retry-After: 7 is a retryable RateLimited whose next retry waits 7 s."""
    llm.fail("anthropic", 429, headers={"retry-after": "7"})

    with pytest.raises(RateLimited) as caught:
        await provider.complete(ask())

    assert caught.value.retry_after == 7
    app_error = caught.value.to_application_error()
    assert app_error.type == "RateLimited"
    assert app_error.non_retryable is False
    assert app_error.next_retry_delay == timedelta(seconds=7)


@pytest.mark.parametrize("status", [500, 529])
async def test_server_error_is_dependency_unavailable(
    llm: FakeLLMServer, provider: AnthropicProvider, status: int
) -> None:
    """A 500 or a 529 overload is a retryable DependencyUnavailable."""
    llm.fail("anthropic", status)

    with pytest.raises(DependencyUnavailable) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is False


async def test_bad_key_is_non_retryable(llm: FakeLLMServer, provider: AnthropicProvider) -> None:
    """A 401 is an AuthenticationFailed that Temporal must not retry."""
    llm.fail("anthropic", 401)

    with pytest.raises(AuthenticationFailed, match="invalid x-api-key") as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


@pytest.mark.parametrize(
    "message",
    [
        None,  # Anthropic's own body: "prompt is too long: N tokens > M maximum"
        "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ],
)
async def test_prompt_too_long_is_context_overflow(
    llm: FakeLLMServer, provider: AnthropicProvider, message: str | None
) -> None:
    """A 400 that says the prompt does not fit is a non-retryable ContextOverflow."""
    if message is None:
        llm.fail_context_overflow("anthropic")
    else:
        llm.fail("anthropic", 400, message=message)

    with pytest.raises(ContextOverflow) as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


async def test_other_bad_request_is_rejected(
    llm: FakeLLMServer, provider: AnthropicProvider
) -> None:
    """A 400 for a malformed transcript (tool_use without tool_result) is ModelRequestRejected."""
    request = ProviderRequest(
        model="claude-test",
        messages=[
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", tool_calls=[ToolCall(id="t1", name="x", args={})]),
            ChatMessage(role="user", content="and?"),
        ],
    )

    with pytest.raises(ModelRequestRejected, match="t1"):
        await provider.complete(request)


async def test_slow_answer_times_out(llm: FakeLLMServer, provider: AnthropicProvider) -> None:
    """An answer slower than timeout_s is a retryable DependencyUnavailable, raised promptly."""
    llm.delay("anthropic", 5.0)
    started = time.monotonic()

    with pytest.raises(DependencyUnavailable, match="timed out"):
        await provider.complete(ask(timeout_s=0.3))

    assert time.monotonic() - started < 2.0


async def test_refusal_is_content_refused(llm: FakeLLMServer, provider: AnthropicProvider) -> None:
    """A stop_reason of refusal is a non-retryable ContentRefused."""
    llm.enqueue_anthropic(stop_reason="refusal")

    with pytest.raises(ContentRefused, match="refused") as caught:
        await provider.complete(ask())

    assert caught.value.to_application_error().non_retryable is True


@pytest.mark.parametrize("status", [500, 429, 529])
async def test_factory_client_never_retries(llm: FakeLLMServer, status: int) -> None:
    """The env-built client sends exactly one request per call, even for retryable statuses."""
    llm.fail("anthropic", status)
    llm.enqueue_anthropic("a retry would have succeeded")
    provider = anthropic_provider_from_env(llm.env())

    assert isinstance(provider, AnthropicProvider)
    with pytest.raises((DependencyUnavailable, RateLimited)):
        await provider.complete(ask())
    await provider.aclose()

    assert len(llm.requests_to("anthropic")) == 1


async def test_missing_key_fails_on_first_call(llm: FakeLLMServer) -> None:
    """Without ANTHROPIC_API_KEY the provider builds, and its first call names the variable."""
    provider = anthropic_provider_from_env({"ANTHROPIC_BASE_URL": llm.base_url_anthropic})

    with pytest.raises(AuthenticationFailed, match="'ANTHROPIC_API_KEY'") as caught:
        await provider.complete(ask())

    assert provider.name == "anthropic"
    assert caught.value.to_application_error().non_retryable is True
    assert llm.requests == []


async def test_fake_server_as_async_context_manager() -> None:
    """The fake server starts and stops under `async with`, ending a pending stall at once."""
    async with FakeLLMServer() as server:
        server.delay("anthropic", 30.0)
        provider = anthropic_provider_from_env(server.env())
        assert isinstance(provider, AnthropicProvider)
        with pytest.raises(DependencyUnavailable):
            await provider.complete(ask(timeout_s=0.2))
        await provider.aclose()
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
