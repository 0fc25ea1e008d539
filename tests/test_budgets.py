"""Budgets: a shared ledger nobody can race past, graceful degradation, fail closed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio.client import WorkflowHandle

from spine.client.runs import decide, get_state, start_run, wait_result
from spine.contract import ApprovalDecision, Limits, ledger_workflow_id
from spine.payloads import BudgetView
from spine.plugin import ledger_worker
from tests.helpers import (
    call,
    eventually,
    policy_file,
    scripted_request,
    turn,
    worker_client,
    worker_keyring,
)

TURN_USD = (1000 * 1.00 + 100 * 4.00) / 1_000_000  # scripted price: 1.00 in / 4.00 out per 1M


def _budget_policy(tmp_path, account: str, daily_usd: float, **budgets):
    import tomllib

    import tomli_w

    path = policy_file(tmp_path, runtime={"max_tokens": 200})
    data = tomllib.loads(path.read_text())
    data["accounts"][account] = {"daily_usd": daily_usd}
    data["budgets"].update({"soft_fraction": 1.0, "approval_fraction": 1.0, **budgets})
    path.write_text(tomli_w.dumps(data))
    return path


def _three_turns(order: str):
    return [
        turn(call("lookup_order", order_id=order), tokens=(1000, 100)),
        turn(call("lookup_order", order_id=order), tokens=(1000, 100)),
        turn(text="done", tokens=(1000, 100)),
    ]


async def test_concurrent_runs_never_exceed_the_daily_budget(
    client, make_worker, task_queue, tmp_path, new_account
):
    """50 runs race for a budget worth ~10: committed spend stays within it, the rest stop."""
    account = new_account("race")
    daily = round(10 * 3 * TURN_USD, 6)
    policy = _budget_policy(tmp_path, account, daily)
    async with make_worker(policy_path=policy):
        handles = []
        for i in range(50):
            request = scripted_request(_three_turns(f"o-{1100 + i}"))
            request.account = account
            handles.append(await start_run(client, request, task_queue=task_queue))
        # Bounded: a run stuck waiting (an approval nobody gives) must fail the test, not hang it.
        results = await asyncio.wait_for(
            asyncio.gather(*(wait_result(h) for h in handles)), timeout=300
        )
        ledger: WorkflowHandle = client.get_workflow_handle(ledger_workflow_id(account))
        view = await ledger.query("show", result_type=BudgetView)
    statuses = [r.status for r in results]
    exhausted = [r for r in results if r.status == "failed"]
    assert set(statuses) <= {"completed", "failed"}
    assert all((r.reason or "").startswith("budget_exhausted") for r in exhausted)
    assert statuses.count("completed") >= 1 and exhausted
    [day] = [w for w in view.windows if w.window.startswith("day:")]
    spent = sum(r.usage.usd for r in results)
    print(
        f"budget {daily:.4f}: committed {day.committed_usd:.4f}, runs spent {spent:.4f}, "
        f"completed {statuses.count('completed')}, exhausted {len(exhausted)}"
    )
    assert day.committed_usd <= daily + 1e-9
    assert abs(day.committed_usd - spent) < 1e-6
    assert day.reserved_usd == 0 and view.open_reservations == 0


async def test_ledger_unavailable_fails_closed(
    client, make_worker, task_queue, tmp_path, new_account, vault
):
    """With no ledger answering, no model call is made; once it is back the run finishes."""
    account = new_account("closed")
    ledger_queue = f"{task_queue}-ledger"
    policy = _budget_policy(tmp_path, account, 1.0)
    async with make_worker(policy_path=policy, ledger=False, ledger_task_queue=ledger_queue):
        request = scripted_request(_three_turns("o-1160"))
        request.account = account
        handle = await start_run(client, request, task_queue=task_queue)
        await asyncio.sleep(4)  # a window in which nothing may happen (negative check)
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            async for e in handle.fetch_history_events()
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert "spine.model_call" not in scheduled
        assert (await get_state(handle)).usage.usd == 0
        async with ledger_worker(client, ledger_queue, keyring=worker_keyring(vault)):
            result = await wait_result(handle)
    assert result.status == "completed", result.reason


async def test_run_degrades_then_asks_then_stops(
    client, make_worker, task_queue, tmp_path, new_account
):
    """Past 80% a run switches to the cheaper model, past 90% it asks, at 100% it stops."""
    policy = policy_file(
        tmp_path, runtime={"max_tokens": 200}, agent={"max_usd": 1.0, "max_steps": 30}
    )
    script = [
        turn(call("lookup_order", order_id="o-1161"), tokens=(10_000, 1_000)) for _ in range(20)
    ]
    request = scripted_request(script)
    request.account = new_account("solo")
    request.limits = Limits(max_usd=0.05)
    async with make_worker(policy_path=policy):
        handle = await start_run(client, request, task_queue=task_queue)

        async def asks() -> bool:
            state = await get_state(handle)
            return bool(state.pending_approvals)

        await eventually(asks, what="a budget approval")
        state = await get_state(handle)
        [pending] = state.pending_approvals
        assert pending.tool == "budget" and "of the budget is used" in pending.reason
        await decide(
            handle,
            ApprovalDecision(
                approval_id=pending.approval_id, decision="approve", by="bob", role="supervisor"
            ),
        )
        result = await wait_result(handle)
    assert result.status == "failed"
    assert (result.reason or "").startswith("budget_exhausted")
    assert result.usage.usd <= 0.05
    assert any("switched scripted -> scripted-cheap" in p for p in result.path)


async def test_ledger_window_resets_next_day(time_skipping_env, vault):
    """A day's exhausted budget is available again the next (skipped-to) day."""
    from temporalio.worker import Worker

    from spine.activities.budget import BudgetActivities
    from spine.payloads import BudgetCall, LedgerOp

    env = time_skipping_env
    queue = f"ledger-{uuid.uuid4()}"
    activities = BudgetActivities(worker_client(env.client, vault), queue)

    def op(rid):
        return BudgetCall(
            account="tz",
            op=LedgerOp(  # noqa: E731
                run_id="r", reserve_id=f"r/{rid}", reserve_usd=0.6, daily_limit_usd=1.0
            ),
        )

    async with (
        ledger_worker(env.client, queue, keyring=worker_keyring(vault)),
        Worker(env.client, task_queue=f"{queue}-x", activities=[activities.apply]),
    ):
        first = await activities.apply(op("a"))
        second = await activities.apply(op("b"))
        await env.sleep(timedelta(days=1, hours=1))
        third = await activities.apply(op("c"))
    assert first.granted and not second.granted and third.granted
    assert first.day != third.day


