"""The provider interface and the helpers both adapters share."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spine.activities.errors import AuthenticationFailed
from spine.contract import MAX_TOKENS_PER_CALL, JsonObject, TokenUsage
from spine.payloads import ProviderRequest, ProviderResponse

# Phrases providers use when a prompt no longer fits: OpenAI ("maximum context length",
# code "context_length_exceeded"), Anthropic ("prompt is too long", "exceed context limit"),
# vLLM/Ollama ("too many tokens", "context window").
_CONTEXT_OVERFLOW = re.compile(
    r"context[ _-]?(length|window|limit|size)|maximum context|too many tokens"
    r"|prompt is too long|input is too long",
    re.IGNORECASE,
)


OnText = Callable[[str], Awaitable[None]]
"""Takes each delta of a streamed answer's text, as it arrives."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a stream that breaks off mid-way raises from the SDKs' HTTP layer (httpx, or the
    httpx2 newer OpenAI SDKs use), besides the SDKs' own connection errors."""
    found: list[type[BaseException]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


STREAM_BROKE = _transport_errors()


@runtime_checkable
class ModelProvider(Protocol):
    """One chat model API behind Spine's provider-neutral request and response.

    Implementations raise `spine.activities.errors.SpineError` subclasses, never SDK exceptions.
    """

    name: str

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Send `request` once (no retries: Temporal owns them) and return the reply."""
        ...


@runtime_checkable
class StreamingProvider(ModelProvider, Protocol):
    """A provider that can also stream: the model activity uses :meth:`stream` when it can."""

    async def stream(self, request: ProviderRequest, on_text: OnText) -> ProviderResponse:
        """Send `request` once as a stream, handing text deltas to `on_text` as they arrive;
        return the whole reply, with the usage the provider reported once."""
        ...


@dataclass
class MissingCredentialsProvider:
    """Stands in for a provider whose API key is not configured.

    The worker still starts; every call fails with a non-retryable `AuthenticationFailed`
    that names the environment variable to set.
    """

    name: str
    env_var: str

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Always raise `AuthenticationFailed` naming the missing variable."""
        raise AuthenticationFailed(
            f"{self.name} provider has no API key: set {self.env_var!r} in the worker's "
            f"environment (any non-empty value for keyless local servers such as Ollama) "
            f"and restart the worker; model {request.model!r} was not called"
        )


def parse_tool_arguments(raw: str) -> JsonObject | None:
    """The model's argument text as a JSON object, or None when it is not one.

    Blank text counts as `{}`: several OpenAI-compatible servers send `""` for tools that
    take no parameters.
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def mentions_context_overflow(*texts: str | None) -> bool:
    """Whether a provider error message says the prompt is longer than the model accepts."""
    return any(text and _CONTEXT_OVERFLOW.search(text) for text in texts)


def reported_usage(input_tokens: object, output_tokens: object) -> TokenUsage:
    """Usage as a provider reported it, made safe to count: numbers that are not whole,
    negative or absurd are counted as not reported (0), which the workflow charges at the
    call's reservation, never as a credit or for free."""

    def count(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            return 0
        return value if 0 <= value <= MAX_TOKENS_PER_CALL else 0

    return TokenUsage(input_tokens=count(input_tokens), output_tokens=count(output_tokens))
