"""MCP tools: a real MCP server's tools become Spine tools, over stdio and streamable HTTP.

Run as ``python -m tests.test_mcp_tools`` this module is that server, over stdio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field
from temporalio.exceptions import ApplicationError

from spine.activities.contracts import build_lock
from spine.activities.errors import DependencyUnavailable
from spine.activities.mcp import (
    McpClientPool,
    McpServerConfig,
    close_mcp_sessions,
    mcp_tools,
    run_sync,
)
from spine.activities.tools import AgentDefinition, Registry, ToolDefinitionError, ToolRunner
from spine.client.testing import (
    assert_tools_called,
    free_port,
    script,
    start_scripted_run,
    wait_until,
)
from spine.guardrails.secrets import NoSecrets
from spine.payloads import ToolCallInput
from tests.helpers import eventually

REPO_ROOT = Path(__file__).resolve().parent.parent


def build_server(call_log: Path) -> MCPServer:
    """A small notes server; every call it receives is appended to `call_log`."""
    server = MCPServer("test-notes")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def read_note(
        note_id: Annotated[str, Field(pattern=r"^n-\d+$", description="Note id, e.g. n-1")],
    ) -> str:
        """Read a note by id."""
        with call_log.open("a") as log:
            log.write(f"read_note {note_id}\n")
        if note_id == "n-404":
            raise ToolError(f"no note {note_id}")
        return f"Note {note_id}: buy milk"

    return server


@contextlib.contextmanager
def http_server(call_log: Path) -> Iterator[McpServerConfig]:
    """The notes server over streamable HTTP: uvicorn on a free port, in its own thread.

    Its own thread and event loop, as a real server would have: the worker lists tools at start
    with `run_sync`, which blocks the test's event loop until the listing is done.
    """
    port = free_port()
    app = build_server(call_log).streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mcp-http", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="MCP HTTP server")
        assert server.started, "the MCP HTTP server did not start"
        yield McpServerConfig.http("test-notes", f"http://127.0.0.1:{port}/mcp", timeout_s=10)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(params=["stdio", "http"])
async def notes(request: pytest.FixtureRequest, tmp_path: Path):
    """The notes server over each transport, and its call log."""
    log = tmp_path / "calls.log"
    log.touch()
    if request.param == "stdio":
        yield (
            McpServerConfig.stdio(
                "test-notes",
                sys.executable,
                "-m",
                "tests.test_mcp_tools",
                env={"CALL_LOG": str(log)},
                cwd=str(REPO_ROOT),
                timeout_s=10,
            ),
            log,
        )
    else:
        with http_server(log) as config:
            yield config, log
    await close_mcp_sessions()


@pytest.fixture
def mcp_agent(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway agent module and policy granting MCP tools; set its server with `.server`."""
    name = f"spine_test_mcp_agent_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)

    def register(registry: Registry) -> None:
        for definition in run_sync(mcp_tools(module.server)):  # type: ignore[attr-defined]  # set by the test
            registry.add_tool(definition)
        registry.add_agent(
            AgentDefinition(name="mcp-agent", instructions="Read notes.", tools=("read_note",))
        )

    module.register = register  # type: ignore[attr-defined]  # an agent module's hook
    sys.modules[name] = module
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = "test"\n'
        '[prices]\nversion = "p"\n[prices.models]\n"scripted" = { input = 1.0, output = 4.0 }\n'
        '[agents.mcp-agent.roles]\nreader = ["read_note"]\n'
        '[principals.alice]\nroles = ["reader"]\naccounts = ["*"]\n'
    )
    yield name, policy
    sys.modules.pop(name, None)


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


async def test_tools_are_listed_with_their_schema(notes) -> None:
    """The server's tools are listed at start; the input schema is the server's own."""
    config, _ = notes
    [read_note] = await mcp_tools(config, prefix="notes_")
    descriptor = read_note.descriptor()
    assert descriptor.name == "notes_read_note" and descriptor.description == "Read a note by id."
    schema = descriptor.input_schema
    assert schema["properties"] == {
        "note_id": {
            "description": "Note id, e.g. n-1",
            "pattern": r"^n-\d+$",
            "title": "Note Id",
            "type": "string",
        }
    }
    assert schema["required"] == ["note_id"]
    assert descriptor.side_effects is False and read_note.dependency == "mcp:test-notes"
    assert "notes_read_note" in json.dumps(build_lock([read_note]))  # pinned like any tool


