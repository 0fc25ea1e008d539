"""The `spine` command and the README tell the truth, tried the way a new user tries them.

Each test is one finding of issue 15 (part 2): it failed before the change that fixed it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from spine.client.runs import get_run, get_state, start_run, wait_result
from spine.client.testing import VaultDev, _worker_polls, binary, stop_worker_process
from spine.contract import AgentRequest, ModelChoice
from spine.plugin import SpineConfig, build_worker
from tests.helpers import (
    SPINE,
    call,
    custom_policy,
    eventually,
    policy_file,
    scripted_request,
    signing_env,
    turn,
    wait_for_status,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str, language: str) -> str:
    """The fenced `language` block of the README that holds `marker`, else the first one after
    it."""
    text = README.read_text()
    at = text.index(marker)
    for found in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
        if found.end() > at:
            return found.group(1)
    raise AssertionError(f"no ```{language} block at or after {marker!r} in the README")


def run_spine(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SPINE, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _spawn(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


# ------------------------------------------------------------ agent modules in the current dir


def _weather_project(tmp_path: Path) -> Path:
    """The README walkthrough's weather agent and its minimal policy, in a fresh directory."""
    project = tmp_path / "weather"
    project.mkdir()
    (project / "weather_agent.py").write_text(readme_block("# weather_agent.py", "python"))
    policy = readme_block("the minimal one for the weather agent is:", "toml")
    policy += '\n[principals.alice]\nroles = ["user"]\naccounts = ["*"]\n'
    (project / "policy.toml").write_text(policy)
    return project


def test_tools_lock_finds_an_agent_module_in_the_current_directory(tmp_path):
    """`spine tools lock --agents weather_agent` next to weather_agent.py (was
    ModuleNotFoundError: the console script's path did not hold the current directory)."""
    project = _weather_project(tmp_path)
    done = run_spine("tools", "lock", "--agents", "weather_agent", cwd=project)
    assert done.returncode == 0, done.stderr
    assert '"forecast"' in (project / "tools.lock.json").read_text()


def test_an_unknown_agent_module_is_one_line(tmp_path):
    """`spine worker` and `spine tools lock` with a module that does not exist: one line each,
    naming it, before anything connects (was a 40-line traceback)."""
    env = {"SPINE_AGENTS": "no_such_agent", "TEMPORAL_ADDRESS": "127.0.0.1:9"}
    worker = run_spine("worker", cwd=tmp_path, env=env)
    tools = run_spine("tools", "lock", "--agents", "no_such_agent", cwd=tmp_path)
    for done, code in ((worker, 2), (tools, 1)):
        assert done.returncode == code, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "cannot import agent module 'no_such_agent'" in done.stderr


async def test_spine_worker_serves_an_agent_module_in_the_current_directory(
    client, vault: VaultDev, temporal_env, tmp_path
):
    """`SPINE_AGENTS=weather_agent spine worker`, run where weather_agent.py is, serves it: a
    weather run completes (the README's walkthrough agent and minimal policy, as written)."""
    project = _weather_project(tmp_path)
    queue = f"weather-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        "SPINE_AGENTS": "weather_agent",
        "SPINE_POLICY": "policy.toml",
        "SPINE_TASK_QUEUE": queue,
        "SPINE_STATE_DIR": str(tmp_path / "state"),
        "SPINE_LEDGER_WORKER": "0",
        "VAULT_ADDR": vault.url,
        "VAULT_TOKEN": vault.token,
    }
    log = tmp_path / "worker.log"
    process = await asyncio.to_thread(_spawn, [SPINE, "worker"], project, env, log)

    async def polls() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        return await asyncio.to_thread(_worker_polls, process, env)

    try:
        await eventually(polls, timeout=120, what="spine worker to poll its task queue")
        request = AgentRequest(
            agent="weather-agent",
            goal="Weather in Oslo?",
            user="alice",
            role="user",
            account="acme",
            model=ModelChoice(
                script=[turn(call("forecast", city="Oslo")), turn(text="Sunny in Oslo.")]
            ),
        )
        handle = await start_run(client, request, task_queue=queue)
        result = await asyncio.wait_for(wait_result(handle), timeout=120)
    finally:
        stop_worker_process(process)
    assert result.status == "completed", result.reason
    assert result.output == "Sunny in Oslo."


