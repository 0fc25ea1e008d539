"""Anthropic messages API with tool_use / tool_result blocks."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Literal

import anthropic
from anthropic.types import (
    Message,
    MessageParam,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

from spine.activities.errors import ContentRefused, DependencyUnavailable, SpineError, classify_http
from spine.activities.providers.base import (
    STREAM_BROKE,
    MissingCredentialsProvider,
    ModelProvider,
    OnText,
    mentions_context_overflow,
    parse_tool_arguments,
    reported_usage,
)
from spine.payloads import ChatMessage, ProviderRequest, ProviderResponse, ToolCall, ToolSchema

DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"

_STOP_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    # The reply was cut off by the context window rather than by max_tokens.
    "model_context_window_exceeded": "length",
}

_BlockParam = TextBlockParam | ToolUseBlockParam | ToolResultBlockParam


class AnthropicProvider:
    """`ModelProvider` over `client.messages.create` with client tools.

    Args:
        client: A client built with `max_retries=0`, so Temporal owns retries.
    """

    name = "anthropic"

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        self._client = client

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Send one message request; raise a `SpineError` on any failure or refusal."""
        system, messages = to_anthropic_messages(request.messages)
        try:
            message = await self._client.messages.create(
                model=request.model,
                max_tokens=request.max_tokens,
                system=system if system is not None else anthropic.omit,
                messages=messages,
                tools=to_anthropic_tools(request.tools) if request.tools else anthropic.omit,
                timeout=request.timeout_s,
            )
        except anthropic.APIError as exc:
            raise classify_anthropic_error(exc) from exc
        return from_anthropic_message(message)

    async def stream(self, request: ProviderRequest, on_text: OnText) -> ProviderResponse:
        """Send one message request as a stream; hand each text delta to `on_text` as it
        arrives and return the whole reply (usage from ``message_start`` and
        ``message_delta``, counted once).

        A stream that breaks off raises `DependencyUnavailable`: the activity fails and Temporal
        retries the whole call; nothing of the broken attempt is charged.
        """
        system, messages = to_anthropic_messages(request.messages)
        try:
            async with self._client.messages.stream(
                model=request.model,
                max_tokens=request.max_tokens,
                system=system if system is not None else anthropic.omit,
                messages=messages,
                tools=to_anthropic_tools(request.tools) if request.tools else anthropic.omit,
                timeout=request.timeout_s,
            ) as stream:
                async for text in stream.text_stream:
                    await on_text(text)
                message = await stream.get_final_message()
        except anthropic.APIError as exc:
            raise classify_anthropic_error(exc) from exc
        except STREAM_BROKE as exc:
            raise DependencyUnavailable(
                f"Anthropic stream broke off: {type(exc).__name__}: {exc}"
            ) from exc
        return from_anthropic_message(message)

    async def aclose(self) -> None:
        """Close the injected client's connection pool (for worker shutdown and tests)."""
        await self._client.close()


def anthropic_provider_from_env(env: Mapping[str, str] | None = None) -> ModelProvider:
    """Build the Anthropic provider from `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL`.

    SDK retries are off. Without a key the worker still starts and each call fails with
    `AuthenticationFailed` naming `ANTHROPIC_API_KEY`.

    Args:
        env: Where to read the variables; `os.environ` when omitted.
    """
    env = os.environ if env is None else env
    api_key = env.get(API_KEY_ENV)
    if not api_key:
        return MissingCredentialsProvider(name=AnthropicProvider.name, env_var=API_KEY_ENV)
    client = anthropic.AsyncAnthropic(
        api_key=api_key,
        base_url=env.get(BASE_URL_ENV) or DEFAULT_ANTHROPIC_BASE_URL,
        max_retries=0,
    )
    return AnthropicProvider(client)


