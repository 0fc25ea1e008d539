"""Anomaly alerts: each rule over synthetic runs in a real audit store, emission, dedupe, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from temporalio.client import Client, ScheduleActionExecutionStartWorkflow
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from spine.client.alerts_cli import alerts, create_schedule, delete_schedule
from spine.client.cli import _SpineGroup
from spine.client.runs import start_run, wait_result
from spine.guardrails.policy import Alerts, PolicyError, load_policy
from spine.observability.alerts import (
    AlertActivities,
    AlertEngine,
    AlertsCheckResult,
    Records,
    alert_chain_id,
    jensen_shannon,
    load_records,
    total_variation,
)
from spine.observability.audit import SQLiteAuditStore, StoredEntry, verify
from spine.payloads import AuditBatch, AuditEntry, AuditKind, digest
from spine.plugin import PASSTHROUGH_MODULES
from spine.workflows.alerts import SpineAlertsWorkflow
from tests.helpers import call, eventually, policy_file, scripted_request, turn

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
Call = tuple[str, dict[str, object]]


def config(**overrides: object) -> Alerts:
    return Alerts.model_validate(overrides)


@pytest.fixture
async def store(tmp_path: Path):
    audit = SQLiteAuditStore(tmp_path / "audit.db")
    yield audit
    await audit.close()


async def write_run(
    store: SQLiteAuditStore,
    *,
    end: datetime,
    agent: str = "refund-agent",
    status: str | None = "completed",
    usd: float = 0.01,
    calls: Sequence[Call] = (),
    run_id: str | None = None,
) -> str:
    """One run's chain as the workflow writes it: run_started, tool_calls, run_outcome."""
    run_id = run_id or f"{agent}-{uuid.uuid4().hex[:8]}:first-run"
    start = end - timedelta(seconds=len(calls) + 1)

    def entry(seq: int, kind: AuditKind, at: datetime, **data: object) -> AuditEntry:
        return AuditEntry(seq=seq, kind=kind, step=seq, actor="alice", at=at.isoformat(), data=data)

    entries = [entry(0, "run_started", start, agent=agent)]
    for i, (tool, args) in enumerate(calls, 1):
        at = start + timedelta(seconds=i)
        entries.append(entry(i, "tool_call", at, tool=tool, args_digest=digest(args), outcome="ok"))
    if status is not None:
        entries.append(entry(len(entries), "run_outcome", end, status=status, usd=usd, steps=1))
    batch = AuditBatch(
        run_id=run_id, workflow_run_id="r1", agent=agent, account="acme", entries=entries
    )
    await store.append(batch)
    return run_id


async def write_runs(
    store: SQLiteAuditStore,
    count: int,
    *,
    last: datetime,
    every: timedelta = timedelta(minutes=3),
    failed: int = 0,
    agent: str = "refund-agent",
    usd: float = 0.01,
    calls: Sequence[Call] = (),
) -> None:
    """`count` runs ending `every` apart up to `last`; the first `failed` of them failed."""
    for i in range(count):
        status = "failed" if i < failed else "completed"
        await write_run(
            store, end=last - i * every, status=status, agent=agent, usd=usd, calls=calls
        )


def rules(*names: str) -> dict[str, object]:
    return {"rules": list(names)}


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """A local HTTP server on a free port recording the JSON bodies POSTed to it."""
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # the name http.server dispatches to
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0K3N", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- the rules -------------------------------------------------------------------------------