async def test_scripted_run_calls_mcp_tool_end_to_end(client, make_worker, notes, mcp_agent):
    """A scripted run calls the MCP tool through a real worker and gets the note back."""
    config, log = notes
    module, policy = mcp_agent
    sys.modules[module].server = config  # type: ignore[attr-defined]  # read by register()
    turns = script().tool("read_note", note_id="n-7").text("The note says: buy milk.")
    async with make_worker(agent_modules=(module,), policy_path=policy) as worker:
        handle = await start_scripted_run(
            client, worker, "mcp-agent", "What does n-7 say?", turns, role="reader"
        )
        result = await handle.result()
    assert result.status == "completed", result.reason
    assert _calls(log) == ["read_note n-7"]
    await assert_tools_called(handle, ["read_note"])


async def test_invalid_arguments_are_refused_before_the_server(
    client, make_worker, notes, mcp_agent
):
    """Arguments that break the MCP schema are refused in the workflow; no call is made."""
    config, log = notes
    module, policy = mcp_agent
    sys.modules[module].server = config  # type: ignore[attr-defined]  # read by register()
    turns = script().tool("read_note", note_id="note seven").text("I could not read it.")
    async with make_worker(agent_modules=(module,), policy_path=policy) as worker:
        handle = await start_scripted_run(
            client, worker, "mcp-agent", "What does it say?", turns, role="reader"
        )
        result = await handle.result()
    assert result.status == "completed", result.reason
    await assert_tools_called(handle, [])
    assert _calls(log) == []


async def _runner(config: McpServerConfig) -> ToolRunner:
    registry = Registry()
    for definition in await mcp_tools(config):
        registry.add_tool(definition)
    return ToolRunner(registry, NoSecrets(), httpx.AsyncClient(), {})


def _call(**args: object) -> ToolCallInput:
    return ToolCallInput(run_id="r", step=1, call_id="c", tool="read_note", version=1, args=args)


async def test_error_result_is_tool_failed(notes) -> None:
    """An MCP result with isError becomes ToolFailed, which the model is told about."""
    config, _ = notes
    runner = await _runner(config)
    with pytest.raises(ApplicationError) as raised:
        await runner.run(_call(note_id="n-404"))
    assert raised.value.type == "ToolFailed" and "no note n-404" in raised.value.message


async def test_activity_validates_arguments_again(notes) -> None:
    """The activity re-checks arguments against the MCP schema (defence in depth)."""
    config, log = notes
    runner = await _runner(config)
    with pytest.raises(ApplicationError) as raised:
        await runner.run(_call(note_id="seven"))
    assert raised.value.type == "ToolInputInvalid" and "does not match" in raised.value.message
    assert _calls(log) == []


async def test_connection_failure_is_dependency_unavailable() -> None:
    """A server that cannot be reached is DependencyUnavailable at call time (retried)."""
    pool = McpClientPool(McpServerConfig.http("gone", f"http://127.0.0.1:{free_port()}/mcp"))
    with pytest.raises(DependencyUnavailable, match="MCP server 'gone' .* connection failed"):
        await pool.call_tool("read_note", {"note_id": "n-1"})


async def test_unreachable_server_fails_worker_start() -> None:
    """Listing tools of an unreachable server fails with a message naming the server."""
    config = McpServerConfig.stdio("broken", sys.executable, "-c", "raise SystemExit(3)")
    with pytest.raises(ToolDefinitionError, match="cannot list the tools of MCP server 'broken'"):
        await mcp_tools(config)


async def test_missing_included_tool_is_a_definition_error(notes) -> None:
    """Asking for a tool the server does not list names the tools it does list."""
    config, _ = notes
    with pytest.raises(ToolDefinitionError, match="has no tool 'write_note'; it lists: read_note"):
        await mcp_tools(config, include=["write_note"])


async def test_idle_session_is_closed_then_reopened(notes) -> None:
    """A session idle for `idle_close_s` closes; the next call opens a new one."""
    config, log = notes
    pool = McpClientPool(dataclasses.replace(config, idle_close_s=0.2))
    await pool.call_tool("read_note", {"note_id": "n-1"})
    [first] = pool._connections.values()

    async def closed() -> bool:
        return first.broken

    await eventually(closed, timeout=30, what="the idle MCP session to close")
    await pool.call_tool("read_note", {"note_id": "n-2"})
    [second] = pool._connections.values()
    assert second is not first and _calls(log) == ["read_note n-1", "read_note n-2"]
    await pool.close()


if __name__ == "__main__":
    build_server(Path(os.environ["CALL_LOG"])).run()
