"""Tools: typed async functions that become one Temporal activity each.

A tool is declared with :func:`tool` over ``async def f(args: In, ctx: ToolContext) -> Out`` where
``In`` and ``Out`` are pydantic models. The input model's JSON Schema is what the model sees; the
model's arguments are validated against it in the workflow (before anything is scheduled) and
again in the activity (defence in depth). Outputs are validated, size-limited and scrubbed of any
secret value resolved for the call.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from pydantic import BaseModel, ValidationError
from temporalio import activity

from activities.breakers import Breakers
from activities.errors import (
    SpineError,
    ToolFailed,
    ToolInputInvalid,
    ToolOutputInvalid,
    UnknownTool,
    classify_http,
)
from activities.models import (
    CompensationInput,
    ToolCallInput,
    ToolCallResult,
    ToolDescriptor,
    ToolSchema,
)

MAX_OUTPUT_BYTES = 64 * 1024
REDACTED = "[redacted]"


class ToolDefinitionError(ValueError):
    """A tool or agent is declared wrongly; raised at import or worker start."""


@dataclass(frozen=True)
class SecretRef:
    """A secret a tool needs, by reference. `path` may contain ``{account}``."""

    name: str
    path: str
    key: str
    mount: str = "secret"

    def resolve_path(self, account: str) -> str:
        return self.path.format(account=account)


class SecretResolver(Protocol):
    async def resolve(self, refs: Sequence[SecretRef], account: str) -> dict[str, str]: ...


@dataclass
class ToolContext:
    """What a tool gets besides its arguments. Secrets live here only, never in history."""

    run_id: str
    step: int
    call_id: str
    account: str
    user: str
    idempotency_key: str | None
    attempt: int
    http: httpx.AsyncClient
    settings: Mapping[str, str]
    _secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    def secret(self, name: str) -> str:
        """The value of a declared secret."""
        try:
            return self._secrets[name]
        except KeyError:
            raise ToolDefinitionError(
                f"tool asked for secret {name!r} it did not declare in secrets=[...]"
            ) from None

    def setting(self, name: str, default: str | None = None) -> str:
        """A worker setting (environment by default), e.g. a service URL."""
        value = self.settings.get(name, default)
        if value is None:
            raise ToolFailed(f"worker setting {name!r} is not set; export it before the worker")
        return value


ToolFn = Callable[[BaseModel, ToolContext], Awaitable[BaseModel]]


@dataclass(frozen=True)
class ToolDefinition:
    """A declared tool. Build it with :func:`tool`."""

    name: str
    version: int
    fn: ToolFn
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    description: str
    side_effects: bool
    compensation: str | None
    secrets: tuple[SecretRef, ...]
    start_to_close_s: float
    max_attempts: int
    summary_arg: str | None
    compensates: str | None
    fallback: str | None
    dependency: str
    idempotent_via: str | None

    def descriptor(self) -> ToolDescriptor:
        return ToolDescriptor(
            name=self.name,
            version=self.version,
            description=self.description,
            input_schema=self.input_model.model_json_schema(),
            output_schema=self.output_model.model_json_schema(),
            side_effects=self.side_effects,
            compensation=self.compensation,
            fallback=self.fallback,
            summary_arg=self.summary_arg,
            start_to_close_s=self.start_to_close_s,
            max_attempts=self.max_attempts,
        )

    def schema_for_model(self) -> ToolSchema:
        return ToolSchema(
            name=self.name,
            description=self.description,
            parameters=self.input_model.model_json_schema(),
        )


def tool(
    name: str | None = None,
    *,
    version: int = 1,
    side_effects: bool = False,
    compensation: str | None = None,
    compensates: str | None = None,
    idempotent_via: str | None = None,
    fallback: str | None = None,
    dependency: str | None = None,
    secrets: Sequence[SecretRef] = (),
    timeout_s: float = 30.0,
    max_attempts: int = 8,
    summary_arg: str | None = None,
) -> Callable[[ToolFn], ToolDefinition]:
    """Declare a tool.

    Args:
        name: Tool name the model uses; defaults to the function name.
        version: Contract version; bump it on a breaking change of input or output.
        side_effects: True when the tool changes the outside world. Such a tool always receives
            an idempotency key (``ctx.idempotency_key``) and must pass it on.
        idempotent_via: Required with side effects: how the key reaches the external system
            (e.g. ``"Idempotency-Key header"``). A side-effecting tool without one is refused.
        compensation: Name of the tool that undoes this one (saga).
        compensates: Set on a compensation tool: the tool it undoes. Its input model must be
            :class:`CompensationInput`; it is never offered to the model.
        fallback: A tool to try with the same arguments when this one keeps failing.
        dependency: Circuit-breaker group (an external service); defaults to the tool name.
        secrets: Secrets resolved from Vault right before each call.
        timeout_s: Start-to-close timeout of one attempt.
        max_attempts: Attempts Temporal makes for transient failures.
        summary_arg: Argument shown in the Web UI summary, e.g. ``issue_refund(o-1001)``.
    """

    def wrap(fn: ToolFn) -> ToolDefinition:
        tool_name = name or fn.__name__
        if not inspect.iscoroutinefunction(fn):
            raise ToolDefinitionError(f"tool {tool_name!r} must be an async function")
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
        if len(params) != 2:
            raise ToolDefinitionError(
                f"tool {tool_name!r} must take (args: <pydantic model>, ctx: ToolContext)"
            )
        input_model = hints.get(params[0])
        output_model = hints.get("return")
        for label, model in (("input", input_model), ("output", output_model)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ToolDefinitionError(
                    f"tool {tool_name!r} needs a pydantic {label} model type annotation, "
                    f"got {model!r}"
                )
        if compensates and input_model is not CompensationInput:
            raise ToolDefinitionError(
                f"compensation tool {tool_name!r} must take CompensationInput as its input"
            )
        if (side_effects or compensates) and not idempotent_via:
            raise ToolDefinitionError(
                f"tool {tool_name!r} has side effects but no idempotency key path: declare "
                "idempotent_via='...' (how ctx.idempotency_key reaches the external system)"
            )
        if summary_arg and summary_arg not in input_model.model_fields:  # type: ignore[union-attr]
            raise ToolDefinitionError(
                f"tool {tool_name!r}: summary_arg {summary_arg!r} is not an input field"
            )
        return ToolDefinition(
            name=tool_name,
            version=version,
            fn=fn,
            input_model=input_model,  # type: ignore[arg-type]  # checked above
            output_model=output_model,  # type: ignore[arg-type]  # checked above
            description=inspect.cleandoc(fn.__doc__ or tool_name),
            side_effects=side_effects or bool(compensates),
            compensation=compensation,
            secrets=tuple(secrets),
            start_to_close_s=timeout_s,
            max_attempts=max_attempts,
            summary_arg=summary_arg,
            compensates=compensates,
            fallback=fallback,
            dependency=dependency or tool_name,
            idempotent_via=idempotent_via,
        )

    return wrap


@dataclass(frozen=True)
class AgentDefinition:
    """An agent: instructions, the tools it may use, and its default model."""

    name: str
    instructions: str
    tools: tuple[str, ...]
    default_provider: str = "scripted"
    default_model: str = "scripted"


class Registry:
    """All tools and agents a worker serves, checked for consistency at worker start."""

    def __init__(self) -> None:
        self._tools: dict[tuple[str, int], ToolDefinition] = {}
        self._agents: dict[str, AgentDefinition] = {}

    def add_tool(self, definition: ToolDefinition) -> None:
        key = (definition.name, definition.version)
        if key in self._tools and self._tools[key] is not definition:
            raise ToolDefinitionError(
                f"tool {definition.name!r} version {definition.version} is registered twice"
            )
        self._tools[key] = definition

    def add_agent(self, agent: AgentDefinition) -> None:
        self._agents[agent.name] = agent

    def check(self) -> None:
        """Fail with a clear message on dangling references."""
        names = {name for name, _ in self._tools}
        for t in self._tools.values():
            if t.compensation and t.compensation not in names:
                raise ToolDefinitionError(
                    f"tool {t.name!r} names compensation {t.compensation!r}, which is not "
                    "registered"
                )
            if t.fallback and t.fallback not in names:
                raise ToolDefinitionError(
                    f"tool {t.name!r} names fallback {t.fallback!r}, which is not registered"
                )
            if t.fallback and self.latest(t.fallback).side_effects != t.side_effects:
                raise ToolDefinitionError(
                    f"tool {t.name!r} and its fallback {t.fallback!r} differ in side effects"
                )
        for agent in self._agents.values():
            for tool_name in agent.tools:
                if tool_name not in names:
                    raise ToolDefinitionError(
                        f"agent {agent.name!r} lists tool {tool_name!r}, which is not registered"
                    )

    def latest(self, name: str) -> ToolDefinition:
        versions = [d for (n, _), d in self._tools.items() if n == name]
        if not versions:
            raise UnknownTool(f"no tool named {name!r} is served by this worker")
        return max(versions, key=lambda d: d.version)

    def get(self, name: str, version: int) -> ToolDefinition:
        try:
            return self._tools[(name, version)]
        except KeyError:
            raise UnknownTool(
                f"tool {name!r} version {version} is not served by this worker"
            ) from None

    def agent(self, name: str) -> AgentDefinition:
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise UnknownTool(f"unknown agent {name!r}; this worker serves: {known}") from None

    @property
    def tool_names(self) -> list[str]:
        return sorted({name for name, _ in self._tools})

    @property
    def agents(self) -> list[AgentDefinition]:
        return list(self._agents.values())


def _scrub(value: object, secrets: Sequence[str]) -> object:
    if isinstance(value, str):
        for s in secrets:
            if s:
                value = value.replace(s, REDACTED)
        return value
    if isinstance(value, Mapping):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    return value


async def raise_for_status(response: httpx.Response) -> None:
    """Turn an HTTP error from a tool's dependency into Spine's taxonomy.

    4xx other than 408/409/429 become :class:`ToolFailed` (the model is told and may correct
    itself); everything else goes through :func:`classify_http`.
    """
    if response.is_success:
        return
    await response.aread()
    message = response.text[:500]
    if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 408, 409, 429):
        raise ToolFailed(f"HTTP {response.status_code}: {message}")
    raise classify_http(response.status_code, message, dict(response.headers))


class ToolRunner:
    """Runs tool calls for the activities: validate, inject secrets, call, validate, scrub."""

    def __init__(
        self,
        registry: Registry,
        secrets: SecretResolver,
        http: httpx.AsyncClient,
        settings: Mapping[str, str],
        breakers: Breakers | None = None,
    ) -> None:
        self.registry = registry
        self.secrets = secrets
        self.http = http
        self.settings = settings
        self.breakers = breakers or Breakers()

    async def run(self, call: ToolCallInput, attempt: int = 1) -> ToolCallResult:
        try:
            return await self._run(call, attempt)
        except SpineError as err:
            raise err.to_application_error() from err

    async def _run(self, call: ToolCallInput, attempt: int) -> ToolCallResult:
        definition = self.registry.get(call.tool, call.version)
        try:
            args = definition.input_model.model_validate(call.args)
        except ValidationError as err:
            raise ToolInputInvalid(f"{call.tool}: invalid arguments: {_one_line(err)}") from err
        if definition.side_effects and not call.idempotency_key:
            raise ToolInputInvalid(f"{call.tool} has side effects but no idempotency key was given")
        values = (
            await self.secrets.resolve(definition.secrets, call.account)
            if definition.secrets
            else {}
        )
        ctx = ToolContext(
            run_id=call.run_id,
            step=call.step,
            call_id=call.call_id,
            account=call.account,
            user=call.user,
            idempotency_key=call.idempotency_key,
            attempt=attempt,
            http=self.http,
            settings=self.settings,
            _secrets=values,
        )
        result = await self.breakers.call(
            definition.dependency, lambda: _call_tool(definition, args, ctx)
        )
        try:
            output = definition.output_model.model_validate(result, from_attributes=True)
        except ValidationError as err:
            raise ToolOutputInvalid(f"{call.tool}: invalid output: {_one_line(err)}") from err
        dumped = _scrub(output.model_dump(mode="json"), list(values.values()))
        size = len(json.dumps(dumped))
        if size > MAX_OUTPUT_BYTES:
            raise ToolOutputInvalid(
                f"{call.tool}: output is {size} bytes, above the {MAX_OUTPUT_BYTES}-byte limit; "
                "store large results and return a reference"
            )
        return ToolCallResult(output=dumped, attempt=attempt)  # type: ignore[arg-type]  # _scrub keeps the shape


async def _call_tool(definition: ToolDefinition, args: BaseModel, ctx: ToolContext) -> BaseModel:
    """Call the tool; transport failures of its dependency become transient Spine errors."""
    try:
        return await definition.fn(args, ctx)
    except httpx.TimeoutException as err:
        raise classify_http(408, f"{definition.name}: timed out: {err!r}") from err
    except httpx.TransportError as err:
        raise classify_http(
            503, f"{definition.name}: connection failed: {type(err).__name__}: {err}"
        ) from err


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def make_tool_activities(runner: ToolRunner) -> list[Callable[..., Awaitable[ToolCallResult]]]:
    """One activity per tool name, named ``tool.<name>`` so history reads like the story."""
    activities = []
    for tool_name in runner.registry.tool_names:

        async def run_tool(call: ToolCallInput) -> ToolCallResult:
            return await runner.run(call, attempt=activity.info().attempt)

        run_tool.__name__ = f"tool_{tool_name}"
        activities.append(activity.defn(name=f"tool.{tool_name}")(run_tool))
    return activities