async def test_failure_rate_spike_fires_and_a_normal_window_does_not(store):
    """An agent failing 6 of 10 runs against a 5% baseline alerts; one failing 1 of 10 does not."""
    baseline_end = NOW - timedelta(hours=2)
    for agent in ("refund-agent", "steady-agent"):
        await write_runs(store, 20, last=baseline_end, every=timedelta(minutes=30), failed=1,
                         agent=agent)  # fmt: skip
    await write_runs(store, 10, last=NOW - timedelta(minutes=1), failed=6, agent="refund-agent")
    await write_runs(store, 10, last=NOW - timedelta(minutes=1), failed=1, agent="steady-agent")
    engine = AlertEngine(store, config(**rules("failure_rate_spike")))

    result = await engine.check(now=NOW)

    assert [(a.rule, a.subject) for a in result.fired] == [
        ("failure_rate_spike", "agent:refund-agent")
    ]
    alert = result.fired[0]
    assert alert.value == pytest.approx(0.6) and alert.threshold == pytest.approx(0.2)
    assert alert.details["baseline_rate"] == pytest.approx(0.05)
    assert "6 of 10 runs failed" in alert.message


async def test_failure_rate_needs_min_runs_in_the_window(store):
    """Four failed runs out of four are no verdict when min_runs is 5."""
    await write_runs(store, 4, last=NOW - timedelta(minutes=1), failed=4)
    engine = AlertEngine(store, config(**rules("failure_rate_spike"), min_runs=5))

    assert (await engine.check(now=NOW)).fired == []


async def test_cost_per_run_spike_fires_past_baseline_times_factor(store):
    """Mean cost 5x the baseline alerts; 2x (under the 3x factor) does not."""
    for agent in ("refund-agent", "frugal-agent"):
        await write_runs(store, 10, last=NOW - timedelta(hours=3), usd=0.01, agent=agent)
    await write_runs(store, 6, last=NOW - timedelta(minutes=1), usd=0.05, agent="refund-agent")
    await write_runs(store, 6, last=NOW - timedelta(minutes=1), usd=0.02, agent="frugal-agent")
    engine = AlertEngine(store, config(**rules("cost_per_run_spike")))

    result = await engine.check(now=NOW)

    assert [a.subject for a in result.fired] == ["agent:refund-agent"]
    assert result.fired[0].value == pytest.approx(0.05)
    assert result.fired[0].threshold == pytest.approx(0.03)


async def test_loop_fires_at_loop_repeats_same_tool_same_args(store):
    """Five identical lookup_order calls alert; four, or five with different args, do not."""
    same = [("lookup_order", {"order_id": "o-1001"})]
    looping = await write_run(store, end=NOW - timedelta(minutes=5), status=None, calls=same * 5)
    await write_run(store, end=NOW - timedelta(minutes=5), calls=same * 4)
    varied = [("lookup_order", {"order_id": f"o-{1000 + i}"}) for i in range(5)]
    await write_run(store, end=NOW - timedelta(minutes=5), calls=varied)
    engine = AlertEngine(store, config(**rules("loop")))

    result = await engine.check(now=NOW)

    assert [a.run_id for a in result.fired] == [looping]
    alert = result.fired[0]
    assert alert.value == 5 and alert.details["tool"] == "lookup_order"
    assert alert.details["args_digest"] == digest({"order_id": "o-1001"})
    assert alert.window_start is None  # a loop's window is its run


async def test_loop_in_a_run_no_longer_active_is_not_reported(store):
    """A run whose last tool call is before the window is not looping now."""
    same = [("lookup_order", {"order_id": "o-1001"})] * 6
    await write_run(store, end=NOW - timedelta(hours=3), calls=same)
    engine = AlertEngine(store, config(**rules("loop")))

    assert (await engine.check(now=NOW)).fired == []