async def test_ledger_keeps_its_runs_short_and_forgets_old_settlements(time_skipping_env, vault):
    """A busy ledger continues as new every MAX_UPDATES_PER_RUN updates (so a worker taking
    it over replays little, within the 30 s task timeout), and settled reservations older
    than an hour are not carried into the next run."""
    import json

    from temporalio.api.enums.v1 import EventType
    from temporalio.worker import Worker

    from spine.activities.budget import BudgetActivities
    from spine.payloads import BudgetCall, LedgerOp
    from spine.workflows.ledger import LEDGER_TASK_TIMEOUT, MAX_UPDATES_PER_RUN

    env = time_skipping_env
    queue = f"ledger-{uuid.uuid4()}"
    account = f"busy-{uuid.uuid4().hex[:6]}"
    activities = BudgetActivities(worker_client(env.client, vault), queue)

    async def burst(prefix: str, count: int) -> None:
        previous = None
        for i in range(count):
            rid = f"r/{prefix}-{i}"
            commit = {previous: 0.001} if previous else {}
            await activities.apply(
                BudgetCall(
                    account=account,
                    op=LedgerOp(
                        run_id="r",
                        commit=commit,
                        reserve_id=rid,
                        reserve_usd=0.002,
                        daily_limit_usd=1000.0,
                    ),
                )
            )
            previous = rid

    async with (
        ledger_worker(env.client, queue, keyring=worker_keyring(vault)),
        Worker(env.client, task_queue=f"{queue}-x", activities=[activities.apply]),
    ):
        await burst("early", MAX_UPDATES_PER_RUN + 5)
        await env.sleep(timedelta(hours=2))
        await burst("late", MAX_UPDATES_PER_RUN + 5)
        wid = ledger_workflow_id(account)
        inputs, run_id = [], ""  # newest first, walking the continue-as-new chain back
        while True:
            handle = env.client.get_workflow_handle(wid, run_id=run_id or None)
            history = await handle.fetch_history()
            # At most five events per update (a workflow task each when they come one by one).
            assert len(history.events) <= 5 * MAX_UPDATES_PER_RUN + 20
            first = history.events[0]
            assert first.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED
            attrs = first.workflow_execution_started_event_attributes
            assert attrs.workflow_task_timeout.ToTimedelta() == LEDGER_TASK_TIMEOUT
            inputs.append(json.loads(attrs.input.payloads[0].data))
            run_id = attrs.continued_execution_run_id
            if not run_id:
                break
    assert len(inputs) >= 3
    kept = inputs[0]["reservations"]
    early = {rid: r["state"] for rid, r in kept.items() if rid.startswith("r/early-")}
    # Committed two hours ago: forgotten. The last one was never settled: it expired after an
    # hour (released) and is kept for a day in case its run still commits.
    assert early == {f"r/early-{MAX_UPDATES_PER_RUN + 4}": "released"}, early
    assert sum(rid.startswith("r/late-") for rid in kept) > 0


