"""MCP tools: the tools of a Model Context Protocol server, served as Spine tools.

:func:`mcp_tools` connects to an MCP server (a subprocess over stdio, or streamable HTTP), lists
its tools, and returns one :class:`~activities.tools.ToolDefinition` per tool. Each keeps the
server's ``inputSchema`` as its input schema (what the model sees, what the workflow validates
arguments against before anything is scheduled, and what the activity validates again), and
runs as the activity ``tool.<name>`` like any other tool. Calls reuse one client session per
server and worker event loop, opened on first use and closed after ``idle_close_s`` idle.

An agent module's ``register`` is synchronous and may run while the worker's event loop is
already running, so it lists the tools with :func:`run_sync`::

    NOTES = McpServerConfig.stdio("notes", sys.executable, "-m", "my_notes_server")

    def register(registry: Registry) -> None:
        for definition in run_sync(mcp_tools(NOTES, include=["read_note"])):
            registry.add_tool(definition)
        registry.add_agent(AgentDefinition(name="notes-agent", instructions="...",
                                           tools=("read_note",)))

Errors map to Spine's taxonomy: a result with ``isError`` is :class:`ToolFailed` (the model is
told); a JSON-RPC "invalid params" error is :class:`ToolInputInvalid`; a connection that cannot
be opened or breaks, and a timeout, are :class:`DependencyUnavailable` (retried by Temporal,
counted by the circuit breaker of ``dependency``, default ``mcp:<server name>``). A side-effecting
MCP tool gets the idempotency key in the request's ``_meta`` under ``spine/idempotency-key``;
declare it ``side_effects=True`` only if the server honours that key.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypeVar

import anyio
import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client._transport import TransportStreams  # in its __all__; the stream pair type
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's own MCP timeouts
from mcp.types import (
    CONNECTION_CLOSED,
    INVALID_PARAMS,
    REQUEST_TIMEOUT,
    CallToolResult,
    TextContent,
    Tool,
)
from pydantic import BaseModel

from spine.activities.errors import (
    DependencyUnavailable,
    SpineError,
    ToolFailed,
    ToolInputInvalid,
    classify_http,
)
from spine.activities.tools import (
    TOOL_NAME,
    JsonArguments,
    Risk,
    ToolContext,
    ToolDefinition,
    ToolDefinitionError,
    json_schema_model,
)
from spine.contract import JsonObject

T = TypeVar("T")

IDEMPOTENCY_META_KEY = "spine/idempotency-key"
"""Where a side-effecting call's idempotency key travels: the MCP request's ``_meta``."""

#: Failures of the connection itself, as opposed to answers from the server.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    TimeoutError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    httpx2.TransportError,
)


@dataclass(frozen=True)
class McpServerConfig:
    """How to reach one MCP server. Build it with :meth:`stdio` or :meth:`http`."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0
    idle_close_s: float = 300.0

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ToolDefinitionError(
                f"MCP server {self.name!r}: give exactly one of command= (stdio) or url= (HTTP)"
            )

    @classmethod
    def stdio(
        cls,
        name: str,
        command: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float = 30.0,
    ) -> McpServerConfig:
        """A server the worker starts as a subprocess and talks to over stdin/stdout.

        `env` is laid over a minimal safe environment (HOME, PATH, ...), not the worker's.
        """
        return cls(name=name, command=command, args=args, env=env, cwd=cwd, timeout_s=timeout_s)

    @classmethod
    def http(
        cls,
        name: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> McpServerConfig:
        """A server at a streamable-HTTP endpoint, e.g. ``http://127.0.0.1:8000/mcp``."""
        return cls(name=name, url=url, headers=dict(headers or {}), timeout_s=timeout_s)

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"

    def describe(self) -> str:
        """Where the server is, for error messages (never header values)."""
        if self.url is not None:
            return f"MCP server {self.name!r} at {self.url}"
        return f"MCP server {self.name!r} (stdio: {' '.join([self.command or '', *self.args])})"

    def client(self) -> Client:
        """A new, unopened MCP client for this server."""
        if self.url is not None:
            if self.headers:
                return Client(
                    _http_transport(self.url, self.headers), read_timeout_seconds=self.timeout_s
                )
            return Client(self.url, read_timeout_seconds=self.timeout_s)
        params = StdioServerParameters(
            command=self.command or "",
            args=list(self.args),
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
        )
        return Client(params, read_timeout_seconds=self.timeout_s)


@contextlib.asynccontextmanager
async def _http_transport(url: str, headers: Mapping[str, str]) -> AsyncIterator[TransportStreams]:
    """Streamable HTTP with extra headers (the SDK takes them on its own HTTP client)."""
    async with create_mcp_http_client(headers=dict(headers)) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


# ------------------------------------------------------------------------------ outputs


class McpToolOutput(BaseModel):
    """What an MCP tool returns to the model: its text content and its structured content."""

    text: str = ""
    structured: JsonObject | None = None

    output_schema: ClassVar[JsonObject | None] = None

    @classmethod
    def model_json_schema(cls, *args: object, **kwargs: object) -> dict[str, object]:  # type: ignore[override]  # pins the server's output schema
        structured: JsonObject = (
            {"anyOf": [copy.deepcopy(cls.output_schema), {"type": "null"}]}
            if cls.output_schema
            else {"anyOf": [{"type": "object"}, {"type": "null"}]}
        )
        return {
            "title": cls.__name__,
            "type": "object",
            "properties": {"text": {"type": "string"}, "structured": structured},
            "required": ["text"],
        }


def _output_model(name: str, schema: Mapping[str, object] | None) -> type[McpToolOutput]:
    pinned = copy.deepcopy(dict(schema)) if schema else None
    return type(f"{name}_output", (McpToolOutput,), {"output_schema": pinned})


def _text(result: CallToolResult) -> str:
    parts = []
    for block in result.content:
        if isinstance(block, TextContent):
            parts.append(block.text)
        else:
            kind = getattr(block, "mime_type", None) or getattr(block, "type", "content")
            parts.append(f"[{kind}]")
    return "\n".join(parts)


# -------------------------------------------------------------------------- connections


class _Connection:
    """One open client session, owned by a background task so that any task may use it.

    The SDK's client holds anyio task groups, which must be entered and left by the same task;
    activities come and go, so the session lives in its own task until closed or idle.
    """

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.client: Client | None = None
        self.broken = False
        self._ready: asyncio.Future[None] = self.loop.create_future()
        self._stop = asyncio.Event()
        self._in_flight = 0
        self._last_used = self.loop.time()
        self._task = self.loop.create_task(self._own(), name=f"mcp:{config.name}")

    async def _own(self) -> None:
        try:
            async with self.config.client() as client:
                self.client = client
                self._ready.set_result(None)
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        wait = max(self._idle_left(), 0.05)
                        await asyncio.wait_for(self._stop.wait(), timeout=wait)
                    if self._in_flight == 0 and self._idle_left() <= 0:
                        break
        except BaseException as err:  # noqa: BLE001  # reported to whoever waits for the session
            if not self._ready.done():
                self._ready.set_exception(err)
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            self.client = None
            self.broken = True

    def _idle_left(self) -> float:
        return self._last_used + self.config.idle_close_s - self.loop.time()

    async def ready(self) -> Client:
        await asyncio.shield(self._ready)
        if self.client is None:
            raise DependencyUnavailable(f"{self.config.describe()}: the session closed")
        return self.client

    async def call(
        self, name: str, arguments: Mapping[str, object], meta: Mapping[str, str] | None
    ) -> CallToolResult:
        client = await self.ready()
        self._in_flight += 1
        self._last_used = self.loop.time()
        try:
            return await client.call_tool(
                name,
                dict(arguments),
                read_timeout_seconds=self.config.timeout_s,
                meta=dict(meta) if meta else None,  # type: ignore[arg-type]  # an open _meta map
            )
        finally:
            self._in_flight -= 1
            self._last_used = self.loop.time()

    async def close(self) -> None:
        self._stop.set()
        self.broken = True
        if self._task is not asyncio.current_task():
            with contextlib.suppress(BaseException):
                await self._task


class McpClientPool:
    """The open session to one MCP server, per event loop; reopened when it breaks."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self._connections: dict[int, _Connection] = {}
        _POOLS.add(self)

    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        current = self._connections.get(id(loop))
        if current is None or current.broken or current.loop is not loop:
            current = _Connection(self.config)
            self._connections[id(loop)] = current
        return current

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, object],
        *,
        idempotency_key: str | None = None,
    ) -> CallToolResult:
        """Call `name` on the server; failures are raised as Spine errors (see module doc)."""
        meta = {IDEMPOTENCY_META_KEY: idempotency_key} if idempotency_key else None
        where = self.config.describe()
        connection = self._connection()
        try:
            return await connection.call(name, arguments, meta)
        except MCPError as err:
            if err.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT):
                await connection.close()
                raise DependencyUnavailable(f"{where}: {name}: {err.message}") from err
            if err.code == INVALID_PARAMS:
                raise ToolInputInvalid(f"{where}: {name}: {err.message}") from err
            raise ToolFailed(f"{where}: {name}: MCP error {err.code}: {err.message}") from err
        except SpineError:
            raise
        except BaseException as err:
            leaf = _leaf(err)
            if isinstance(leaf, httpx2.HTTPStatusError):
                await connection.close()
                status = leaf.response.status_code
                raise classify_http(
                    status, f"{where}: {leaf}", dict(leaf.response.headers)
                ) from err
            if not _is_transport_error(err):
                raise
            await connection.close()
            raise DependencyUnavailable(f"{where}: connection failed: {_describe(err)}") from err

    async def close(self) -> None:
        """Close every session this pool opened on the running event loop."""
        loop = asyncio.get_running_loop()
        for key, connection in list(self._connections.items()):
            if connection.loop is loop:
                del self._connections[key]
                await connection.close()


_POOLS: weakref.WeakSet[McpClientPool] = weakref.WeakSet()


async def close_mcp_sessions() -> None:
    """Close every MCP session opened on the running event loop (call at worker shutdown)."""
    for pool in list(_POOLS):
        await pool.close()


def _is_transport_error(err: BaseException) -> bool:
    if isinstance(err, BaseExceptionGroup):
        return all(_is_transport_error(e) for e in err.exceptions)
    return isinstance(err, _TRANSPORT_ERRORS)


def _leaf(err: BaseException) -> BaseException:
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


def _describe(err: BaseException) -> str:
    err = _leaf(err)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


# ------------------------------------------------------------------------------ listing


async def list_mcp_tools(server: McpServerConfig) -> list[Tool]:
    """Every tool the server lists (following pagination), on a short-lived session.

    Raises:
        ToolDefinitionError: the server cannot be reached or fails to list its tools.
    """
    tools: list[Tool] = []
    try:
        async with server.client() as client:
            cursor: str | None = None
            for _ in range(1000):
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
    except Exception as err:  # noqa: BLE001  # any failure here stops the worker start, named
        raise ToolDefinitionError(
            f"cannot list the tools of {server.describe()}: {_describe(err)}"
        ) from err
    return tools


async def mcp_tools(
    server: McpServerConfig,
    *,
    prefix: str = "",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    version: int = 1,
    side_effects: bool = False,
    idempotent_via: str | None = None,
    compensation: str | None = None,
    risk: Risk | None = None,
    rate_limit_group: str | None = None,
    local: bool = False,
    timeout_s: float | None = None,
    max_attempts: int = 5,
    dependency: str | None = None,
    summary_args: Mapping[str, str] | None = None,
) -> list[ToolDefinition]:
    """List `server`'s tools and turn each into a Spine tool named ``prefix + name``.

    Call it once per group of tools that share settings (``include=[...]``); the options apply
    to every tool returned.

    Args:
        server: Where the MCP server is.
        prefix: Put before each MCP tool name, e.g. ``"notes_"``.
        include: Only these MCP tool names (all when None); a name the server lacks is an error.
        exclude: Leave these MCP tool names out.
        version: Contract version of every tool returned; bump it when the server's schemas
            change in a breaking way (``spine tools check`` tells).
        side_effects: True when the tools change the outside world. The idempotency key is sent
            in ``_meta`` (``IDEMPOTENCY_META_KEY``); say how the server uses it in
            `idempotent_via`. A tool the server marks destructive must be declared so.
        compensation: A registered compensation tool (a :func:`~activities.tools.tool` taking
            ``CompensationInput``) that undoes these tools.
        risk, rate_limit_group, local, max_attempts, dependency: as in
            :func:`~activities.tools.tool`; `dependency` defaults to ``mcp:<server name>``.
        timeout_s: Start-to-close timeout of one attempt; defaults to the server's `timeout_s`.
        summary_args: Per MCP tool name, the argument shown in the Web UI summary.

    Raises:
        ToolDefinitionError: the server is unreachable, a name is missing or invalid, a schema
            is not a JSON Schema object, or a tool's annotations contradict `side_effects`.
    """
    listed = await list_mcp_tools(server)
    by_name = {t.name: t for t in listed}
    wanted = list(include) if include is not None else sorted(by_name)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ToolDefinitionError(
            f"{server.describe()} has no tool {', '.join(map(repr, missing))}; "
            f"it lists: {', '.join(sorted(by_name)) or 'none'}"
        )
    pool = McpClientPool(server)
    skip = set(exclude)
    definitions = []
    for remote in wanted:
        if remote in skip:
            continue
        definition = _definition(
            by_name[remote],
            pool,
            name=f"{prefix}{remote}",
            version=version,
            side_effects=side_effects,
            idempotent_via=idempotent_via,
            compensation=compensation,
            risk=risk or ("medium" if side_effects else "low"),
            rate_limit_group=rate_limit_group,
            local=local,
            timeout_s=timeout_s if timeout_s is not None else server.timeout_s,
            max_attempts=max_attempts,
            dependency=dependency or f"mcp:{server.name}",
            summary_arg=(summary_args or {}).get(remote),
        )
        definitions.append(definition)
    return definitions


def _definition(
    remote: Tool,
    pool: McpClientPool,
    *,
    name: str,
    version: int,
    side_effects: bool,
    idempotent_via: str | None,
    compensation: str | None,
    risk: Risk,
    rate_limit_group: str | None,
    local: bool,
    timeout_s: float,
    max_attempts: int,
    dependency: str,
    summary_arg: str | None,
) -> ToolDefinition:
    where = pool.config.describe()
    if not TOOL_NAME.match(name):
        raise ToolDefinitionError(
            f"{where}: tool {remote.name!r} would be named {name!r}, which does not match "
            f"{TOOL_NAME.pattern}; choose another prefix or exclude it"
        )
    hints = remote.annotations
    if hints is not None and not side_effects:
        if hints.destructive_hint is True and hints.read_only_hint is not True:
            raise ToolDefinitionError(
                f"{where}: tool {remote.name!r} is marked destructive by the server; import it "
                "with side_effects=True (and idempotent_via=...) or exclude it"
            )
    input_model = json_schema_model(name, remote.input_schema)
    output_model = _output_model(name, remote.output_schema)
    remote_name = remote.name

    async def call(args: JsonArguments, ctx: ToolContext) -> McpToolOutput:
        result = await pool.call_tool(
            remote_name, args.root, idempotency_key=ctx.idempotency_key if side_effects else None
        )
        text = _text(result)
        if result.is_error:
            raise ToolFailed(f"{name}: {text[:1000] or 'the MCP server reported an error'}")
        return output_model(text=text, structured=result.structured_content)

    call.__name__ = name
    description = (remote.description or remote.title or name).strip()
    return ToolDefinition(
        name=name,
        version=version,
        fn=call,  # type: ignore[arg-type]  # takes its own JsonArguments subclass
        input_model=input_model,
        output_model=output_model,
        description=description,
        side_effects=side_effects,
        compensation=compensation,
        secrets=(),
        start_to_close_s=timeout_s,
        max_attempts=max_attempts,
        summary_arg=summary_arg,
        compensates=None,
        fallback=None,
        dependency=dependency,
        idempotent_via=idempotent_via,
        risk=risk,
        rate_limit_group=rate_limit_group,
        local=local,
    )


# ------------------------------------------------------------------------------ helpers


def run_sync(coro: Coroutine[object, object, T]) -> T:
    """Run an async set-up step (such as :func:`mcp_tools`) from synchronous code.

    Works whether or not an event loop is already running in this thread (the worker builds its
    registry inside one): the coroutine runs to completion on a private loop in a helper thread.
    Meant for worker start only; it blocks the calling thread until done.
    """
    box: dict[str, T] = {}
    failure: list[BaseException] = []

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:  # noqa: BLE001  # re-raised in the calling thread
            failure.append(err)

    thread = threading.Thread(target=target, name="spine-run-sync", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return box["value"]
