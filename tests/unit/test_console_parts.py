"""The console's pieces that need no server: filters, redirects, sessions, what a page shows."""

from __future__ import annotations

import pytest

from spine.client import console, console_data


def test_a_list_filter_takes_only_names():
    """Account and agent filters go into a visibility query, so only valid names get in."""
    assert console_data.Filter.of("acme", "refund-agent").clause() == (
        " AND SpineAccount = 'acme' AND SpineAgent = 'refund-agent'"
    )
    assert console_data.Filter.of(" ", None).clause() == ""
    for account in ("acme' OR 1=1 --", "ACME", "a b", "x" * 64):
        with pytest.raises(ValueError, match="not an account name"):
            console_data.Filter.of(account, None)
    with pytest.raises(ValueError, match="not an agent name"):
        console_data.Filter.of(None, "agent') OR ('1'='1")


def test_after_sign_in_only_local_paths():
    for hostile in (
        "//evil.test",
        "https://evil.test/",
        "/\\evil.test",
        "",
        None,
        "inbox",
        "/a\nb",
    ):
        assert console._safe_next(hostile) == "/inbox"
    assert console._safe_next("/runs/r-1?x=1") == "/runs/r-1?x=1"


def test_workflow_ids_and_values_are_bounded():
    assert console_data.valid_workflow_id("refund-agent-1/with slash")
    assert not console_data.valid_workflow_id("bad\x00id")
    assert not console_data.valid_workflow_id("x" * 256)
    long = console_data.shown({"text": "y" * 10_000})
    assert len(long) < 4_100 and long.endswith("more characters not shown)")
    assert console.run_url("a/b?c#d") == "/runs/a%2Fb%3Fc%23d"


def test_sessions_are_bounded_and_expire(monkeypatch):
    """Signed-out visitors' sessions go first when the store is full; old sessions end."""
    sessions = console.Sessions(max_sessions=3)
    signed = sessions.new()
    signed.principal = "bob"
    others = [sessions.new() for _ in range(5)]
    assert sessions.get(signed.sid) is signed
    assert sessions.get(others[-1].sid) is others[-1]
    assert sessions.get(others[0].sid) is None
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    fresh = sessions.new()
    clock[0] += console.SESSION_IDLE_S + 1
    assert sessions.get(fresh.sid) is None
    assert sessions.get("") is None and sessions.get(None) is None