async def test_drift_fires_when_an_agents_tool_mix_changes(store):
    """An agent moving from lookups and refunds to e-mails drifts; a steady one does not."""
    usual = [("lookup_order", {"order_id": "o-1"}), ("issue_refund", {"amount": 5})]
    odd = [("send_email", {"to": "x"}), ("send_email", {"to": "y"})]
    for agent in ("refund-agent", "steady-agent"):
        await write_runs(store, 15, last=NOW - timedelta(hours=2), calls=usual, agent=agent)
    await write_runs(store, 15, last=NOW - timedelta(minutes=1), calls=odd, agent="refund-agent")
    await write_runs(store, 15, last=NOW - timedelta(minutes=1), calls=usual, agent="steady-agent")
    engine = AlertEngine(store, config(**rules("drift"), drift={"min_calls": 20}))

    result = await engine.check(now=NOW)

    assert [a.subject for a in result.fired] == ["agent:refund-agent"]
    alert = result.fired[0]
    assert alert.value == pytest.approx(1.0)  # disjoint tool sets
    assert alert.details["mix"] == {"send_email": 1.0}
    assert "send_email" in alert.message


async def test_drift_with_total_variation_distance(store):
    """The tvd metric measures half the L1 distance between the mixes."""
    base = [("lookup_order", {"o": 1})] * 3 + [("issue_refund", {"a": 1})]
    now = [("lookup_order", {"o": 1})] * 1 + [("issue_refund", {"a": 1})] * 3
    await write_runs(store, 10, last=NOW - timedelta(hours=2), calls=base)
    await write_runs(store, 10, last=NOW - timedelta(minutes=1), calls=now)
    drift = {"metric": "tvd", "threshold": 0.4, "min_calls": 20}
    engine = AlertEngine(store, config(**rules("drift"), drift=drift))

    (alert,) = (await engine.check(now=NOW)).fired

    assert alert.value == pytest.approx(0.5)


