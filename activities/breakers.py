"""Circuit breakers per dependency (a model provider, an external service), per worker.

Shared by every run on the worker: after `threshold` consecutive failures of a dependency the
breaker opens and calls fail fast with :class:`DependencyUnavailable` carrying a retry delay, so
Temporal backs off instead of hammering a sick service. After `reset_s` the next call is let
through as a probe (half-open); a success closes the breaker, a failure opens it again.
Built on `purgatory` (asyncio circuit breakers).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState

from spine.activities.errors import (
    DependencyUnavailable,
    NeedsHuman,
    PolicyDenied,
    SecretMissing,
    SecretsUnavailable,
    TerminalError,
)

T = TypeVar("T")

#: Failures that say nothing about the dependency's health.
NOT_COUNTED: list[type[BaseException]] = [
    TerminalError,
    PolicyDenied,
    NeedsHuman,
    SecretsUnavailable,
    SecretMissing,
]


class Breakers:
    def __init__(self, threshold: int = 10, reset_s: float = 30.0) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=threshold, default_ttl=reset_s, exclude=list(NOT_COUNTED)
        )

    async def call(self, dependency: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` under the breaker of `dependency`."""
        breaker = await self._factory.get_breaker(dependency)
        try:
            async with breaker:
                return await fn()
        except OpenedState as opened:
            wait = max(opened.opened_at + self.reset_s - time.time(), 0.5)
            raise DependencyUnavailable(
                f"circuit breaker for {dependency!r} is open after {self.threshold} consecutive "
                f"failures; next probe in {wait:.1f}s",
                retry_after=wait,
            ) from None

    async def state(self, dependency: str) -> str:
        """`closed`, `opened` or `half-opened`."""
        breaker = await self._factory.get_breaker(dependency)
        return breaker.context.state