# ------------------------------------------------- the Temporal CLI: updates and signals refused


def _cli(client, principal: str | None, *args: str, env: dict[str, str] | None = None):
    """Run a command (`temporal ...` or `spine ...`) as `principal` against the test server."""
    full = {
        **os.environ,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
        **(signing_env(client, principal) if principal else {}),
        **(env or {}),
    }
    return subprocess.run(args, env=full, capture_output=True, text=True, timeout=120)


async def _awaiting(client, make_worker_ctx, task_queue: str, order: str):
    request = scripted_request(
        [turn(call("issue_refund", order_id=order, amount=150.0)), turn(text="Refunded.")]
    )
    handle = await start_run(client, request, task_queue=task_queue)
    state = await wait_for_status(handle, "awaiting_approval")
    return handle, state.pending_approvals[0].approval_id


async def test_update_refusals_are_final_and_typed_in_the_temporal_cli(
    client, make_worker, task_queue
):
    """A `decide` with a payload that is not a decision, one with a role bob lacks, and an
    `operate` that is not a command: the Temporal CLI prints `(type: DecisionRefused,
    retryable: false)` naming what was wrong (a garbled payload was `RuntimeError, retryable:
    true`); the run still takes bob's good decision."""
    temporal = binary("temporal")
    async with make_worker():
        handle, approval = await _awaiting(client, make_worker, task_queue, "o-1251")

        def update(name: str, payload: str, signed: bool) -> subprocess.CompletedProcess:
            headers = []
            if signed:
                sign = _cli(client, "bob", SPINE, "sign", name, "--workflow-id", handle.id,
                            "--input", payload)  # fmt: skip
                assert sign.returncode == 0, sign.stderr
                headers = ["--headers", sign.stdout.strip()]
            return _cli(client, "bob", temporal, "workflow", "update", "execute",
                        "--workflow-id", handle.id, "--name", name, "--input", payload,
                        *headers)  # fmt: skip

        garbled = json.dumps(
            {"approval_id": approval, "decision": "yes", "by": "bob", "role": "supervisor"}
        )
        wrong_role = json.dumps(
            {"approval_id": approval, "decision": "approve", "by": "bob", "role": "viewer"}
        )
        good = json.dumps(
            {"approval_id": approval, "decision": "approve", "by": "bob", "role": "supervisor"}
        )
        refusals = [
            await asyncio.to_thread(update, "decide", garbled, False),
            await asyncio.to_thread(update, "decide", wrong_role, True),
            await asyncio.to_thread(update, "operate", "[1]", False),
        ]
        accepted = await asyncio.to_thread(update, "decide", good, True)
        result = await wait_result(handle)
    for done in refusals:
        assert done.returncode != 0
        assert "(type: DecisionRefused, retryable: false)" in done.stderr, done.stderr
        assert "RuntimeError" not in done.stderr and "retryable: true" not in done.stderr
    assert "invalid ApprovalDecision: decision: Input should be 'approve' or 'reject'" in (
        refusals[0].stderr
    )
    assert "does not hold role 'viewer'" in refusals[1].stderr
    assert "invalid OperatorCommand" in refusals[2].stderr
    assert accepted.returncode == 0, accepted.stderr
    assert result.status == "completed"