def test_distances_are_zero_for_equal_and_one_for_disjoint_mixes():
    """Jensen-Shannon (base 2) and total variation both span 0..1."""
    p, q = {"a": 0.5, "b": 0.5}, {"c": 1.0}
    assert jensen_shannon(p, p) == pytest.approx(0.0)
    assert jensen_shannon(p, q) == pytest.approx(1.0)
    assert total_variation(p, p) == 0.0 and total_variation(p, q) == pytest.approx(1.0)
    assert 0 < jensen_shannon({"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}) < 0.2


async def test_rules_not_listed_in_the_policy_do_not_run(store):
    """With rules = [] nothing fires, loop or not."""
    same = [("lookup_order", {"order_id": "o-1001"})] * 6
    await write_run(store, end=NOW - timedelta(minutes=5), calls=same)

    assert (await AlertEngine(store, config(rules=[])).check(now=NOW)).fired == []


async def test_any_audit_store_gives_the_same_records(store):
    """The run-by-run reader (PostgreSQL and others) matches the SQLite window query."""

    class PlainStore:  # not a SQLiteAuditStore: forces the generic path
        entries = store.entries
        run_ids = store.run_ids

    await write_runs(store, 3, last=NOW - timedelta(hours=5), calls=[("lookup_order", {})])
    await write_run(store, end=NOW - timedelta(hours=30), calls=[("send_email", {})])  # too old
    await write_run(store, end=NOW - timedelta(minutes=2), status=None, calls=[("x", {})])
    since, active = NOW - timedelta(hours=25), NOW - timedelta(hours=1)

    fast = await load_records(store, since=since, active_since=active)
    slow = await load_records(PlainStore(), since=since, active_since=active)  # type: ignore[arg-type]  # duck-typed store

    def key(records: Records) -> tuple[list[object], list[object]]:
        return sorted(map(repr, records.runs)), sorted(map(repr, records.tool_calls))

    assert key(fast) == key(slow)
    assert len(fast.runs) == 3 and len(fast.tool_calls) == 4


# --- emitting --------------------------------------------------------------------------------


async def test_webhook_receives_each_new_alert(store, webhook):
    """A new alert is POSTed as {"text", "alert"} to the webhook."""
    url, received = webhook
    await write_run(store, end=NOW - timedelta(minutes=5), calls=[("lookup_order", {})] * 5)
    engine = AlertEngine(store, config(**rules("loop")), webhook_url=url)

    result = await engine.check(now=NOW)

    assert len(result.fired) == 1 and len(received) == 1
    body = received[0]
    alert = body["alert"]
    assert isinstance(alert, dict)
    assert alert["rule"] == "loop" and alert["key"] == result.fired[0].key
    assert str(body["text"]).startswith("[spine] warning: run ")


async def test_webhook_failure_is_logged_and_the_check_still_succeeds(store, caplog):
    """A webhook nobody answers logs one error naming only its host; the check returns."""
    await write_run(store, end=NOW - timedelta(minutes=5), calls=[("lookup_order", {})] * 5)
    url = "http://127.0.0.1:9/hooks/S3CRET"  # port 9 (discard): nothing listens
    engine = AlertEngine(store, config(**rules("loop")), webhook_url=url)

    with caplog.at_level(logging.WARNING, logger="spine.alerts"):
        result = await engine.check(now=NOW)

    assert len(result.fired) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "http://127.0.0.1:9/..." in errors[0]
    assert "S3CRET" not in caplog.text


async def test_each_alert_is_one_json_log_line(store, caplog):
    """Every new alert is one JSON line on the spine.alerts logger."""
    calls = [("lookup_order", {"o": 1})] * 5 + [("send_email", {"to": "a"})] * 5
    await write_run(store, end=NOW - timedelta(minutes=5), calls=calls)

    with caplog.at_level(logging.WARNING, logger="spine.alerts"):
        result = await AlertEngine(store, config(**rules("loop"))).check(now=NOW)

    lines = [r.getMessage() for r in caplog.records if r.name == "spine.alerts"]
    assert len(lines) == 2 == len(result.fired)
    assert all("\n" not in line for line in lines)
    assert sorted(json.loads(line)["key"] for line in lines) == sorted(a.key for a in result.fired)


async def test_alerts_are_audit_entries_on_a_chain_that_verifies(store):
    """Alerts land as `alert` entries on alerts:<date>, and the chain verifies."""
    await write_run(store, end=NOW - timedelta(minutes=5), calls=[("lookup_order", {})] * 5)
    await write_run(store, end=NOW - timedelta(minutes=4), calls=[("send_email", {})] * 6)
    engine = AlertEngine(store, config(**rules("loop")), policy_version="p-1")

    result = await engine.check(now=NOW)

    chain = alert_chain_id(NOW)
    assert chain == "alerts:2026-11-26"
    entries = await store.entries(chain)
    assert [e.kind for e in entries] == ["alert", "alert"]
    assert {e.data["subject"] for e in entries} == {a.subject for a in result.fired}
    assert entries[0].policy_version == "p-1" and "message" in entries[0].data
    everything: list[StoredEntry] = []
    for run_id in await store.run_ids():
        everything += await store.entries(run_id)
    assert verify(everything).ok


async def test_the_same_alert_is_emitted_once(store, webhook):
    """A second check over an overlapping window repeats nothing; a later window alerts again."""
    url, received = webhook
    await write_runs(store, 6, last=NOW - timedelta(minutes=1), failed=6)
    settings = config(**rules("failure_rate_spike"), baseline_s=3600)
    engine = AlertEngine(store, settings, webhook_url=url)

    first = await engine.check(now=NOW)
    again = await engine.check(now=NOW + timedelta(minutes=10))
    once_more = await AlertEngine(store, settings).check(now=NOW + timedelta(minutes=20))
    await write_runs(store, 6, last=NOW + timedelta(hours=3, minutes=-1), failed=6)
    later = await engine.check(now=NOW + timedelta(hours=3))

    assert len(first.fired) == 1 and first.suppressed == []
    assert again.fired == [] and [a.subject for a in again.suppressed] == ["agent:refund-agent"]
    assert once_more.fired == []  # the memory is the audit chain, not the engine
    assert len(later.fired) == 1  # 14:00-15:00 does not overlap 11:00-12:00
    assert len(received) == 2
    assert len(await store.entries(alert_chain_id(NOW))) == 2


async def test_a_loop_is_reported_once_per_run(store):
    """A run still looping an hour later is not reported again."""
    same = [("lookup_order", {"order_id": "o-1"})]
    run_id = await write_run(store, end=NOW - timedelta(minutes=5), status=None, calls=same * 5)
    engine = AlertEngine(store, config(**rules("loop")))
    first = await engine.check(now=NOW)
    await store.append(
        AuditBatch(
            run_id=run_id,
            workflow_run_id="r1",
            agent="refund-agent",
            account="acme",
            entries=[
                AuditEntry(
                    seq=6,
                    kind="tool_call",
                    step=6,
                    actor="alice",
                    at=(NOW + timedelta(minutes=70)).isoformat(),
                    data={"tool": "lookup_order", "args_digest": digest({"order_id": "o-1"})},
                )
            ],
        )
    )

    later = await engine.check(now=NOW + timedelta(minutes=75))

    assert len(first.fired) == 1 and later.fired == [] and len(later.suppressed) == 1
    assert later.suppressed[0].value == 6


async def test_dry_run_writes_and_sends_nothing(store, webhook):
    """emit=False reports what would fire without an audit entry or a POST."""
    url, received = webhook
    await write_run(store, end=NOW - timedelta(minutes=5), calls=[("lookup_order", {})] * 5)
    engine = AlertEngine(store, config(**rules("loop")), webhook_url=url)

    result = await engine.check(now=NOW, emit=False)

    assert len(result.fired) == 1 and received == []
    assert await store.entries(alert_chain_id(NOW)) == []


# --- policy ----------------------------------------------------------------------------------


def test_policy_file_carries_the_alert_thresholds(tmp_path):
    """The default policy has an [alerts] section; a bad entry is refused by name."""
    policy = load_policy()
    assert policy.alerts.loop_repeats == 5 and policy.alerts.window_s == 3600
    assert set(policy.alerts.rules) == {"failure_rate_spike", "cost_per_run_spike", "loop", "drift"}
    bad = policy_file(tmp_path)
    bad.write_text(bad.read_text().replace('metric = "jsd"', 'metric = "kl"'))
    with pytest.raises(PolicyError, match=r"alerts\.drift\.metric"):
        load_policy(bad)


def test_engine_webhook_comes_from_the_environment_before_the_policy(store):
    """SPINE_ALERT_WEBHOOK wins over the policy's webhook_url; an explicit URL wins over both."""
    policy = load_policy()
    policy.alerts.webhook_url = "http://policy.example/hook"
    env = {"SPINE_ALERT_WEBHOOK": "http://env.example/hook"}

    assert AlertEngine.from_policy(store, policy).webhook_url == "http://policy.example/hook"
    assert AlertEngine.from_policy(store, policy, env).webhook_url == "http://env.example/hook"
    explicit = AlertEngine.from_policy(store, policy, env, webhook_url="http://x.example/")
    assert explicit.webhook_url == "http://x.example/"


# --- the command -----------------------------------------------------------------------------


def spine_alerts(state_dir: Path, *args: str) -> tuple[int, str, str]:
    group = _SpineGroup("spine", commands={"alerts": alerts})
    result = CliRunner().invoke(
        group,
        ["alerts", *args],
        env={
            "SPINE_STATE_DIR": str(state_dir),
            "SPINE_POLICY": None,
            "SPINE_AUDIT_DSN": None,
            "SPINE_ALERT_WEBHOOK": None,
        },
    )
    return result.exit_code, result.stdout, result.stderr


def test_cli_check_exits_3_when_alerts_fire_then_0_once_reported(tmp_path):
    """`spine alerts check` exits 3 with new alerts, 0 when they were already reported."""

    async def seed() -> None:
        store = SQLiteAuditStore(tmp_path / "audit.db")
        now = datetime.now(UTC)
        await write_run(store, end=now - timedelta(minutes=2), calls=[("lookup_order", {})] * 5)
        await store.close()

    asyncio.run(seed())

    dry = spine_alerts(tmp_path, "check", "--dry-run")
    first = spine_alerts(tmp_path, "check", "--json", "--since", "2h")
    second = spine_alerts(tmp_path, "check")

    assert dry[0] == 3 and "1 alert would fire" in dry[1]
    assert first[0] == 3, first[2]
    report = json.loads(first[1])
    assert [a["rule"] for a in report["fired"]] == ["loop"]
    assert second[0] == 0 and "no new alerts" in second[1] and "already reported" in second[1]


def test_cli_check_without_an_audit_log_is_one_error_line(tmp_path):
    """No audit.db in SPINE_STATE_DIR: exit 1 and one `spine: error:` line naming the fix."""
    code, out, err = spine_alerts(tmp_path / "nowhere", "check")

    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("spine: error:") and "SPINE_STATE_DIR" in err


def test_cli_check_refuses_a_bad_since(tmp_path):
    """A --since that is not a duration or a time is a usage error (exit 2)."""
    code, _, err = spine_alerts(tmp_path, "check", "--since", "soon")

    assert code == 2 and "--since" in err


# --- end to end ------------------------------------------------------------------------------


async def test_a_real_run_repeating_lookup_order_raises_a_loop_alert(
    client, make_worker, task_queue, worker_config
):
    """A scripted run calling lookup_order 5 times with the same args trips the loop rule."""
    lookup = call("lookup_order", order_id="o-1201")
    script = [turn(lookup) for _ in range(5)] + [turn(text="done")]
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed"
    store = SQLiteAuditStore(worker_config.state_dir / "audit.db")
    try:
        engine = AlertEngine.from_policy(store, load_policy())
        checked = await engine.check()
    finally:
        await store.close()

    loops = [a for a in checked.fired if a.rule == "loop"]
    assert len(loops) == 1
    assert loops[0].details["workflow_id"] == handle.id
    assert loops[0].details["args_digest"] == digest({"order_id": "o-1201"})


async def test_the_schedule_runs_the_check_as_a_workflow(client: Client, task_queue, tmp_path):
    """`spine alerts schedule` starts SpineAlertsWorkflow, whose activity records the alert."""
    store = SQLiteAuditStore(tmp_path / "audit.db")
    now = datetime.now(UTC)
    await write_run(store, end=now - timedelta(minutes=2), calls=[("lookup_order", {})] * 5)
    engine = AlertEngine(store, config(**rules("loop")))
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    )
    schedule_id = f"spine-alerts-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[SpineAlertsWorkflow],
        activities=[AlertActivities(engine).check],
        workflow_runner=runner,
    )
    try:
        async with worker:
            done = await create_schedule(
                client, every=timedelta(hours=1), task_queue=task_queue, schedule_id=schedule_id
            )
            assert done == "created"
            started: list[str] = []

            async def first_check_started() -> bool:
                info = (await client.get_schedule_handle(schedule_id).describe()).info
                for done in info.recent_actions:
                    if isinstance(done.action, ScheduleActionExecutionStartWorkflow):
                        started.append(done.action.workflow_id)
                return bool(started)

            await eventually(first_check_started, what="the scheduled check to start")
            handle = client.get_workflow_handle(started[0], result_type=AlertsCheckResult)
            result = await handle.result()
            assert await create_schedule(
                client, every=timedelta(minutes=5), task_queue=task_queue, schedule_id=schedule_id
            ) == "updated"  # fmt: skip
    finally:
        await delete_schedule(client, schedule_id)
        await store.close()

    assert [a.rule for a in result.fired] == ["loop"]
    reader = SQLiteAuditStore(tmp_path / "audit.db", read_only=True)
    entries = await reader.entries(alert_chain_id(result.at))
    await reader.close()
    assert entries[0].workflow_run_id.startswith(schedule_id)