async def test_a_hot_account_batches_and_still_cannot_be_raced(time_skipping_env, vault):
    """Two hundred runs' reservations on one account at once: the worker sends them to the
    ledger in a few batch updates (not two hundred), and exactly as many are granted as the
    daily budget holds, no more, with every answer telling its own story."""
    from temporalio.api.enums.v1 import EventType
    from temporalio.worker import Worker

    from spine.activities.budget import BudgetActivities
    from spine.payloads import BudgetCall, LedgerOp

    env = time_skipping_env
    queue = f"ledger-{uuid.uuid4()}"
    account = f"hot-{uuid.uuid4().hex[:6]}"
    activities = BudgetActivities(worker_client(env.client, vault), queue)
    calls = [
        BudgetCall(
            account=account,
            op=LedgerOp(
                run_id=f"run-{i}", reserve_id=f"run-{i}/1", reserve_usd=0.1, daily_limit_usd=7.05
            ),
        )
        for i in range(200)
    ]
    async with (
        ledger_worker(env.client, queue, keyring=worker_keyring(vault)),
        Worker(env.client, task_queue=f"{queue}-x", activities=[activities.apply]),
    ):
        answers = await asyncio.gather(*(activities.apply(c) for c in calls))
        # A retried activity asks again and hears the same answer.
        again = await activities.apply(calls[0])
        view = await env.client.get_workflow_handle(ledger_workflow_id(account)).query(
            "show", result_type=BudgetView
        )
        history = await env.client.get_workflow_handle(ledger_workflow_id(account)).fetch_history()
    granted = [a for a in answers if a.granted]
    assert len(granted) == 70, len(granted)  # 70 x 0.10 <= 7.05 < 71 x 0.10
    assert all("daily budget of 7.0500 USD" in a.reason for a in answers if not a.granted)
    assert again.granted == answers[0].granted
    assert view.open_reservations == 70
    assert abs(view.windows[0].reserved_usd - 7.0) < 1e-6
    updates = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]
    assert 1 <= len(updates) <= 40, f"{len(updates)} ledger updates for 201 operations"


