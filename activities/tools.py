"""Tools: typed async functions that become one Temporal activity each.

A tool is declared with :func:`tool` over ``async def f(args: In, ctx: ToolContext) -> Out`` where
``In`` and ``Out`` are pydantic models. The input model's JSON Schema is what the model sees; the
model's arguments are validated against it in the workflow (before anything is scheduled) and
again in the activity (defence in depth). Outputs are validated, size-limited and scrubbed of any
secret value resolved for the call.

A tool whose input is given by a JSON Schema rather than fields (an MCP server's tool, say) takes
a :func:`json_schema_model` as its input model: the schema is what the model sees and what
arguments are validated against, in the workflow and here.

Declaration mistakes raise :class:`ToolDefinitionError` naming the tool: at decoration for what
one definition shows, and in :meth:`Registry.check` at worker start for every definition (also
ones built without :func:`tool`) and every cross-reference.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, TypeVar, get_args

import httpx
import jsonschema
from pydantic import BaseModel, RootModel, ValidationError, model_validator
from temporalio import activity

from spine.activities.blobs import (
    DEFAULT_INLINE_BYTES,
    DEFAULT_MAX_OUTPUT_BYTES,
    REF_KEY,
    BlobStore,
    ref_digest,
    reference,
)
from spine.activities.blobs import encode as encode_output
from spine.activities.breakers import Breakers
from spine.activities.errors import (
    AgentNotServed,
    AuthenticationFailed,
    DependencyUnavailable,
    SecretMissing,
    SpineError,
    ToolFailed,
    ToolInputInvalid,
    ToolOutputInvalid,
    UnknownTool,
    classify_http,
)
from spine.activities.heartbeat import heartbeating
from spine.contract import ACCOUNT_PATTERN, JsonObject, tool_activity
from spine.guardrails import taint
from spine.guardrails.scrub import Scrubber
from spine.payloads import (
    AgentAnswer,
    AgentTask,
    CompensationInput,
    ReconcileAnswer,
    ReconcileQuery,
    ToolCallInput,
    ToolCallResult,
    ToolDescriptor,
    ToolSchema,
)

#: Without a blob store (no claim check) outputs above this are refused, as before.
MAX_OUTPUT_BYTES = 64 * 1024

Risk = Literal["low", "medium", "high"]
"""How much harm a wrong call can do; recorded in the lock file, shown to reviewers."""

#: A local activity runs inside the workflow task, so a local tool must be quick.
MAX_LOCAL_TIMEOUT_S = 10.0
#: Tool names the providers accept (OpenAI and Anthropic share this rule).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ACCOUNT = re.compile(ACCOUNT_PATTERN)


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
        """The secret's path for `account`; an account name that could climb out of its own
        path (``globex/../acme``) is refused before any path is built."""
        if not _ACCOUNT.match(account):
            raise SecretMissing(f"account {account[:80]!r} is not a valid account name")
        return self.path.format(account=account)


class SecretResolver(Protocol):
    """Where tools' secrets come from. A resolver that caches may also offer
    ``invalidate(refs, account) -> bool`` (forget cached values; True if any was cached)."""

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
InputT = TypeVar("InputT", bound=BaseModel)
OutputT = TypeVar("OutputT", bound=BaseModel)


class JsonArguments(RootModel[dict[str, object]]):
    """Tool input given by an explicit JSON Schema instead of pydantic fields.

    Build subclasses with :func:`json_schema_model`; the tool reads its arguments from ``.root``.
    """

    json_schema: ClassVar[JsonObject] = {"type": "object"}

    @classmethod
    def model_json_schema(cls, *args: object, **kwargs: object) -> dict[str, object]:  # type: ignore[override]  # the pinned schema, whatever the options
        return copy.deepcopy(cls.json_schema)

    @model_validator(mode="after")
    def _matches_schema(self) -> JsonArguments:
        validator = jsonschema.Draft202012Validator(type(self).json_schema)
        errors = sorted(validator.iter_errors(self.root), key=lambda e: list(e.path))
        if errors:
            raise ValueError(
                "; ".join(
                    f"{'.'.join(str(p) for p in e.path) or '(arguments)'}: {e.message}"
                    for e in errors[:5]
                )
            )
        return self


def json_schema_model(name: str, schema: Mapping[str, object]) -> type[JsonArguments]:
    """An input model for a tool whose arguments are described by a JSON Schema object.

    Raises:
        ToolDefinitionError: the schema is not a valid JSON Schema for an object.
    """
    pinned = copy.deepcopy(dict(schema))
    pinned.setdefault("type", "object")
    if pinned["type"] != "object":
        raise ToolDefinitionError(
            f"tool {name!r}: input schema must describe an object, not {pinned['type']!r}"
        )
    try:
        jsonschema.Draft202012Validator.check_schema(pinned)
    except jsonschema.SchemaError as err:
        raise ToolDefinitionError(f"tool {name!r}: invalid input schema: {err.message}") from err
    return type(f"{name}_arguments", (JsonArguments,), {"json_schema": pinned})


@functools.cache
def _json_schema(model: type[BaseModel]) -> JsonObject:
    """A model's JSON Schema, generated once per model (pydantic rebuilds it on every call)."""
    return model.model_json_schema()