async def test_a_wrong_signal_payload_is_audited_and_in_state(
    client, make_worker, task_queue, tmp_path
):
    """`temporal workflow signal --name approval` with a payload that is not a decision: the
    run refuses it, lists it in `state.refused`, and `spine audit show` has the refusal; no
    workflow task fails over it (it used to be dropped with a traceback in the worker log)."""
    temporal = binary("temporal")
    async with make_worker():
        handle, approval = await _awaiting(client, make_worker, task_queue, "o-1252")
        bad = json.dumps({"approval_id": approval, "decision": "yes", "by": "bob"})
        sent = await asyncio.to_thread(
            _cli, client, None, temporal, "workflow", "signal", "--workflow-id", handle.id,
            "--name", "approval", "--input", bad,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        async def refused() -> bool:
            return bool((await get_state(handle)).refused)

        await eventually(refused, what="the bad signal to show in state.refused")
        state = await get_state(handle)
        audit = await asyncio.to_thread(
            _cli, client, None, SPINE, "audit", "show", handle.id,
            env={"SPINE_STATE_DIR": str(tmp_path / "state")},
        )  # fmt: skip
        await handle.cancel()
        await wait_result(handle)
        kinds = [e.event_type async for e in handle.fetch_history_events()]
    problem = "invalid ApprovalDecision: decision: Input should be 'approve' or 'reject'"
    assert state.status == "awaiting_approval"
    assert any(problem in line for line in state.refused), state.refused
    assert audit.returncode == 0, audit.stderr
    assert re.search(rf"approval\s+unauthenticated refused .*{re.escape(problem)}", audit.stdout)
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED not in kinds


# ----------------------------------------------------------------------------- spine operator


async def test_spine_operator_refusals_exit_1_with_the_reason(
    client, make_worker, task_queue, tmp_path
):
    """On a parked model turn: alice's retry (not an operator role) and ops' skip (a model turn
    is not skippable) each exit 1 with the run's reason in one line (it used to print "sent
    retry" and exit 0); ops' abort is accepted and the run ends failed."""
    policy = policy_file(
        tmp_path, runtime={"model_max_attempts": 2, "model_initial_interval_s": 0.1}
    )
    script = [turn(call("lookup_order", order_id="o-1253")), turn(text="Found it.")]
    script[1].error = "transient"
    env = {"SPINE_TASK_QUEUE": task_queue}
    async with make_worker(policy_path=policy):
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        await wait_for_status(handle, "parked", timeout=120)

        def operator(action: str, by: str, role: str) -> subprocess.CompletedProcess:
            return _cli(client, by, SPINE, "operator", handle.id, action, "--role", role, env=env)

        not_an_operator = await asyncio.to_thread(operator, "retry", "alice", "support")
        not_skippable = await asyncio.to_thread(operator, "skip", "ops", "operator")
        abort = await asyncio.to_thread(operator, "abort", "ops", "operator")
        result = await wait_result(handle)
    for done in (not_an_operator, not_skippable):
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("spine: error: ")
        assert "refused" in done.stderr and "sent" not in done.stdout
    assert "role 'support' may not operate runs" in not_an_operator.stderr
    assert "a model turn cannot be skipped" in not_skippable.stderr
    assert abort.returncode == 0, abort.stderr
    assert result.status == "failed" and "aborted by operator ops" in (result.reason or "")


# ----------------------------------------------------------------------- spine run --wait parks


async def test_spine_run_wait_returns_when_the_run_parks(
    client, make_worker, task_queue, tmp_path, service
):
    """`spine run --wait` on a run whose tool keeps failing stops once the run parks: it prints
    the reason and the operator commands and exits 3 (it used to wait forever)."""
    account = f"nosecret-{uuid.uuid4().hex[:6]}"  # no API key in Vault: the lookup parks
    script = tmp_path / "script.json"
    turns = [turn(call("lookup_order", order_id="o-1254")), turn(text="ok")]
    script.write_text(json.dumps([t.model_dump(mode="json", exclude_none=True) for t in turns]))
    wid = f"parks-{task_queue}"
    state_dir = tmp_path / "state"  # the worker's: the live stream is read there
    async with make_worker():
        done = await asyncio.to_thread(
            _cli, client, "alice", SPINE, "run", "refund-agent", "Look o-1254 up",
            "--role", "support", "--account", account, "--script", str(script), "--id", wid,
            "--wait", env={"SPINE_TASK_QUEUE": task_queue, "SPINE_STATE_DIR": str(state_dir)},
        )  # fmt: skip
        state = await get_state(get_run(client, wid))
        await get_run(client, wid).cancel()
        await wait_result(get_run(client, wid))
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert state.status == "parked"
    assert "exhausted its retries" in done.stdout and f"spine operator {wid} retry" in done.stdout
    assert done.stderr.count("\n") == 1 and "is parked" in done.stderr


# -------------------------------------------------- runs whose calls were refused or failed


async def test_a_run_whose_refund_failed_does_not_complete_with_the_models_claim(
    client, make_worker, task_queue, tmp_path
):
    """The refund fails (no such order) and the model still says "Refunded 40.": by default
    the run ends `failed` saying why, and the failed call is in `state`, the result and `spine
    status`; with `on_failed_side_effect = "complete"` the answer stands, the failure still
    listed. A lookup the viewer may not make is listed but decides nothing (not risky)."""
    script = [
        turn(call("issue_refund", order_id="o-9999", amount=40.0)),
        turn(text="Refunded 40."),
    ]
    complete = policy_file(tmp_path, runtime={"on_failed_side_effect": "complete"}, name="c.toml")
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
        status = await asyncio.to_thread(
            _cli, client, None, SPINE, "status", handle.id, env={"SPINE_TASK_QUEUE": task_queue}
        )
        viewer = scripted_request(
            [turn(call("issue_refund", order_id="o-1255", amount=1.0)), turn(text="Done.")],
            role="viewer",
        )
        refused = await wait_result(await start_run(client, viewer, task_queue=task_queue))
    async with make_worker(policy_path=complete):
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        allowed = await wait_result(handle)
    assert result.status == "failed", result
    assert result.output == "Refunded 40."
    assert "side-effect call(s) did not succeed: issue_refund" in (result.reason or "")
    assert 'on_failed_side_effect = "fail"' in (result.reason or "")
    [failed] = result.failed_calls
    assert (failed.tool, failed.outcome, failed.side_effects) == ("issue_refund", "failed", True)
    assert "order 'o-9999' not found" in failed.reason
    assert status.returncode == 0, status.stderr
    assert "status    failed" in status.stdout and "failed calls (1)" in status.stdout
    assert "issue_refund failed: error: ToolFailed" in status.stdout
    assert refused.status == "failed"
    assert refused.failed_calls[0].outcome == "refused"
    assert allowed.status == "completed" and allowed.output == "Refunded 40."
    assert [c.tool for c in allowed.failed_calls] == ["issue_refund"]


async def test_a_refused_lookup_is_listed_but_the_run_completes(client, make_worker, task_queue):
    """A read-only call that was refused is shown in `state`/the result; it does not stop the
    run from completing (only risky calls do)."""
    script = [
        turn(call("lookup_order", order_id="not an id", extra=1)),
        turn(call("lookup_order", order_id="o-1256")),
        turn(text="Found it."),
    ]
    async with make_worker():
        handle = await start_run(client, scripted_request(script), task_queue=task_queue)
        result = await wait_result(handle)
    assert result.status == "completed", result.reason
    [failed] = result.failed_calls
    assert (failed.tool, failed.outcome, failed.side_effects) == ("lookup_order", "refused", False)


# ------------------------------------------------ which worker serves which agent (spine run)


def _two_agent_policy(tmp_path: Path) -> Path:
    """The test policy plus the weather agent (alice may use it as `user`)."""

    def change(data: dict) -> None:
        data["agents"]["weather-agent"] = {"roles": {"user": ["forecast"]}}
        data["principals"]["alice"]["roles"] = ["support", "user"]

    return custom_policy(tmp_path, change, name="two-agents.toml")


async def test_spine_run_of_an_agent_no_worker_serves_starts_nothing(
    client, make_worker, task_queue, tmp_path
):
    """`spine run ghost-agent ...` exits 1 with one line naming the agent and the task queue,
    and no run is started; with no worker on the queue at all it says so (it used to print
    "started" and exit 0)."""
    env = {"SPINE_TASK_QUEUE": task_queue}
    args = ("run", "ghost-agent", "hi", "--role", "support", "--account", "acme")
    nobody = await asyncio.to_thread(_cli, client, "alice", SPINE, *args, env=env)
    async with make_worker():
        unknown = await asyncio.to_thread(_cli, client, "alice", SPINE, *args, env=env)
    assert nobody.returncode == 1 and nobody.stderr.count("\n") == 1, nobody.stderr
    assert f"no worker polls task queue '{task_queue}'" in nobody.stderr
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert f"no worker on task queue '{task_queue}' serves agent 'ghost-agent'" in unknown.stderr
    assert "started" not in unknown.stdout + nobody.stdout
    runs = [
        w
        async for w in client.list_workflows(
            f"WorkflowType='AgentWorkflow' AND TaskQueue='{task_queue}'"
        )
    ]
    assert runs == []


async def test_a_worker_refuses_and_requeues_an_agent_it_does_not_serve(
    client, vault: VaultDev, worker_config, task_queue, tmp_path
):
    """Two workers share one task queue, one serving refund-agent and one the walkthrough's
    weather-agent: every run of either completes, because a worker that does not serve a run's
    agent refuses its `spine.resolve_agent` (retryable `AgentNotServed`) and the task goes back
    to the queue for the other one (it used to fail the run: UnknownTool, non-retryable)."""
    policy = _two_agent_policy(tmp_path)
    # A worker per client and task queue: the second worker connects on its own.
    other = vault.signed(
        await Client.connect(
            client.service_client.config.target_host,
            namespace=client.namespace,
            data_converter=client.data_converter,
        )
    )
    base = {**worker_config.__dict__, "policy_path": policy}
    demo = SpineConfig(**base)
    weather_only = SpineConfig(
        **{**base, "agent_modules": ("tests.fakes.weather_agent",), "ledger": False}
    )
    weather = AgentRequest(
        agent="weather-agent",
        goal="Weather?",
        user="alice",
        role="user",
        account="acme",
        model=ModelChoice(script=[turn(text="Sunny.")]),
    )
    refund = scripted_request([turn(text="Nothing to do.")])
    async with build_worker(client, config=demo), build_worker(other, config=weather_only):
        handles = [await start_run(client, r, task_queue=task_queue) for r in [weather, refund] * 5]
        results = [await wait_result(h) for h in handles]
    assert [r.status for r in results] == ["completed"] * 10, [r.reason for r in results]


# ------------------------------------------------------------------- the test kit as a plugin

USER_TEST = """
from spine.client.testing import assert_tools_called, script, spine_worker, start_scripted_run
from spine.guardrails.secrets import VaultSecrets


async def test_weather(client, vault, tmp_path):
    turns = script().tool("forecast", city="Oslo").text("Sunny in Oslo.")
    async with spine_worker(
        client,
        agent_modules=("weather_agent",),
        policy_path="policy.toml",
        identity=VaultSecrets(vault.url, token=vault.token),
        ledger=False,
    ) as worker:
        handle = await start_scripted_run(
            client, worker, "weather-agent", "Weather in Oslo?", turns, role="user"
        )
        result = await handle.result()
    assert result.status == "completed" and result.output == "Sunny in Oslo."
    await assert_tools_called(handle, ["forecast"])
"""


def test_the_test_kit_fixtures_work_in_a_project_of_ones_own(tmp_path):
    """A user's test in a directory of its own, outside this repository and with no conftest,
    gets `client` and `vault` from the installed plugin (entry point ``pytest11``) and runs the
    README's weather agent to completion (they used to exist only in Spine's tests/conftest.py)."""
    project = _weather_project(tmp_path)
    (project / "test_weather.py").write_text(USER_TEST)
    (project / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
        "asyncio_default_test_loop_scope = session\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TEMPORAL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_weather.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert not Path(str(project)).resolve().is_relative_to(README.parent)


# ------------------------------------------------------------- spine slo / trace / alerts


def _alerting_state_dir(path: Path) -> Path:
    """An audit log holding a run that trips the loop rule (5 identical lookups)."""
    from datetime import UTC, datetime, timedelta

    from spine.observability.audit import SQLiteAuditStore
    from tests.test_alerts import write_run

    async def seed() -> None:
        store = SQLiteAuditStore(path / "audit.db")
        now = datetime.now(UTC)
        await write_run(store, end=now - timedelta(minutes=2), calls=[("lookup_order", {})] * 5)
        await store.close()

    path.mkdir()
    asyncio.run(seed())
    return path


def test_alerts_check_prints_only_its_text_and_documents_its_exit_codes(tmp_path):
    """`spine alerts check` with a new alert: the text on stdout and nothing on stderr (a raw
    JSON line used to come first); `--log-json` gives collectors that line on stderr; the exit
    statuses are in --help."""
    quiet = {"SPINE_POLICY": "", "SPINE_AUDIT_DSN": "", "SPINE_DATABASE_URL": ""}
    plain = run_spine(
        "alerts", "check", cwd=tmp_path,
        env={**quiet, "SPINE_STATE_DIR": str(_alerting_state_dir(tmp_path / "a"))},
    )  # fmt: skip
    logged = run_spine(
        "alerts", "check", "--log-json", cwd=tmp_path,
        env={**quiet, "SPINE_STATE_DIR": str(_alerting_state_dir(tmp_path / "b"))},
    )  # fmt: skip
    usage = run_spine("alerts", "check", "--help", cwd=tmp_path)
    assert plain.returncode == 3, plain.stderr
    assert plain.stderr == "" and plain.stdout.startswith("WARNING   loop"), plain.stdout
    assert logged.returncode == 3
    assert json.loads(logged.stderr.strip().splitlines()[0])["rule"] == "loop"
    assert "3  new alerts fired" in usage.stdout and "0  no new alert" in usage.stdout


def test_slo_never_prints_a_negative_budget_left():
    """Two of two runs failed against a 99% target: the budget is "exhausted, over budget by
    1.98 failures", not "-9800.00% left"; the JSON's share left is clamped at 0."""
    from datetime import UTC, datetime, timedelta

    from spine.client.slo_cli import Run, render, slo_report

    now = datetime.now(UTC)
    runs = [
        Run(f"r{i}", "failed", True, now - timedelta(minutes=5), now, 0.001, 3, 0) for i in range(2)
    ]
    report = slo_report(runs, target=0.99, since=now - timedelta(hours=1), until=now)
    [line] = [line for line in render(report) if line.startswith("budget")]
    assert "exhausted, over budget by 1.98 failures" in line, line
    assert not re.search(r"-\d", line.split(";")[-1]), line
    assert report.budget_remaining == 0.0 and report.budget_over_by == 1.98


def test_trace_with_otlp_configured_says_where_the_spans_went(tmp_path):
    """`spine trace RUN` where the workers export to an OTLP collector: one line naming the
    endpoint (it used to say only that there was no trace file / no spans)."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.internal:4318",
        "SPINE_STATE_DIR": str(tmp_path / "state"),
        "SPINE_DATABASE_URL": "",
        "SPINE_TRACE_FILE": "",
    }
    done = run_spine("trace", "refund-agent-1a2b3c", cwd=tmp_path, env=env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "OTLP endpoint http://collector.internal:4318/v1/traces" in done.stderr
    assert "spine.run.id = 'refund-agent-1a2b3c'" in done.stderr


# ------------------------------------------------------- what the README's CLI runs cost


async def test_a_cli_run_whose_script_states_no_usage_costs_something(
    client, make_worker, task_queue, tmp_path
):
    """`spine run --script` with turns that state no usage (as in the README) reports what a
    provider would (a token per four bytes of the prompt and the answer), so the run costs
    more than $0 and its spend lands on the account's budget ledger."""
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                {"tool_calls": [{"name": "lookup_order", "args": {"order_id": "o-1257"}}]},
                {"text": "Order o-1257 is on its way."},
            ]
        )
    )
    env = {"SPINE_TASK_QUEUE": task_queue}

    def committed() -> float:
        shown = _cli(client, "alice", SPINE, "budget", "show", "acme", "--json", env=env)
        if shown.returncode != 0:  # no ledger yet: nothing spent
            return 0.0
        windows = json.loads(shown.stdout)["windows"]
        return sum(w["committed_usd"] for w in windows if w["window"].startswith("day"))

    async with make_worker():
        before = await asyncio.to_thread(committed)
        done = await asyncio.to_thread(
            _cli, client, "alice", SPINE, "run", "refund-agent", "Where is o-1257?",
            "--role", "support", "--account", "acme", "--script", str(script), "--wait",
            "--json", env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        usage = json.loads(done.stdout)["result"]["usage"]
        after = await asyncio.to_thread(committed)
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["usd"] > 0
    assert after - before >= usage["usd"] - 1e-9, (before, after, usage)


# ------------------------------------------------------------ the README's Temporal CLI way in


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.index("\n#", start + len(title))
    return text[start:end]


async def test_the_readmes_temporal_cli_way_in_runs_as_written(
    client, make_worker, task_queue, tmp_path
):
    """The shell blocks of "The Temporal CLI way in", run with bash from a fresh shell whose
    PATH has no venv: the venv is activated by the README's own line, the run completes, and
    the refund above 100.00 is approved with the `decide` payload signed as the README shows.
    Only what starts servers or logs in is replaced (the test's own server, worker and tokens).
    """
    section = _readme_section("### The Temporal CLI way in")
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section's two shell blocks"
    venv = Path(sys.executable).parent
    tokens = {name: signing_env(client, name) for name in ("alice", "bob")}
    first, second = f"rf1-{uuid.uuid4().hex[:8]}", f"rf2-{uuid.uuid4().hex[:8]}"

    def adapt(block: str) -> str:
        lines = []
        for line in block.splitlines():
            if line.startswith("make setup && source .venv/bin/activate"):
                line = f"source {venv}/activate"
            elif line.startswith(("temporal-dev/up", "python worker.py")):
                continue
            elif line.startswith("spine login --user"):
                who = line.split()[3]
                env = tokens[who]
                line = " ".join(f"export {k}={v}" for k, v in env.items())
            lines.append(line)
        script = "\n".join(lines)
        for old, new in (
            ("spine-agents", task_queue),
            ("refund-1", first),
            ("refund-2", second),
            ("o-1001", "o-1258"),
        ):
            script = script.replace(old, new)
        return script

    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv)
    env = {
        **{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        "PATH": path,
        "TEMPORAL_ADDRESS": client.service_client.config.target_host,
    }
    # The blocks run in one shell, as a person pasting them would.
    script = f"set -e\nsource {venv}/activate\n" + adapt(blocks[0]) + "\n" + adapt(blocks[1])
    script = script.replace(f"source {venv}/activate\n", "", 1)  # only the README's own line
    async with make_worker():
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        one = await wait_result(get_run(client, first))
        two = await wait_result(get_run(client, second))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert one.status == "completed" and one.output == "Refunded 40.00."
    assert two.status == "completed" and two.output == "Refunded 140.00."
    assert [e.output["amount"] for e in two.side_effects] == [140]
