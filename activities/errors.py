"""Spine's error taxonomy, and the one place that classifies failures.

Every failure an activity raises is turned into a Temporal `ApplicationError` whose `type` is one
of these class names, so workflows and operators can tell them apart in history and the Web UI::

    SpineError
     +-- TransientError            retried by Temporal with backoff; honours Retry-After
     |    +-- DependencyUnavailable    5xx, 408, 409, connection errors, timeouts
     |    +-- RateLimited              429
     |    +-- SecretsUnavailable       Vault down or sealed
     +-- TerminalError             never retried
     |    +-- ModelRequestRejected     400/404/422 from a model provider
     |    +-- AuthenticationFailed     401/403
     |    +-- ContextOverflow          the transcript no longer fits the model
     |    +-- ContentRefused           the provider refused to answer
     |    +-- ToolInputInvalid         arguments fail the tool's input schema
     |    +-- ToolOutputInvalid        a tool returned something outside its output schema
     |    +-- UnknownTool              no tool of that name/version is served by this worker
     |    +-- SecretMissing            a secret reference that does not exist or is denied
     |    +-- TranscriptUnavailable    the transcript store lacks the prefix the workflow expects
     |    +-- ToolFailed               the business system said no (e.g. refund above total)
     +-- PolicyDenied              the control plane refused; not retried
     +-- NeedsHuman                only a person can resolve this

This module imports only the standard library and `temporalio`, so workflow code may import it.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from datetime import timedelta

from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError


class SpineError(Exception):
    """Base of every error Spine raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def copy(self) -> SpineError:
        """The same error as a new object, for each of several waiters (one exception raised in
        many tasks would collect all their tracebacks)."""
        try:
            return type(self)(self.message, retry_after=self.retry_after)
        except TypeError:  # a subclass with a constructor of its own
            return self

    def to_application_error(self) -> ApplicationError:
        """The Temporal form: type is the class name, retryability from the taxonomy."""
        return ApplicationError(
            self.message,
            type=type(self).__name__,
            non_retryable=not self.retryable,
            next_retry_delay=(
                timedelta(seconds=self.retry_after) if self.retry_after is not None else None
            ),
        )


class TransientError(SpineError):
    retryable = True


class DependencyUnavailable(TransientError):
    pass


class RateLimited(TransientError):
    pass


class SecretsUnavailable(TransientError):
    pass


class AgentNotServed(TransientError):
    """This worker does not serve the run's agent. Retryable on purpose: the task goes back to
    the queue for another worker on it (refuse and requeue, instead of failing the run)."""


class TerminalError(SpineError):
    retryable = False


class ModelRequestRejected(TerminalError):
    pass


class AuthenticationFailed(TerminalError):
    pass


class ContextOverflow(TerminalError):
    pass


class ContentRefused(TerminalError):
    pass


class ToolInputInvalid(TerminalError):
    pass


class ToolOutputInvalid(TerminalError):
    pass


class UnknownTool(TerminalError):
    pass


class SecretMissing(TerminalError):
    pass


class TranscriptUnavailable(TerminalError):
    pass


class ToolFailed(TerminalError):
    pass


class ModelAnswerInvalid(TerminalError):
    """The provider's answer cannot be taken (too large, malformed); retrying would pay again."""


class AuditWriteFailed(TerminalError):
    """The audit entries a model call carried could not be stored. Terminal for that call:
    the workflow writes them through `spine.audit_append` instead (and parks if that fails)."""


class PolicyDenied(SpineError):
    retryable = False


class NeedsHuman(SpineError):
    retryable = False


#: Error types a workflow must never retry; handed to `RetryPolicy.non_retryable_error_types`.
NON_RETRYABLE_TYPES: list[str] = [
    cls.__name__
    for cls in (
        TerminalError,
        ModelRequestRejected,
        AuthenticationFailed,
        ContextOverflow,
        ContentRefused,
        ToolInputInvalid,
        ToolOutputInvalid,
        UnknownTool,
        SecretMissing,
        TranscriptUnavailable,
        ToolFailed,
        ModelAnswerInvalid,
        AuditWriteFailed,
        PolicyDenied,
        NeedsHuman,
    )
]

#: What the agent loop does with a call that failed for good, by error type. The model made a
#: mistake it can correct: it is told, and the run goes on.
MODEL_CORRECTABLE: frozenset[str] = frozenset(
    cls.__name__ for cls in (ToolInputInvalid, ToolFailed, PolicyDenied)
)
#: Retrying or waiting will not help: the run ends (and compensates). Everything else that is
#: left after retries and alternate paths (a dependency that stays down, a secret that is
#: missing, an unexpected exception) parks the run for an operator.
TERMINAL: frozenset[str] = frozenset(
    cls.__name__
    for cls in (
        ModelRequestRejected,
        ModelAnswerInvalid,
        ContextOverflow,
        ContentRefused,
        ToolOutputInvalid,
        UnknownTool,
        TranscriptUnavailable,
    )
)

MAX_RETRY_AFTER_S = 300.0


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` / `retry-after` (delta seconds or HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    if (ms := lowered.get("retry-after-ms")) is not None:
        try:
            return min(max(float(ms) / 1000.0, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_S)


def classify_http(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    context_overflow: bool = False,
) -> SpineError:
    """Map an HTTP status from any dependency to Spine's taxonomy.

    408/409/429/5xx are transient (429 and 503 honour Retry-After); 401/403 are authentication
    failures; other 4xx are rejected requests; `context_overflow` marks a 400 that says the
    prompt was too long.
    """
    retry_after = parse_retry_after(headers)
    if status == 429:
        return RateLimited(f"rate limited (HTTP 429): {message}", retry_after=retry_after)
    if status in (408, 409) or status >= 500:
        return DependencyUnavailable(
            f"dependency unavailable (HTTP {status}): {message}", retry_after=retry_after
        )
    if status in (401, 403):
        return AuthenticationFailed(f"authentication failed (HTTP {status}): {message}")
    if context_overflow:
        return ContextOverflow(f"context overflow (HTTP {status}): {message}")
    return ModelRequestRejected(f"request rejected (HTTP {status}): {message}")


def failure_text(err: BaseException) -> tuple[str, str]:
    """(type, message) of the innermost failure behind an activity or child-workflow error:
    the Spine error type (e.g. ``DependencyUnavailable``) and its one-line message."""
    cause: BaseException | None = err
    while isinstance(cause, ActivityError | ChildWorkflowError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError", cause.message
    return type(cause).__name__, str(cause)
