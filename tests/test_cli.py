"""The `spine` command as a user runs it, without a Temporal server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spine.client.demo import build_demo_request
from spine.client.runs import web_ui_url


def _spine_command() -> list[str]:
    script = Path(sys.executable).parent / "spine"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from client.cli import main; main()"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spine(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed `spine` script with Temporal pointed at a port nobody listens on."""
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": f"127.0.0.1:{_closed_port()}",
        "TEMPORAL_NAMESPACE": "default",
        # Keep a developer's own Temporal CLI profile out of the way.
        "TEMPORAL_CONFIG_FILE": str(tmp_path / "no-temporal.toml"),
    }
    env.pop("TEMPORAL_PROFILE", None)
    return subprocess.run(
        [*_spine_command(), *args], capture_output=True, text=True, env=env, timeout=60
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The process failed with `code` and exactly one `spine: error:` line, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spine: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_the_verbs(tmp_path: Path) -> None:
    """`spine --help` lists every implemented verb."""
    proc = spine("--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for verb in ("worker", "run", "status", "approve", "reject", "demo"):
        assert f"  {verb} " in proc.stdout, verb


def test_status_without_temporal_is_one_line_error(tmp_path: Path) -> None:
    """`spine status` with nothing listening at TEMPORAL_ADDRESS fails in one line, exit 1."""
    proc = spine("status", "refund-agent-123", tmp_path=tmp_path)
    line = assert_one_line_error(proc, 1)
    assert "cannot reach Temporal at '127.0.0.1:" in line
    assert "temporal-dev/up" in line


def test_approve_without_temporal_is_one_line_error(tmp_path: Path) -> None:
    """`spine approve` with nothing listening fails in one line, exit 1."""
    proc = spine("approve", "r-1", "ap-1", "--by", "bob", "--role", "supervisor", tmp_path=tmp_path)
    assert "cannot reach Temporal" in assert_one_line_error(proc, 1)


def test_run_with_invalid_json_script_names_the_file(tmp_path: Path) -> None:
    """A `--script` file that is not JSON is a one-line usage error naming file and position."""
    bad = tmp_path / "turns.json"
    bad.write_text('[{"text": "hi",}]\n')
    proc = spine(
        "run", "refund-agent", "goal", "--user", "alice", "--role", "support",
        "--account", "acme", "--script", str(bad), tmp_path=tmp_path,
    )  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert str(bad) in line
    assert "line 1, column 16" in line


def test_run_with_invalid_script_turn_summarises_validation(tmp_path: Path) -> None:
    """A script whose turn fails validation is summarised in one line with the failing field."""
    bad = tmp_path / "turns.json"
    bad.write_text(json.dumps([{"text": "ok"}, {"tool_calls": [{"args": {}}]}, {"usage": 3}]))
    proc = spine(
        "run", "refund-agent", "goal", "--user", "alice", "--role", "support",
        "--account", "acme", "--script", str(bad), tmp_path=tmp_path,
    )  # fmt: skip
    line = assert_one_line_error(proc, 2)
    assert str(bad) in line
    assert "script[1].tool_calls[0].name: Field required (and 1 more)" in line


def test_run_with_unknown_provider_is_usage_error(tmp_path: Path) -> None:
    """`--model` with an unknown provider is a one-line usage error before connecting."""
    proc = spine(
        "run", "refund-agent", "goal", "--user", "alice", "--role", "support",
        "--account", "acme", "--model", "gemini:pro", tmp_path=tmp_path,
    )  # fmt: skip
    assert "unknown model provider 'gemini'" in assert_one_line_error(proc, 2)


def test_missing_option_is_one_line_usage_error(tmp_path: Path) -> None:
    """A missing required option is one line on stderr with exit 2."""
    proc = spine("run", "refund-agent", "goal", "--user", "alice", tmp_path=tmp_path)
    assert "--role" in assert_one_line_error(proc, 2)


def test_demo_without_temporal_says_how_to_start_it(tmp_path: Path) -> None:
    """`spine demo` with no Temporal says so in one line and points at `make demo`."""
    proc = spine("demo", tmp_path=tmp_path)
    line = assert_one_line_error(proc, 1)
    assert "Temporal is not running at '127.0.0.1:" in line
    assert "make demo" in line


def test_web_ui_url_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Web UI links point at the workflow page, or its history when the run id is known."""
    monkeypatch.delenv("SPINE_UI_URL", raising=False)
    assert web_ui_url("refund-agent-abc") == (
        "http://localhost:8233/namespaces/default/workflows/refund-agent-abc"
    )
    assert web_ui_url("w 1", "r-1", namespace="prod") == (
        "http://localhost:8233/namespaces/prod/workflows/w%201/r-1/history"
    )
    monkeypatch.setenv("SPINE_UI_URL", "https://temporal.example.com/")
    assert web_ui_url("w") == "https://temporal.example.com/namespaces/default/workflows/w"


def test_demo_request_needs_one_approval() -> None:
    """The demo script refunds 180.00 (above the 100.00 threshold) and ends with a text turn."""
    request = build_demo_request("o-1234")
    assert request.model is not None and request.model.provider == "scripted"
    turns = request.model.script
    assert [t.tool_calls[0].name for t in turns[:4]] == [
        "lookup_order",
        "issue_refund",
        "send_email",
        "update_ticket",
    ]
    assert turns[1].tool_calls[0].args["amount"] == 180.0
    assert turns[1].confidence == 0.9
    assert turns[4].text is not None and "o-1234" in turns[4].text
    assert all(t.usage is not None and t.usage.input_tokens >= 200 for t in turns)
