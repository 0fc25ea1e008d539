"""Model provider adapters: one `ModelProvider` interface over OpenAI and Anthropic.

Adapters take an injected SDK client built with `max_retries=0` (Temporal owns retries), send
exactly one request per `complete()` call with `timeout=request.timeout_s`, and raise only
`spine.activities.errors.SpineError` subclasses::

    provider = openai_provider_from_env()          # OPENAI_API_KEY, OPENAI_BASE_URL
    response = await provider.complete(request)    # ProviderRequest -> ProviderResponse

The SDK modules are imported on first use, so `spine.activities.providers.base` (the protocol)
stays cheap to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from spine.activities.providers.base import MissingCredentialsProvider, ModelProvider

if TYPE_CHECKING:
    from spine.activities.providers.anthropic import (
        AnthropicProvider,
        anthropic_provider_from_env,
        classify_anthropic_error,
    )
    from spine.activities.providers.openai import (
        OpenAIProvider,
        classify_openai_error,
        openai_provider_from_env,
    )

# Public name -> submodule that defines it; those submodules import an SDK (~seconds).
_LAZY = {
    "AnthropicProvider": "anthropic",
    "anthropic_provider_from_env": "anthropic",
    "classify_anthropic_error": "anthropic",
    "OpenAIProvider": "openai",
    "classify_openai_error": "openai",
    "openai_provider_from_env": "openai",
}

__all__ = [
    "AnthropicProvider",
    "MissingCredentialsProvider",
    "ModelProvider",
    "OpenAIProvider",
    "anthropic_provider_from_env",
    "classify_anthropic_error",
    "classify_openai_error",
    "openai_provider_from_env",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