async def test_blocks_are_cut_to_a_share_of_the_headroom_left_now(time_skipping_env, vault):
    """A run asks for a block and allows less (its one call): the ledger grants at most 2% of
    what is left now (at least that one call), so runs reserving together cannot take it all."""
    from temporalio.worker import Worker

    from spine.activities.budget import BudgetActivities
    from spine.payloads import BudgetCall, LedgerOp

    env = time_skipping_env
    queue = f"ledger-{uuid.uuid4()}"
    account = f"cut-{uuid.uuid4().hex[:6]}"
    activities = BudgetActivities(worker_client(env.client, vault), queue)

    def op(i: int, least: float | None) -> BudgetCall:
        return BudgetCall(
            account=account,
            op=LedgerOp(
                run_id=f"r{i}",
                reserve_id=f"r{i}/1",
                reserve_usd=1.0,
                reserve_min_usd=least,
                daily_limit_usd=1.5,
            ),
        )

    async with (
        ledger_worker(env.client, queue, keyring=worker_keyring(vault)),
        Worker(env.client, task_queue=f"{queue}-x", activities=[activities.apply]),
    ):
        whole = await activities.apply(op(0, None))  # allows no less: all of it, as before
        cut = await activities.apply(op(1, 0.001))
        least = await activities.apply(op(2, 0.1))
        strict = await activities.apply(op(3, None))  # allows no less: refused as before
        # Fifty runs asking at once each take 2% of what is left: never the whole rest.
        burst = await asyncio.gather(*(activities.apply(op(10 + i, 0.0001)) for i in range(50)))
    assert whole.granted and whole.granted_usd == 1.0
    assert cut.granted and cut.granted_usd == 0.01  # 2% of the 0.5 left
    assert least.granted and least.granted_usd == 0.1  # 2% of 0.49 is below its minimum
    assert not strict.granted and "daily budget of 1.5000 USD" in strict.reason
    assert all(a.granted for a in burst)
    assert sum(a.granted_usd or 0 for a in burst) < 0.39 * 0.65  # 1 - 0.98**50 of the 0.39 left


def test_a_busy_accounts_ledger_carries_a_bounded_state():
    """A continue-as-new carries every open reservation, the released ones it must still
    count, and of the committed ones only the newest `MAX_COMMITTED_KEPT`: an account reserving
    thousands of blocks an hour would otherwise carry past Temporal's 2 MB payload limit."""
    from spine.payloads import LedgerState, Reservation
    from workflows.ledger import MAX_COMMITTED_KEPT, kept_reservations

    def reservation(i: int, state: str, at: str) -> Reservation:
        return Reservation(
            reservation_id=f"run-{i}/1",
            run_id=f"run-{i}",
            amount_usd=0.004,
            day="day:2026-11-29",
            month="mon:2026-11",
            state=state,  # type: ignore[arg-type]
            actual_usd=0.003 if state == "committed" else 0.0,
            reserved_at=at,
        )

    busy = MAX_COMMITTED_KEPT + 500
    # Committed within the hour, newest last; an old one; open ones; a released one (expired
    # while its run waited: a late commit must still count).
    reservations = {
        r.reservation_id: r
        for r in [
            reservation(-1, "committed", "2026-11-29T08:00:00"),
            *(
                reservation(i, "committed", f"2026-11-29T10:{i * 60 // busy:02d}:{i % 60:02d}")
                for i in range(busy)
            ),
            reservation(busy, "reserved", "2026-11-29T09:00:00"),
            reservation(busy + 1, "reserved", "2026-11-29T10:59:59"),
            reservation(busy + 2, "released", "2026-11-29T09:30:00"),
        ]
    }
    keep_after = {
        "reserved": "",
        "committed": "2026-11-29T10:00:00",
        "released": "2026-11-28T11:00:00",
    }
    kept = kept_reservations(reservations, keep_after)
    committed = [r for r in kept.values() if r.state == "committed"]
    assert len(committed) == MAX_COMMITTED_KEPT
    newest = sorted(
        (r for r in reservations.values() if r.state == "committed"),
        key=lambda r: (r.reserved_at, r.reservation_id),
    )[-MAX_COMMITTED_KEPT:]
    assert {r.reservation_id for r in committed} == {r.reservation_id for r in newest}
    assert {f"run-{busy}/1", f"run-{busy + 1}/1", f"run-{busy + 2}/1"} <= set(kept)
    assert "run--1/1" not in kept  # older than the hour
    carried = LedgerState(account="acme", reservations=kept).model_dump_json()
    assert len(carried) < 1_000_000, len(carried)
    # A quiet account keeps everything the time rules keep, as before.
    quiet = dict(list(reservations.items())[:10])
    assert kept_reservations(quiet, keep_after) == {
        k: r for k, r in quiet.items() if k != "run--1/1"
    }
