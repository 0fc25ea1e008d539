"""OpenAI chat completions (and OpenAI-compatible servers such as Ollama or vLLM)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Literal

import openai
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
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

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
API_KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"

#: Prefix that marks a failed tool result: chat completions has no `is_error` flag.
TOOL_ERROR_PREFIX = "[tool error] "

_FINISH_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


class OpenAIProvider:
    """`ModelProvider` over `client.chat.completions.create` with function tools.

    Args:
        client: A client built with `max_retries=0`, so Temporal owns retries.
        max_tokens_param: The request field that caps output. OpenAI's current models want
            `max_completion_tokens`; some older OpenAI-compatible servers only know
            `max_tokens`.
    """

    name = "openai"

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        *,
        max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens",
    ) -> None:
        self._client = client
        self._max_tokens_param = max_tokens_param

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Send one chat completion; raise a `SpineError` on any failure or refusal."""
        cap_completion = self._max_tokens_param == "max_completion_tokens"
        try:
            completion = await self._client.chat.completions.create(
                model=request.model,
                messages=openai.omit,  # in the body as built: see `wire_body`
                max_completion_tokens=request.max_tokens if cap_completion else openai.omit,
                max_tokens=openai.omit if cap_completion else request.max_tokens,
                extra_body=wire_body(request),
                timeout=request.timeout_s,
            )
        except openai.APIError as exc:
            raise classify_openai_error(exc) from exc
        return from_openai_completion(completion)

    async def stream(self, request: ProviderRequest, on_text: OnText) -> ProviderResponse:
        """Send one chat completion with ``stream=True``; hand each text delta to `on_text` as
        it arrives and return the whole answer (usage from the stream's last chunk).

        A stream that breaks off raises `DependencyUnavailable`: the activity fails and Temporal
        retries the whole call; nothing of the broken attempt is charged.
        """
        cap_completion = self._max_tokens_param == "max_completion_tokens"
        try:
            async with self._client.chat.completions.stream(
                model=request.model,
                messages=openai.omit,  # in the body as built: see `wire_body`
                max_completion_tokens=request.max_tokens if cap_completion else openai.omit,
                max_tokens=openai.omit if cap_completion else request.max_tokens,
                stream_options={"include_usage": True},
                extra_body=wire_body(request),
                timeout=request.timeout_s,
            ) as stream:
                async for event in stream:
                    if event.type == "content.delta" and event.delta:
                        await on_text(event.delta)
                completion = await stream.get_final_completion()
        except openai.APIError as exc:
            raise classify_openai_error(exc) from exc
        except STREAM_BROKE as exc:
            raise DependencyUnavailable(
                f"OpenAI stream broke off: {type(exc).__name__}: {exc}"
            ) from exc
        return from_openai_completion(completion)

    async def aclose(self) -> None:
        """Close the injected client's connection pool (for worker shutdown and tests)."""
        await self._client.close()


def openai_provider_from_env(env: Mapping[str, str] | None = None) -> ModelProvider:
    """Build the OpenAI provider from `OPENAI_API_KEY` and `OPENAI_BASE_URL`.

    SDK retries are off. Without a key the worker still starts and each call fails with
    `AuthenticationFailed` naming `OPENAI_API_KEY`.

    Args:
        env: Where to read the variables; `os.environ` when omitted.
    """
    env = os.environ if env is None else env
    api_key = env.get(API_KEY_ENV)
    if not api_key:
        return MissingCredentialsProvider(name=OpenAIProvider.name, env_var=API_KEY_ENV)
    client = openai.AsyncOpenAI(
        api_key=api_key,
        base_url=env.get(BASE_URL_ENV) or DEFAULT_OPENAI_BASE_URL,
        max_retries=0,
    )
    return OpenAIProvider(client)