def classify_anthropic_error(exc: anthropic.APIError) -> SpineError:
    """Map an Anthropic SDK error to Spine's taxonomy (the one place that does so)."""
    if isinstance(exc, anthropic.APITimeoutError):
        return DependencyUnavailable(
            "Anthropic request timed out; raise ProviderRequest.timeout_s if the model is slow"
        )
    if isinstance(exc, anthropic.APIConnectionError):
        return DependencyUnavailable(
            f"Anthropic unreachable: {exc.message} (cause: {exc.__cause__!r})"
        )
    if isinstance(exc, anthropic.APIResponseValidationError):
        return DependencyUnavailable(
            f"Anthropic answered HTTP {exc.status_code} with a body the SDK cannot read"
        )
    if not isinstance(exc, anthropic.APIStatusError):
        return DependencyUnavailable(f"Anthropic call failed: {exc.message}")
    api_message = exc.api_message or exc.message
    return classify_http(
        exc.status_code,
        f"Anthropic: {api_message}",
        exc.response.headers,
        context_overflow=exc.status_code == 400 and mentions_context_overflow(api_message),
    )


def to_anthropic_messages(
    messages: list[ChatMessage],
) -> tuple[str | None, list[MessageParam]]:
    """Spine's transcript as `(system, messages)` for the messages API.

    System entries are joined into `system`; tool results become `tool_result` blocks in a
    user message; consecutive entries of one wire role are merged into one message, which
    keeps the user/assistant alternation the API expects (and puts all results for one
    assistant turn in a single user message).
    """
    system_parts: list[str] = []
    turns: list[tuple[Literal["user", "assistant"], list[_BlockParam]]] = []
    for message in messages:
        if message.role == "system":
            if message.content:
                system_parts.append(message.content)
            continue
        role: Literal["user", "assistant"] = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue  # the API rejects empty content
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    wire: list[MessageParam] = [{"role": role, "content": blocks} for role, blocks in turns]
    return ("\n\n".join(system_parts) if system_parts else None), wire


def to_anthropic_tools(tools: list[ToolSchema]) -> list[ToolParam]:
    """Tool schemas as Anthropic client tools."""
    return [
        {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
        for tool in tools
    ]


def from_anthropic_message(message: Message) -> ProviderResponse:
    """The reply as a Spine response; a `refusal` stop raises `ContentRefused`."""
    if message.stop_reason == "refusal":
        raise ContentRefused(
            f"Anthropic refused to answer (message {message.id!r}, stop_reason 'refusal')"
        )
    texts: list[str] = []
    tool_calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            tool_calls.append(_tool_call(block.id, block.name, block.input))
    stop = message.stop_reason or "end_turn"
    finish_reason = _STOP_REASONS.get(stop, stop)
    if tool_calls and finish_reason == "stop":
        # Anthropic-compatible gateways sometimes report end_turn for tool_use replies.
        finish_reason = "tool_calls"
    usage = message.usage
    return ProviderResponse(
        message=ChatMessage(
            role="assistant",
            content="\n\n".join(texts) if texts else None,
            tool_calls=tool_calls,
        ),
        usage=reported_usage(
            # Cached prompt tokens are billed input too; the API reports them separately.
            (usage.input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
            + (usage.cache_read_input_tokens or 0),
            usage.output_tokens or 0,
        ),
        model=message.model,
        finish_reason=finish_reason,
    )


def _blocks(message: ChatMessage) -> list[_BlockParam]:
    blocks: list[_BlockParam] = []
    if message.role == "tool":
        result: ToolResultBlockParam = {
            "type": "tool_result",
            "tool_use_id": message.tool_call_id or "",
        }
        if message.content:
            result["content"] = message.content
        if message.is_error:
            result["is_error"] = True
        return [result]
    if message.content and not message.content.isspace():  # the API rejects blank text
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        # The API only takes an object: a call whose arguments were invalid is replayed as
        # `{}`, and the tool_result that follows tells the model what was wrong.
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.args or {}}
        )
    return blocks


def _tool_call(call_id: str, name: str, raw_input: object) -> ToolCall:
    # The SDK does not validate response bodies, so a non-conforming gateway can hand us an
    # `input` that is not an object; treat it like OpenAI's unparseable argument text.
    if isinstance(raw_input, dict):
        return ToolCall(id=call_id, name=name, args=raw_input, raw_args=json.dumps(raw_input))
    if isinstance(raw_input, str):
        return ToolCall(
            id=call_id, name=name, args=parse_tool_arguments(raw_input), raw_args=raw_input
        )
    return ToolCall(id=call_id, name=name, args=None, raw_args=json.dumps(raw_input))