def _is_model(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


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
    risk: Risk = "low"
    rate_limit_group: str | None = None
    local: bool = False
    untrusted_output: bool = False
    reconcile: str | None = None
    reconciles: str | None = None
    sub_agent: str | None = None
    handoff: bool = False
    sub_agent_max_usd: float | None = None

    def problems(self) -> list[str]:
        """What is wrong with this definition on its own, each naming the tool; empty if fine."""
        name = self.name
        found = []
        if not TOOL_NAME.match(name):
            found.append(f"tool {name!r}: name must match {TOOL_NAME.pattern} (provider rule)")
        if self.version < 1:
            found.append(f"tool {name!r}: version must be 1 or more, got {self.version}")
        for label, model in (("input", self.input_model), ("output", self.output_model)):
            if not _is_model(model):
                found.append(
                    f"tool {name!r} needs a pydantic {label} model type annotation, got {model!r}"
                )
        if self.compensates and self.input_model is not CompensationInput:
            found.append(f"compensation tool {name!r} must take CompensationInput as its input")
        if self.side_effects and not self.idempotent_via and not self.reconcile:
            found.append(
                f"tool {name!r} has side effects but no idempotency key path: declare "
                "idempotent_via='...' (how ctx.idempotency_key reaches the external system), "
                "or, for an API without idempotency keys, reconcile='<read tool>'"
            )
        if self.sub_agent_max_usd is not None and not self.sub_agent_max_usd > 0:
            found.append(f"sub-agent tool {name!r}: max_usd must be above 0")
        if self.reconcile and not self.side_effects:
            found.append(f"tool {name!r} declares reconcile= but has no side effects")
        if self.reconciles:
            if self.side_effects:
                found.append(f"reconcile tool {name!r} must be read-only (no side effects)")
            if self.input_model is not ReconcileQuery or self.output_model is not ReconcileAnswer:
                found.append(
                    f"reconcile tool {name!r} must take ReconcileQuery and return ReconcileAnswer"
                )
        if self.risk not in get_args(Risk):
            found.append(
                f"tool {name!r}: risk must be one of {', '.join(get_args(Risk))}, got {self.risk!r}"
            )
        if self.rate_limit_group is not None and not self.rate_limit_group.strip():
            found.append(f"tool {name!r}: rate_limit_group must be a non-empty name or None")
        if self.local and self.side_effects:
            found.append(
                f"tool {name!r} is local=True but has side effects: local activities are for "
                "fast read-only tools; drop local=True"
            )
        if self.local and self.start_to_close_s > MAX_LOCAL_TIMEOUT_S:
            found.append(
                f"tool {name!r} is local=True with timeout_s={self.start_to_close_s:g}; a local "
                f"tool must finish within {MAX_LOCAL_TIMEOUT_S:g}s, or drop local=True"
            )
        if self.summary_arg and _is_model(self.input_model):
            fields = self.input_model.model_fields
            props = self.input_schema().get("properties") if not fields else fields
            if not (isinstance(props, Mapping) and self.summary_arg in props):
                found.append(
                    f"tool {name!r}: summary_arg {self.summary_arg!r} is not an input field"
                )
        return found

    def input_schema(self) -> JsonObject:
        """The JSON Schema the model sees and arguments are validated against."""
        return copy.deepcopy(_json_schema(self.input_model))

    def output_schema(self) -> JsonObject:
        return copy.deepcopy(_json_schema(self.output_model))

    def descriptor(self) -> ToolDescriptor:
        return ToolDescriptor(
            name=self.name,
            version=self.version,
            description=self.description,
            input_schema=self.input_schema(),
            output_schema=self.output_schema(),
            side_effects=self.side_effects,
            compensation=self.compensation,
            fallback=self.fallback,
            summary_arg=self.summary_arg,
            start_to_close_s=self.start_to_close_s,
            max_attempts=self.max_attempts,
            risk=self.risk,
            rate_limit_group=self.rate_limit_group,
            local=self.local,
            untrusted_output=self.untrusted_output,
            reconcile=self.reconcile,
            sub_agent=self.sub_agent,
            handoff=self.handoff,
            sub_agent_max_usd=self.sub_agent_max_usd,
        )

    def schema_for_model(self) -> ToolSchema:
        return ToolSchema(
            name=self.name,
            description=self.description,
            parameters=self.input_schema(),
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
    risk: Risk | None = None,
    rate_limit_group: str | None = None,
    local: bool = False,
    untrusted_output: bool = False,
    reconcile: str | None = None,
    reconciles: str | None = None,
) -> Callable[[Callable[[InputT, ToolContext], Awaitable[OutputT]]], ToolDefinition]:
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
        untrusted_output: The output carries outside content (documents, mail, web pages). The
            workflow remembers it, and approval rules with ``untrusted_args`` catch risky calls
            whose arguments copy from it (prompt injection cannot by itself trigger them).
        timeout_s: Start-to-close timeout of one attempt.
        max_attempts: Attempts Temporal makes for transient failures.
        summary_arg: Argument shown in the Web UI summary, e.g. ``issue_refund(o-1001)``.
        risk: ``"low"``, ``"medium"`` or ``"high"``: how much harm a wrong call can do. Defaults
            to ``"medium"`` with side effects, else ``"low"``. Recorded in ``tools.lock.json``.
        rate_limit_group: Tools sharing a rate limit (e.g. one API quota) name the same group.
        local: Run as a local activity (inside the workflow task: less history, lower latency).
            Only for fast read-only tools: refused with side effects or ``timeout_s`` above
            ``MAX_LOCAL_TIMEOUT_S``.
        reconcile: For a side effect on an API without idempotency keys: the read tool a retry
            asks first whether the effect already happened (the tool sends
            ``ctx.idempotency_key`` as the API's own reference, the reconcile tool finds it by
            that reference). Every retry of the call, including an operator's retry of a parked
            one, asks it; when it finds the effect, its output is recorded instead of calling
            the tool again. Stands in for ``idempotent_via``.
        reconciles: Set on a reconcile tool: the tool it looks after. It takes
            :class:`ReconcileQuery`, returns :class:`ReconcileAnswer`, has no side effects and
            is never offered to the model.

    The description the model sees is the function's docstring; argument descriptions come from
    the input model's ``Field(description=...)``.
    """

    def wrap(fn: Callable[[InputT, ToolContext], Awaitable[OutputT]]) -> ToolDefinition:
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
        effects = side_effects or bool(compensates)
        definition = ToolDefinition(
            name=tool_name,
            version=version,
            fn=fn,  # type: ignore[arg-type]  # only ever called with its own input model
            input_model=input_model,  # type: ignore[arg-type]  # checked by problems() below
            output_model=output_model,  # type: ignore[arg-type]  # checked by problems() below
            description=inspect.cleandoc(fn.__doc__ or tool_name),
            side_effects=effects,
            reconcile=reconcile,
            reconciles=reconciles,
            compensation=compensation,
            secrets=tuple(secrets),
            start_to_close_s=timeout_s,
            max_attempts=max_attempts,
            summary_arg=summary_arg,
            compensates=compensates,
            fallback=fallback,
            dependency=dependency or tool_name,
            idempotent_via=idempotent_via,
            risk=risk or ("medium" if effects else "low"),
            rate_limit_group=rate_limit_group,
            local=local,
            untrusted_output=untrusted_output,
        )
        problems = definition.problems()
        if problems:
            raise ToolDefinitionError("; ".join(problems))
        return definition

    return wrap


def sub_agent(
    agent: str,
    *,
    name: str,
    description: str,
    version: int = 1,
    handoff: bool = False,
    max_usd: float | None = None,
    risk: Risk = "medium",
) -> ToolDefinition:
    """Declare another agent as a tool of this one ("agent as tool"; with `handoff`, a hand-off).

    The model calls it like any tool, with a ``task`` (:class:`AgentTask`), and it passes the
    same allowlist, schema check and approval rules. The run then starts `agent` as a **child
    workflow** acting for the same user, role and account, with a budget carved from what the
    parent has left (at most `max_usd`), under the child agent's own policy slice. The tool's
    result is the child's answer (:class:`AgentAnswer`); with `handoff`, the child's answer is
    the parent's final answer and the parent ends. A child that is rejected ends the parent
    rejected (the parent's earlier effects are undone); cancelling the parent cancels the
    child, which undoes its own effects; a parent compensated after its child finished undoes
    the child's effects too.

    Args:
        agent: The registered agent to run (its own tools, instructions and policy).
        name: The tool name the model sees.
        description: What the model is told the sub-agent does.
        handoff: The child's answer ends the parent's run as its final answer.
        max_usd: The most one call may carve from the parent's remaining budget.
    """

    async def runs_as_child_workflow(args: AgentTask, ctx: ToolContext) -> AgentAnswer:
        raise ToolFailed(f"{name} runs agent {agent!r} as a child workflow, not as an activity")

    definition = ToolDefinition(
        name=name,
        version=version,
        fn=runs_as_child_workflow,  # type: ignore[arg-type]  # never called with another model
        input_model=AgentTask,
        output_model=AgentAnswer,
        description=description,
        side_effects=False,
        compensation=None,
        secrets=(),
        start_to_close_s=30.0,
        max_attempts=1,
        summary_arg=None,
        compensates=None,
        fallback=None,
        dependency=name,
        idempotent_via=None,
        risk=risk,
        sub_agent=agent,
        handoff=handoff,
        sub_agent_max_usd=max_usd,
    )
    problems = definition.problems()
    if problems:
        raise ToolDefinitionError("; ".join(problems))
    return definition


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
        """Fail at worker start, naming each tool, on any definition or reference problem.

        Raises:
            ToolDefinitionError: every problem found, separated by ``"; "``.
        """
        found = self.problems()
        if found:
            raise ToolDefinitionError("; ".join(found))

    def problems(self) -> list[str]:
        """Every definition problem (see :meth:`ToolDefinition.problems`) and dangling reference."""
        names = {name for name, _ in self._tools}
        found: list[str] = []
        for t in sorted(self._tools.values(), key=lambda d: (d.name, d.version)):
            found.extend(t.problems())
            if t.compensation and t.compensation not in names:
                found.append(
                    f"tool {t.name!r} names compensation {t.compensation!r}, which is not "
                    "registered"
                )
            elif t.compensation and self.latest(t.compensation).compensates != t.name:
                found.append(
                    f"tool {t.name!r} names compensation {t.compensation!r}, which does not "
                    f"declare compensates={t.name!r}"
                )
            if t.compensates and t.compensates not in names:
                found.append(
                    f"compensation tool {t.name!r} compensates {t.compensates!r}, which is not "
                    "registered"
                )
            if t.reconcile and t.reconcile not in names:
                found.append(
                    f"tool {t.name!r} names reconcile tool {t.reconcile!r}, which is not registered"
                )
            elif t.reconcile and self.latest(t.reconcile).reconciles != t.name:
                found.append(
                    f"tool {t.name!r} names reconcile tool {t.reconcile!r}, which does not "
                    f"declare reconciles={t.name!r}"
                )
            if t.fallback and t.fallback not in names:
                found.append(
                    f"tool {t.name!r} names fallback {t.fallback!r}, which is not registered"
                )
            elif t.fallback and self.latest(t.fallback).side_effects != t.side_effects:
                found.append(
                    f"tool {t.name!r} and its fallback {t.fallback!r} differ in side effects"
                )
        for t in self._tools.values():
            if t.sub_agent and t.sub_agent not in self._agents:
                found.append(
                    f"sub-agent tool {t.name!r} runs agent {t.sub_agent!r}, which is not registered"
                )
        for agent in self._agents.values():
            for tool_name in agent.tools:
                if tool_name not in names:
                    found.append(
                        f"agent {agent.name!r} lists tool {tool_name!r}, which is not registered"
                    )
                elif self.latest(tool_name).compensates:
                    found.append(
                        f"agent {agent.name!r} lists compensation tool {tool_name!r}; "
                        "compensation tools are never offered to the model"
                    )
                elif self.latest(tool_name).reconciles:
                    found.append(
                        f"agent {agent.name!r} lists reconcile tool {tool_name!r}; "
                        "reconcile tools are never offered to the model"
                    )
        return found

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
            raise AgentNotServed(
                f"unknown agent {name!r}: no worker on this task queue that answered serves "
                f"it (this one serves: {known}; SPINE_AGENTS)"
            ) from None

    @property
    def tool_names(self) -> list[str]:
        return sorted({name for name, _ in self._tools})

    @property
    def tools(self) -> list[ToolDefinition]:
        """Every served tool version, sorted by name and version."""
        return [self._tools[key] for key in sorted(self._tools)]

    @property
    def agents(self) -> list[AgentDefinition]:
        return list(self._agents.values())


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
    """Runs tool calls for the activities: validate, inject secrets, call, validate, scrub, and
    store a large output by reference (see :mod:`spine.activities.blobs`).

    Args:
        blobs: Where large outputs and every untrusted output are stored; None: an output above
            :data:`MAX_OUTPUT_BYTES` is refused (no claim check).
        inline_bytes: Outputs whose JSON is larger go by reference.
        max_output_bytes: Outputs whose JSON is larger are refused (`ToolOutputInvalid`).
    """

    def __init__(
        self,
        registry: Registry,
        secrets: SecretResolver,
        http: httpx.AsyncClient,
        settings: Mapping[str, str],
        breakers: Breakers | None = None,
        *,
        blobs: BlobStore | None = None,
        inline_bytes: int = DEFAULT_INLINE_BYTES,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.registry = registry
        self.secrets = secrets
        self.http = http
        self.settings = settings
        self.breakers = breakers or Breakers()
        self.blobs = blobs
        self.inline_bytes = inline_bytes
        self.max_output_bytes = max_output_bytes if blobs is not None else MAX_OUTPUT_BYTES

    async def run(self, call: ToolCallInput, attempt: int = 1) -> ToolCallResult:
        try:
            return await self._run(call, attempt)
        except SpineError as err:
            raise err.to_application_error() from None  # message says it all; chains overflow

    async def _run(self, call: ToolCallInput, attempt: int) -> ToolCallResult:
        definition = self.registry.get(call.tool, call.version)
        given = await self._dereference_undone(call, definition)
        try:
            args = definition.input_model.model_validate(given)
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
        ambiguous = attempt > 1 or call.tried_before
        found = None
        try:
            if definition.reconcile and ambiguous and call.purpose != "compensation":
                # An earlier attempt may have done the effect and died before it could say so.
                found = await self._reconcile(definition, call, ctx)
            if found is not None:
                result: object = found
            else:
                try:
                    result = await self.breakers.call(
                        definition.dependency, lambda: _call_tool(definition, args, ctx)
                    )
                except AuthenticationFailed:
                    # The dependency refused a secret this worker had cached: it may have been
                    # rotated. Read it afresh and call once more (a refused request made no
                    # side effect).
                    invalidate = getattr(self.secrets, "invalidate", None)
                    if not (
                        definition.secrets
                        and invalidate
                        and invalidate(definition.secrets, call.account)
                    ):
                        raise
                    ctx._secrets = await self.secrets.resolve(definition.secrets, call.account)
                    values = {**{f"stale {k}": v for k, v in values.items()}, **ctx._secrets}
                    result = await self.breakers.call(
                        definition.dependency, lambda: _call_tool(definition, args, ctx)
                    )
        except SpineError as err:
            # Error messages leave the activity (history, logs, traces, the model): no secret.
            err.message = Scrubber(values.values()).text(err.message)
            raise
        except Exception as err:
            # An unexpected exception's text may quote a secret (an HTTP client quoting a header
            # value, say): it becomes a scrubbed, retryable failure without its chain.
            raise DependencyUnavailable(
                f"{call.tool}: {type(err).__name__}: {Scrubber(values.values()).text(str(err))}"
            ) from None
        scrub = Scrubber(values.values())
        try:
            output = definition.output_model.model_validate(result, from_attributes=True)
        except ValidationError as err:
            raise ToolOutputInvalid(
                f"{call.tool}: invalid output: {scrub.text(_one_line(err))}"
            ) from None
        dumped = scrub.value(output.model_dump(mode="json"))
        return await self._deliver(call, definition, dumped, attempt, reconciled=found is not None)  # type: ignore[arg-type]  # scrub keeps the shape

    async def _dereference_undone(
        self, call: ToolCallInput, definition: ToolDefinition
    ) -> JsonObject:
        """A compensation's arguments, with the undone call's output read back from the store
        when the run holds it by reference (the compensation needs what the call returned)."""
        digest = ref_digest(call.args.get("output")) if definition.compensates else None
        if digest is None or self.blobs is None:
            return call.args
        found = await self.blobs.resolve(call.run_id, [digest])
        if digest not in found:
            raise ToolInputInvalid(
                f"{call.tool}: the output of the call it undoes ({digest}) is not stored for "
                f"run {call.run_id!r}"
            )
        return {**call.args, "output": found[digest]}

    async def _deliver(
        self,
        call: ToolCallInput,
        definition: ToolDefinition,
        output: JsonObject,
        attempt: int,
        *,
        reconciled: bool = False,
    ) -> ToolCallResult:
        """The result history will hold: the output, or a reference to it in the blob store."""
        data = encode_output(output)
        size = len(data)
        if size > self.max_output_bytes:
            fix = (
                "store large results and return a reference"
                if self.blobs is None
                else "return a smaller output, or raise SPINE_MAX_OUTPUT_BYTES"
            )
            raise ToolOutputInvalid(
                f"{call.tool}: output is {size} bytes, above the {self.max_output_bytes}-byte "
                f"limit; {fix}"
            )
        # An output that looks like a reference is stored too, so the model reads it as sent.
        by_ref = size > self.inline_bytes or REF_KEY in output
        if self.blobs is None or not (by_ref or definition.untrusted_output):
            return ToolCallResult(output=output, attempt=attempt, reconciled=reconciled)
        key = f"{call.step}:{call.call_id}:{call.tool}:{call.purpose}"
        digest = await self.blobs.put_output(
            call.run_id,
            key,
            call.tool,
            output,
            untrusted=definition.untrusted_output,
            inline=not by_ref,
            data=data,
        )
        if not by_ref:
            return ToolCallResult(output=output, attempt=attempt, reconciled=reconciled)
        tokens = None
        if definition.untrusted_output:
            # Taint checks remember every token of outside content: the workflow cannot read the
            # stored output, so it gets the tokens' filter (guardrails/taint.py) instead.
            tokens = taint.remember("", json.dumps(output, sort_keys=True))
        return ToolCallResult(
            output=reference(digest, size, call.tool),
            attempt=attempt,
            untrusted_filter=tokens,
            reconciled=reconciled,
        )

    async def _reconcile(
        self, definition: ToolDefinition, call: ToolCallInput, ctx: ToolContext
    ) -> JsonObject | None:
        """Ask the tool's reconcile tool whether the effect happened; its output if it did.

        A reconcile tool that fails fails the attempt (Temporal retries it): when Spine cannot
        tell whether the effect happened, it does not call the tool again.
        """
        checker = self.registry.latest(definition.reconcile or "")
        query = ReconcileQuery(
            tool=call.tool,
            args=call.args,
            reference=call.idempotency_key or f"{call.run_id}/{call.step}/{call.call_id}",
            run_id=call.run_id,
        )
        values = (
            await self.secrets.resolve(checker.secrets, call.account) if checker.secrets else {}
        )
        checker_ctx = dataclasses.replace(ctx, _secrets=values)
        scrub = Scrubber(values.values())
        try:
            raw = await self.breakers.call(
                checker.dependency, lambda: _call_tool(checker, query, checker_ctx)
            )
        except SpineError as err:
            err.message = scrub.text(err.message)
            raise
        except Exception as err:
            raise DependencyUnavailable(
                f"{checker.name}: {type(err).__name__}: {scrub.text(str(err))}"
            ) from None
        try:
            answer = ReconcileAnswer.model_validate(raw, from_attributes=True)
        except ValidationError as err:
            raise ToolOutputInvalid(
                f"{checker.name}: invalid reconcile answer: {scrub.text(_one_line(err))}"
            ) from None
        if not answer.found:
            return None
        if answer.output is None:
            raise ToolOutputInvalid(
                f"{checker.name}: found the effect of {call.tool} but returned no output"
            )
        return scrub.value(answer.output)  # type: ignore[return-value]  # scrub keeps the shape


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
        if runner.registry.latest(tool_name).sub_agent:
            continue  # a sub-agent runs as a child workflow

        async def run_tool(call: ToolCallInput) -> ToolCallResult:
            async with heartbeating():
                return await runner.run(call, attempt=activity.info().attempt)

        run_tool.__name__ = f"tool_{tool_name}"
        activities.append(activity.defn(name=tool_activity(tool_name))(run_tool))
    return activities