def classify_openai_error(exc: openai.APIError) -> SpineError:
    """Map an OpenAI SDK error to Spine's taxonomy (the one place that does so)."""
    if isinstance(exc, openai.APITimeoutError):
        return DependencyUnavailable(
            "OpenAI request timed out; raise ProviderRequest.timeout_s if the model is slow"
        )
    if isinstance(exc, openai.APIConnectionError):
        return DependencyUnavailable(
            f"OpenAI unreachable: {exc.message} (cause: {exc.__cause__!r})"
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return DependencyUnavailable(
            f"OpenAI answered HTTP {exc.status_code} with a body the SDK cannot read"
        )
    if not isinstance(exc, openai.APIStatusError):
        return DependencyUnavailable(f"OpenAI call failed: {exc.message}")
    api_message = _error_body_message(exc.body) or exc.message
    return classify_http(
        exc.status_code,
        f"OpenAI: {api_message}",
        exc.response.headers,
        context_overflow=exc.status_code == 400
        and (exc.code == "context_length_exceeded" or mentions_context_overflow(api_message)),
    )


def wire_body(request: ProviderRequest) -> dict[str, object]:
    """The transcript and tools in chat-completions form, sent as the request body as built.

    The SDK's typed arguments go through its request transform, which walks every message
    against every member of the message-type union: tens of milliseconds of CPU for an
    80-message transcript (O(messages) per call, so O(steps²) over a run; measured by
    ``python -m bench.provider_cpu``), and the identity for these
    plain JSON values (no aliases, no formats; `tests/test_providers_openai.py` checks that it
    still is). Spine builds the wire form itself, so it goes in ``extra_body`` untransformed.
    """
    body: dict[str, object] = {"messages": to_openai_messages(request.messages)}
    if request.tools:
        body["tools"] = to_openai_tools(request.tools)
    return body


def to_openai_messages(messages: list[ChatMessage]) -> list[ChatCompletionMessageParam]:
    """Spine's transcript in chat-completions form."""
    wire: list[ChatCompletionMessageParam] = []
    for message in messages:
        match message.role:
            case "system":
                system: ChatCompletionSystemMessageParam = {
                    "role": "system",
                    "content": message.content or "",
                }
                if message.name:
                    system["name"] = message.name
                wire.append(system)
            case "user":
                user: ChatCompletionUserMessageParam = {
                    "role": "user",
                    "content": message.content or "",
                }
                if message.name:
                    user["name"] = message.name
                wire.append(user)
            case "assistant":
                assistant: ChatCompletionAssistantMessageParam = {
                    "role": "assistant",
                    # content may only be null when the message carries tool calls
                    "content": message.content or (None if message.tool_calls else ""),
                }
                if message.tool_calls:
                    assistant["tool_calls"] = [_tool_call_param(c) for c in message.tool_calls]
                wire.append(assistant)
            case "tool":
                content = message.content or ""
                tool: ChatCompletionToolMessageParam = {
                    "role": "tool",
                    "tool_call_id": message.tool_call_id or "",
                    "content": TOOL_ERROR_PREFIX + content if message.is_error else content,
                }
                wire.append(tool)
    return wire


def to_openai_tools(tools: list[ToolSchema]) -> list[ChatCompletionFunctionToolParam]:
    """Tool schemas as chat-completions function tools."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]


def from_openai_completion(completion: ChatCompletion) -> ProviderResponse:
    """The first choice as a Spine response; refusals raise `ContentRefused`."""
    if not completion.choices:
        raise DependencyUnavailable(f"OpenAI returned no choices (completion {completion.id!r})")
    choice = completion.choices[0]
    message = choice.message
    if message.refusal:
        raise ContentRefused(f"OpenAI refused to answer: {message.refusal}")
    if choice.finish_reason == "content_filter":
        raise ContentRefused(
            "OpenAI withheld the answer: its content filter flagged the prompt or the reply"
        )
    tool_calls: list[ToolCall] = []
    for call in message.tool_calls or []:
        if call.type == "function":
            raw = call.function.arguments
            tool_calls.append(
                ToolCall(
                    id=call.id,
                    name=call.function.name,
                    args=parse_tool_arguments(raw),
                    raw_args=raw,
                )
            )
        else:  # a free-form "custom" tool call: its input is text, never a JSON object
            tool_calls.append(
                ToolCall(id=call.id, name=call.custom.name, args=None, raw_args=call.custom.input)
            )
    finish_reason = _FINISH_REASONS.get(choice.finish_reason, choice.finish_reason)
    if tool_calls and finish_reason == "stop":
        # Ollama and some vLLM versions report "stop" even when the reply is tool calls.
        finish_reason = "tool_calls"
    usage = completion.usage
    return ProviderResponse(
        message=ChatMessage(role="assistant", content=message.content, tool_calls=tool_calls),
        usage=reported_usage(
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0
        ),
        model=completion.model,
        finish_reason=finish_reason,
    )


def _tool_call_param(call: ToolCall) -> ChatCompletionMessageFunctionToolCallParam:
    # Replay what the model said; invalid argument text is sent back verbatim so the model
    # sees the mistake the tool result explains.
    if call.args is not None:
        arguments = json.dumps(call.args)
    else:
        arguments = call.raw_args or ""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _error_body_message(body: object) -> str | None:
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return error["message"]
    return None
